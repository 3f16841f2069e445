/* edgec-runtime C API: load a `.edgec` artifact and run it.
 *
 * Link against libedgec_runtime.a (plus -lpthread -ldl -lm on Linux) or libedgec_runtime.so.
 * Functions that can fail take an error buffer: on failure they write a NUL-terminated message
 * (cut to err_len - 1 bytes) and return NULL or -1; on success they write an empty string.
 * err_buf may be NULL. No function lets a Rust panic escape.
 */
#ifndef EDGEC_H
#define EDGEC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGEC_DTYPE_F32 1
#define EDGEC_DTYPE_F64 2
#define EDGEC_DTYPE_I8 3
#define EDGEC_DTYPE_U8 4
#define EDGEC_DTYPE_I32 5
#define EDGEC_DTYPE_I64 6
#define EDGEC_DTYPE_BOOL 7 /* one byte, 0 or 1 */

#define EDGEC_MAX_RANK 8

/* A dense row-major tensor.
 * Input:  every field is read; data must be aligned to the element size.
 * Output: set data and byte_len (the buffer's capacity, at least the output's size); the runtime
 *         fills dtype, rank and shape. Output buffers must not overlap inputs or each other. */
typedef struct {
    int32_t dtype; /* EDGEC_DTYPE_* */
    uint32_t rank;
    int64_t shape[EDGEC_MAX_RANK];
    void *data;
    size_t byte_len;
} EdgecTensor;

typedef struct EdgecModel EdgecModel;

/* Loads and validates an artifact; NULL on failure. The file must stay unchanged while loaded. */
EdgecModel *edgec_model_load(const char *path, char *err_buf, size_t err_len);

/* Runs the model; inputs and outputs in the model's order. 0 on success, -1 on failure.
 * Safe to call from several threads at once (runs take turns). */
int edgec_model_run(const EdgecModel *model, const EdgecTensor *inputs, size_t n_inputs, EdgecTensor *outputs,
                    size_t n_outputs, char *err_buf, size_t err_len);

/* Frees a model; NULL is ignored. */
void edgec_model_free(EdgecModel *model);

/* Threads the model's runs use (1 = serial; the default is every CPU or EDGEC_THREADS).
 * Returns 0, or -1 for NULL or 0 threads. Not concurrently with a run of the same model. */
int edgec_model_set_threads(EdgecModel *model, size_t threads);

size_t edgec_model_input_count(const EdgecModel *model);
size_t edgec_model_output_count(const EdgecModel *model);
/* Names are owned by the model; NULL if index is out of range. */
const char *edgec_model_input_name(const EdgecModel *model, size_t index);
const char *edgec_model_output_name(const EdgecModel *model, size_t index);
/* EDGEC_DTYPE_* ; -1 if index is out of range. */
int32_t edgec_model_input_dtype(const EdgecModel *model, size_t index);
int32_t edgec_model_output_dtype(const EdgecModel *model, size_t index);
/* -1 if index is out of range. */
int32_t edgec_model_input_rank(const EdgecModel *model, size_t index);
int32_t edgec_model_output_rank(const EdgecModel *model, size_t index);
/* Bytes per element; 0 for an unknown code. */
size_t edgec_dtype_size(int32_t dtype);

/* Decoding with the KV cache kept in the model's arena (artifacts compiled from a decoder with
 * past inputs): no past/present copies per step. */
typedef struct EdgecKvCache EdgecKvCache;

/* A new, empty cache; NULL (with a message) if the model keeps none. */
EdgecKvCache *edgec_kv_cache_new(const EdgecModel *model, char *err_buf, size_t err_len);
/* Positions the cache holds (0 for NULL). */
size_t edgec_kv_cache_len(const EdgecKvCache *cache);
/* Frees a cache; NULL is ignored. */
void edgec_kv_cache_free(EdgecKvCache *cache);

/* One step: every input in order, the past key/value inputs with data = NULL (their length is
 * the cache's); every output in order, the present key/value outputs are not touched (data may be
 * NULL). The step's positions are appended to the cache. A run of the same model with another
 * cache, or edgec_model_run, takes the arena over: this cache's next step then fails instead of
 * decoding from foreign rows. 0 on success, -1 on failure. */
int edgec_model_run_cached(const EdgecModel *model, EdgecKvCache *cache, const EdgecTensor *inputs, size_t n_inputs,
                           EdgecTensor *outputs, size_t n_outputs, char *err_buf, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* EDGEC_H */
