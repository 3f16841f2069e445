/* Small helpers shared by the C test programs that link an `edgec compile --emit obj` model:
 * 64-byte aligned zeroed allocations and whole-file reads, exiting with status 2 on failure. */
#ifndef EDGEC_TEST_ALLOC_IO_H
#define EDGEC_TEST_ALLOC_IO_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *alloc64(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    memset(p, 0, n ? n : 64);
    return p;
}

static void *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    long n;
    void *p;
    if (!f) {
        perror(path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    p = alloc64((size_t)n);
    if (n > 0 && fread(p, 1, (size_t)n, f) != (size_t)n) {
        perror(path);
        exit(2);
    }
    fclose(f);
    return p;
}

#endif
