/*
 * obj_main: links against an object written by `edgec compile --emit obj --prefix model` and runs
 * it once through the generated header's model_run(), for tests under qemu-user.
 *
 *   cc -DMODEL_HEADER='"path/model.h"' [-DWEIGHTS_PATH='"model.weights.bin"'] obj_main.c model.o -o t
 *   t SYM1 .. SYMn IN1 .. INk OUT1 BYTES1 .. OUTm BYTESm
 *
 * (n, k, m are the header's MODEL_NUM_SYMBOLS, MODEL_NUM_INPUTS, MODEL_NUM_OUTPUTS.) Inputs are
 * raw little-endian tensor files; each output is written raw to its file.
 */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include MODEL_HEADER
#include "alloc_io.h"

int main(int argc, char **argv) {
    int want = 1 + MODEL_NUM_SYMBOLS + MODEL_NUM_INPUTS + 2 * MODEL_NUM_OUTPUTS;
    if (argc != want) {
        fprintf(stderr, "expected %d arguments, got %d\n", want - 1, argc - 1);
        return 2;
    }
    int a = 1;
    int64_t symbols[MODEL_NUM_SYMBOLS + 1];
    for (int i = 0; i < MODEL_NUM_SYMBOLS; i++) symbols[i] = strtoll(argv[a++], NULL, 10);
    const void *inputs[MODEL_NUM_INPUTS + 1];
    for (int i = 0; i < MODEL_NUM_INPUTS; i++) inputs[i] = read_file(argv[a++]);
    void *outputs[MODEL_NUM_OUTPUTS + 1];
    const char *out_paths[MODEL_NUM_OUTPUTS + 1];
    size_t out_sizes[MODEL_NUM_OUTPUTS + 1];
    for (int i = 0; i < MODEL_NUM_OUTPUTS; i++) {
        out_paths[i] = argv[a++];
        out_sizes[i] = (size_t)strtoull(argv[a++], NULL, 10);
        outputs[i] = alloc64(out_sizes[i]);
    }
    uint8_t *arena = alloc64((size_t)MODEL_ARENA_BYTES);
#ifdef MODEL_WEIGHTS_SIDECAR
    /* Weights from the sidecar file (WEIGHTS_PATH given at build time). */
    const uint8_t *weights = read_file(WEIGHTS_PATH);
    model_run(inputs, outputs, weights, arena, symbols);
#else
    model_run(inputs, outputs, arena, symbols);
#endif
    for (int i = 0; i < MODEL_NUM_OUTPUTS; i++) {
        FILE *f = fopen(out_paths[i], "wb");
        if (!f || fwrite(outputs[i], 1, out_sizes[i], f) != out_sizes[i]) {
            perror(out_paths[i]);
            return 2;
        }
        fclose(f);
    }
    printf("ok\n");
    return 0;
}
