/* The argument structures of the kernels' entry points, one per kernel, mirrored field by field (same names,
 * same order) by the ctypes.Structure classes of loader.py. Arrays of the element type T are void pointers,
 * so one structure serves the f32 and f64 kernels; every integer is int64_t, so no field has padding. */
#ifndef HSPA_ARGS_H
#define HSPA_ARGS_H

#include <stdint.h>

/* hspa_attend: see attend in hspa_kernel.c for the meaning of each field. */
typedef struct {
    const void *q, *kp;
    int64_t rows, length, kwidth;
    const void *v;
    int64_t width;
    void *out;
    int64_t block_rows, tile_rows, key_tile, screen;
    const void *kp16, *keys, *kbounds;
    void *sup_cols, *sup_vals;
    int64_t capacity;
    int64_t *start, *nnz, *total;
    int64_t n_threads;
} hspa_attend_args;

/* hspa_grad_rows: see grad_rows in hspa_backward.h. */
typedef struct {
    const int64_t *start, *nnz;
    const int32_t *cols;
    int64_t rows;
    const void *g, *v;
    int64_t width;
    const void *k;
    int64_t kwidth;
    void *ds, *dq;
    int64_t n_threads;
} hspa_grad_rows_args;

/* hspa_grad_keys: see grad_keys in hspa_backward.h. */
typedef struct {
    const int64_t *start, *nnz;
    const int32_t *cols;
    const void *vals, *ds;
    int64_t rows, length;
    const void *q;
    int64_t kwidth;
    const void *g;
    int64_t width;
    void *dk, *dv;
    int64_t n_threads;
} hspa_grad_keys_args;

#endif
