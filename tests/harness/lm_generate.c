/*
 * lm_generate: greedy decoding with a decoder-with-past language model linked statically from
 * `edgec compile decoder_with_past.onnx --emit obj --weights-file --prefix model` - what firmware
 * or an app without the Rust runtime does. The KV cache lives in two sets of buffers that swap
 * roles every step (present of step t is past of step t+1), so nothing is copied here.
 *
 *   cc -O2 -DMODEL_HEADER='"model.h"' -DWEIGHTS_PATH='"model.weights.bin"' lm_generate.c model.o
 *   lm_generate [--kv-in-arena] VOCAB KV_HEADS HEAD_DIM N_NEW ID1 .. IDn   prints the N_NEW greedy ids
 *
 * With --kv-in-arena (models compiled with their KV cache in the arena, MODEL_KV_CACHE_SLOTS), the
 * past and present pointers are NULL: the cache never leaves the arena and there are no buffers.
 *
 * Inputs and outputs are found through the header's MODEL_INPUT_* / MODEL_OUTPUT_* indices; the
 * layers' past/present entries follow the first one in (key, value) pairs, as Optimum exports them.
 */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include MODEL_HEADER
#include "alloc_io.h"

#define LAYERS ((MODEL_NUM_INPUTS - MODEL_INPUT_PAST_KEY_VALUES_0_KEY) / 2)

int main(int argc, char **argv) {
    long vocab, heads, head_dim, n_new, n_prompt, total_max, i, l, step;
    int64_t *prompt, *ids, *mask, *pos;
    float *logits, *kv[2][LAYERS][2];
    int cur = 0, in_arena = 0;
    long past = 0;
    const uint8_t *weights;
    uint8_t *arena;
    if (argc > 1 && strcmp(argv[1], "--kv-in-arena") == 0) {
#ifdef MODEL_KV_CACHE_SLOTS
        in_arena = 1;
        argv++;
        argc--;
#else
        fprintf(stderr, "this model keeps no KV cache in its arena\n");
        return 2;
#endif
    }
    if (argc < 6) {
        fprintf(stderr, "usage: %s [--kv-in-arena] VOCAB KV_HEADS HEAD_DIM N_NEW ID...\n", argv[0]);
        return 2;
    }
    memset(kv, 0, sizeof kv);
    vocab = atol(argv[1]);
    heads = atol(argv[2]);
    head_dim = atol(argv[3]);
    n_new = atol(argv[4]);
    n_prompt = argc - 5;
    total_max = n_prompt + n_new;
    prompt = alloc64(sizeof(int64_t) * (size_t)n_prompt);
    for (i = 0; i < n_prompt; i++) prompt[i] = atoll(argv[5 + i]);
    ids = alloc64(sizeof(int64_t) * (size_t)total_max);
    mask = alloc64(sizeof(int64_t) * (size_t)total_max);
    pos = alloc64(sizeof(int64_t) * (size_t)total_max);
    logits = alloc64(sizeof(float) * (size_t)(vocab * n_prompt));
    for (i = 0; i < total_max; i++) mask[i] = 1;
    for (l = 0; l < LAYERS && !in_arena; l++) {
        size_t bytes = sizeof(float) * (size_t)(heads * total_max * head_dim);
        kv[0][l][0] = alloc64(bytes);
        kv[0][l][1] = alloc64(bytes);
        kv[1][l][0] = alloc64(bytes);
        kv[1][l][1] = alloc64(bytes);
    }
    weights = read_file(WEIGHTS_PATH);
    arena = alloc64((size_t)MODEL_ARENA_BYTES);
    for (step = 0; step < n_new; step++) {
        long n = step == 0 ? n_prompt : 1;
        const void *in[MODEL_NUM_INPUTS];
        void *out[MODEL_NUM_OUTPUTS];
        int64_t sym[MODEL_NUM_SYMBOLS];
        const float *last;
        long best = 0;
        if (step == 0) {
            memcpy(ids, prompt, sizeof(int64_t) * (size_t)n);
        }
        for (i = 0; i < n; i++) pos[i] = past + i;
        in[MODEL_INPUT_INPUT_IDS] = ids;
        in[MODEL_INPUT_ATTENTION_MASK] = mask;
        in[MODEL_INPUT_POSITION_IDS] = pos;
        out[MODEL_OUTPUT_LOGITS] = logits;
        for (l = 0; l < LAYERS; l++) {
            in[MODEL_INPUT_PAST_KEY_VALUES_0_KEY + 2 * l] = in_arena ? NULL : kv[cur][l][0];
            in[MODEL_INPUT_PAST_KEY_VALUES_0_KEY + 2 * l + 1] = in_arena ? NULL : kv[cur][l][1];
            out[MODEL_OUTPUT_PRESENT_0_KEY + 2 * l] = in_arena ? NULL : kv[1 - cur][l][0];
            out[MODEL_OUTPUT_PRESENT_0_KEY + 2 * l + 1] = in_arena ? NULL : kv[1 - cur][l][1];
        }
        sym[MODEL_SYMBOL_BATCH_SIZE] = 1;
        sym[MODEL_SYMBOL_SEQUENCE_LENGTH] = n;
        sym[MODEL_SYMBOL_PAST_SEQUENCE_LENGTH] = past;
        sym[MODEL_SYMBOL_TOTAL_SEQUENCE_LENGTH] = past + n;
        model_run(in, out, weights, arena, sym);
        last = logits + (n - 1) * vocab;
        for (i = 1; i < vocab; i++) {
            if (last[i] > last[best]) best = i;
        }
        printf("%ld%s", best, step + 1 < n_new ? " " : "\n");
        fflush(stdout);
        ids[0] = best;
        past += n;
        cur = 1 - cur;
    }
    return 0;
}
