/* Drives the C API against the add_bias fixture (runtime/tests/common/mod.rs); prints what it
 * sees so the Rust test can compare. Exit status 1 means a check here failed. */
#include <stdio.h>
#include <string.h>

#include "edgec.h"

#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            printf("FAIL: " __VA_ARGS__);                                                                              \
            printf("\n");                                                                                              \
            return 1;                                                                                                  \
        }                                                                                                              \
    } while (0)

int main(int argc, char **argv) {
    char err[256];
    CHECK(argc == 2, "usage: run_model ARTIFACT");

    EdgecModel *missing = edgec_model_load("/nonexistent/model.edgec", err, sizeof err);
    CHECK(missing == NULL && strstr(err, "/nonexistent/model.edgec") != NULL, "missing file: %s", err);

    EdgecModel *m = edgec_model_load(argv[1], err, sizeof err);
    CHECK(m != NULL, "load: %s", err);
    CHECK(err[0] == '\0', "error buffer not cleared on success");
    printf("inputs %zu outputs %zu\n", edgec_model_input_count(m), edgec_model_output_count(m));
    for (size_t i = 0; i < edgec_model_input_count(m); i++)
        printf("input %s dtype %d rank %d\n", edgec_model_input_name(m, i), edgec_model_input_dtype(m, i),
               edgec_model_input_rank(m, i));
    for (size_t i = 0; i < edgec_model_output_count(m); i++)
        printf("output %s dtype %d rank %d\n", edgec_model_output_name(m, i), edgec_model_output_dtype(m, i),
               edgec_model_output_rank(m, i));
    CHECK(edgec_model_input_name(m, 3) == NULL && edgec_model_output_dtype(m, 3) == -1, "out-of-range getters");

    float x[4] = {1, 2, 3, 4};
    int64_t mask[4] = {1, 1, 1, 1};
    uint8_t flag = 1;
    EdgecTensor in[3] = {
        {EDGEC_DTYPE_F32, 2, {1, 4}, x, sizeof x},
        {EDGEC_DTYPE_I64, 2, {1, 4}, mask, sizeof mask},
        {EDGEC_DTYPE_BOOL, 1, {1}, &flag, 1},
    };
    float y[16];
    int64_t info[3];
    float z[33];
    EdgecTensor out[3] = {{0, 0, {0}, y, sizeof y}, {0, 0, {0}, info, sizeof info}, {0, 0, {0}, z, sizeof z}};
    CHECK(edgec_model_run(m, in, 3, out, 3, err, sizeof err) == 0, "run: %s", err);
    printf("y dtype %d rank %u shape %lld %lld: %g %g %g %g\n", out[0].dtype, out[0].rank, (long long)out[0].shape[0],
           (long long)out[0].shape[1], y[0], y[1], y[2], y[3]);
    printf("info %lld %lld %lld\n", (long long)info[0], (long long)info[1], (long long)info[2]);
    printf("z rank %u shape %lld, %zu bytes per element\n", out[2].rank, (long long)out[2].shape[0],
           edgec_dtype_size(out[2].dtype));

    in[0].dtype = EDGEC_DTYPE_I32;
    CHECK(edgec_model_run(m, in, 3, out, 3, err, sizeof err) == -1, "wrong dtype accepted");
    printf("error: %s\n", err);

    edgec_model_free(m);
    edgec_model_free(NULL);
    printf("ok\n");
    return 0;
}
