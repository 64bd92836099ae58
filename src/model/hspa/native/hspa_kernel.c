/* Exact sparsemax attention kernels for the CPU (HSPA), called through ctypes by model/hspa_blocked.py.
 *
 * The caller computes a block of scores S (rows x L) with a BLAS matmul; these kernels do the rest:
 *   threshold   tau of each row by Michelot's iteration: Newton's method on
 *               f(tau) = sum_j max(s_j - tau, 0) - 1, which rises monotonically to the exact threshold
 *               and stops when the support stops shrinking. It starts from the threshold of a subset of
 *               the row (a lower bound: any subset's threshold is), the lane-wise maxima of 16-vector
 *               groups gathered during the max pass, so a full row usually takes two or three passes.
 *               Each pass is one vectorised masked sum: no sort, no gather.
 *   gather      the support of each row as CSR (column, p = s - tau) and the row's output sum_j p_j v_j.
 *   grad_rows   dP on the support, the sparsemax Jacobian (dS = dP - mean over the support) and dQ.
 *   grad_keys   dK and dV, by key, through a counting-sort transpose of the block's CSR.
 * Rows are shared among threads in small chunks from a common counter (rows differ in cost).
 * This file includes itself twice to define every kernel for float (suffix f32) and double (f64).
 */
#ifndef HSPA_T
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*thread_fn)(void *ctx);

typedef struct {
    thread_fn fn;
    void *ctx;
} thread_arg;

static void *thread_main(void *p) {
    thread_arg *a = (thread_arg *)p;
    a->fn(a->ctx);
    return NULL;
}

/* Runs fn(ctx) on n_threads threads (the calling thread is one of them); fn shares the work itself. */
static void run_threads(int n_threads, thread_fn fn, void *ctx) {
    if (n_threads > 64) n_threads = 64;
    thread_arg arg = {fn, ctx};
    pthread_t threads[64];
    int started = 0;
    for (int t = 1; t < n_threads; t++)
        if (pthread_create(&threads[started], NULL, thread_main, &arg) == 0) started++;
    fn(ctx);
    for (int t = 0; t < started; t++) pthread_join(threads[t], NULL);
}

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t n, chunk, next;
} chunks_arg;

/* One thread's share of parallel_for: chunks taken from the shared counter until none is left. */
static void take_chunks(void *p) {
    chunks_arg *a = (chunks_arg *)p;
    for (;;) {
        int64_t b = __atomic_fetch_add(&a->next, a->chunk, __ATOMIC_RELAXED);
        if (b >= a->n) break;
        a->fn(a->ctx, b, b + a->chunk < a->n ? b + a->chunk : a->n);
    }
}

/* Runs fn over [0, n) in chunks on up to n_threads threads (rows differ in cost, so chunks are small). */
static void parallel_for(int64_t n, int64_t chunk, int n_threads, range_fn fn, void *ctx) {
    if (n <= 0) return;
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    chunks_arg arg = {fn, ctx, n, chunk, 0};
    run_threads(n_threads < n_chunks ? n_threads : (int)n_chunks, take_chunks, &arg);
}

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define GROUP 16 /* vectors per group whose lane-wise maximum joins the subset */
#define TILE_ROWS 6 /* query rows of the score micro-kernel */
#define BLOCK_ROWS 24 /* query rows a thread scores and thresholds at a time */

#define HSPA_T float
#define HSPA_I int32_t
#define SFX f32
#include "hspa_kernel.c"
#undef HSPA_T
#undef HSPA_I
#undef SFX

#define HSPA_T double
#define HSPA_I int64_t
#define SFX f64
#include "hspa_kernel.c"

#else /* the kernels for one element type HSPA_T (HSPA_I: the integer of the same width) */

#define T HSPA_T
#define W (int64_t)(64 / sizeof(T)) /* lanes of one 64-byte vector */
typedef T CAT(vec, SFX) __attribute__((vector_size(64)));
typedef HSPA_I CAT(ivec, SFX) __attribute__((vector_size(64)));
typedef uint64_t CAT(uvec, SFX) __attribute__((vector_size(64)));
#define VEC CAT(vec, SFX)
#define IVEC CAT(ivec, SFX)
#define UVEC CAT(uvec, SFX)

static inline VEC CAT(load, SFX)(const T *p) { VEC v; memcpy(&v, p, sizeof v); return v; }
static inline VEC CAT(splat, SFX)(T x) { return (VEC){0} + x; } /* scalar operands broadcast */
static inline VEC CAT(vmax, SFX)(VEC a, VEC b) { IVEC m = a > b; return (VEC)(((IVEC)a & m) | ((IVEC)b & ~m)); }
static inline int CAT(any, SFX)(IVEC m) {
    UVEC u = (UVEC)m;
    uint64_t r = 0;
    for (int l = 0; l < 8; l++) r |= u[l];
    return r != 0;
}

/* Sum of (x - m) over x > t, and their count, for x in s[0..n). */
static T CAT(masked_sum, SFX)(const T *s, int64_t n, T t, T m, int64_t *count) {
    const VEC tv = CAT(splat, SFX)(t), mv = CAT(splat, SFX)(m);
    VEC acc0 = CAT(splat, SFX)(0), acc1 = acc0;
    IVEC cnt0 = (IVEC)CAT(splat, SFX)(0), cnt1 = cnt0;
    int64_t j = 0;
    for (; j + 2 * W <= n; j += 2 * W) {
        VEC x0 = CAT(load, SFX)(s + j), x1 = CAT(load, SFX)(s + j + W);
        IVEC k0 = x0 > tv, k1 = x1 > tv;
        acc0 += (VEC)((IVEC)(x0 - mv) & k0);
        acc1 += (VEC)((IVEC)(x1 - mv) & k1);
        cnt0 -= k0;
        cnt1 -= k1;
    }
    T sum = 0;
    int64_t cnt = 0;
    for (int l = 0; l < W; l++) { sum += acc0[l] + acc1[l]; cnt += cnt0[l] + cnt1[l]; }
    for (; j < n; j++)
        if (s[j] > t) { sum += s[j] - m; cnt++; }
    *count = cnt;
    return sum;
}

/* Michelot's iteration on s[0..n) with maximum m from the lower bound t; returns tau, sets *support. */
static T CAT(michelot, SFX)(const T *s, int64_t n, T m, T t, int64_t *support) {
    int64_t prev = n + 1, cnt;
    for (;;) {
        T sum = CAT(masked_sum, SFX)(s, n, t, m, &cnt);
        if (cnt == 0) { t = (T)NAN; break; } /* a row of NaNs */
        if (cnt >= prev) break;               /* the support stopped shrinking: t is exact */
        prev = cnt;
        t = m + (sum - (T)1) / (T)cnt;
    }
    *support = cnt;
    return t;
}

/* Exact threshold of row s[0..n); *support = #{s > tau}. subset: work space of n / GROUP entries. */
static T CAT(row_threshold, SFX)(const T *s, int64_t n, T *subset, int64_t *support) {
    const int64_t groups = n / (W * GROUP);
    VEC best = CAT(splat, SFX)(-INFINITY);
    int64_t j = 0;
    for (int64_t g = 0; g < groups; g++, j += W * GROUP) {
        VEC gm = CAT(load, SFX)(s + j);
        for (int v = 1; v < GROUP; v++) gm = CAT(vmax, SFX)(gm, CAT(load, SFX)(s + j + v * W));
        if (subset) memcpy(subset + g * W, &gm, sizeof gm);
        best = CAT(vmax, SFX)(best, gm);
    }
    T m = -INFINITY;
    for (int l = 0; l < W; l++) m = best[l] > m ? best[l] : m;
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    T t = m - (T)1;
    if (groups > 1 && subset) {
        /* The subset's threshold bounds the row's from below; the margin covers its rounding. */
        int64_t unused;
        T bound = CAT(michelot, SFX)(subset, groups * W, m, t, &unused);
        bound -= (T)1e-5 * ((T)1 + fabs((double)m));
        t = bound > t ? bound : t;
    }
    return CAT(michelot, SFX)(s, n, m, t, support);
}

static T *CAT(subset_buffer, SFX)(int64_t n) {
    const int64_t groups = n / (W * GROUP);
    return groups > 1 ? malloc((size_t)groups * W * sizeof(T)) : NULL;
}

/* Appends the support of row s (entries > t) to cols/vals from index e; returns the new end. */
static int64_t CAT(row_support, SFX)(const T *s, int64_t n, T t, int32_t *cols, T *vals, int64_t e) {
    const VEC tv = CAT(splat, SFX)(t);
    int64_t j = 0;
    for (; j + W <= n; j += W) {
        if (!CAT(any, SFX)(CAT(load, SFX)(s + j) > tv)) continue;
        for (int64_t l = j; l < j + W; l++)
            if (s[l] > t) { cols[e] = (int32_t)l; vals[e] = s[l] - t; e++; }
    }
    for (; j < n; j++)
        if (s[j] > t) { cols[e] = (int32_t)j; vals[e] = s[j] - t; e++; }
    return e;
}

/* o[0..w) = sum over entries [e0, e1) of vals[e] * v[cols[e]] (a NaN threshold gives NaNs). */
static void CAT(row_output, SFX)(const int32_t *cols, const T *vals, int64_t e0, int64_t e1, T t, const T *v,
                                 int64_t w, T *o) {
    for (int64_t d = 0; d < w; d++) o[d] = t == t ? (T)0 : (T)NAN;
    for (int64_t k = e0; k < e1; k++) {
        const T pk = vals[k], *vr = v + (int64_t)cols[k] * w;
        for (int64_t d = 0; d < w; d++) o[d] += pk * vr[d];
    }
}

typedef struct {
    const T *s;
    int64_t length;
    T *tau;
    int64_t *nnz;
} CAT(threshold_ctx, SFX);

static void CAT(threshold_range, SFX)(void *p, int64_t begin, int64_t end) {
    CAT(threshold_ctx, SFX) *c = p;
    T *subset = CAT(subset_buffer, SFX)(c->length);
    for (int64_t i = begin; i < end; i++)
        c->tau[i] = CAT(row_threshold, SFX)(c->s + i * c->length, c->length, subset, &c->nnz[i]);
    free(subset);
}

void CAT(hspa_threshold, SFX)(const T *s, int64_t rows, int64_t length, T *tau, int64_t *nnz, int n_threads) {
    CAT(threshold_ctx, SFX) c = {s, length, tau, nnz};
    parallel_for(rows, 4, n_threads, CAT(threshold_range, SFX), &c);
}

typedef struct {
    const T *s;
    int64_t length;
    const T *tau;
    const int64_t *crow;
    int32_t *cols;
    T *vals;
    const T *v;
    int64_t width;
    T *out;
} CAT(gather_ctx, SFX);

static void CAT(gather_range, SFX)(void *p, int64_t begin, int64_t end) {
    CAT(gather_ctx, SFX) *c = p;
    for (int64_t i = begin; i < end; i++) {
        const T t = c->tau[i];
        int64_t e = t == t ? CAT(row_support, SFX)(c->s + i * c->length, c->length, t, c->cols, c->vals, c->crow[i])
                           : c->crow[i];
        CAT(row_output, SFX)(c->cols, c->vals, c->crow[i], e, t, c->v, c->width, c->out + i * c->width);
    }
}

void CAT(hspa_gather, SFX)(const T *s, int64_t rows, int64_t length, const T *tau, const int64_t *crow,
                           int32_t *cols, T *vals, const T *v, int64_t width, T *out, int n_threads) {
    CAT(gather_ctx, SFX) c = {s, length, tau, crow, cols, vals, v, width, out};
    parallel_for(rows, 4, n_threads, CAT(gather_range, SFX), &c);
}

typedef struct {
    const T *q, *kt, *v;
    int64_t length, padded, kwidth, width;
    T *out;
    int64_t next; /* next block of BLOCK_ROWS query rows */
} CAT(attend_ctx, SFX);

/* scores[r][j] = q[r] . kt[:, j] for TILE_ROWS rows and the 2W columns from j0; kt is (kwidth x padded). */
static void CAT(score_tile, SFX)(const T *qt, const T *kt, int64_t padded, int64_t kwidth, int64_t j0, T *scores) {
    VEC acc[TILE_ROWS][2];
    for (int r = 0; r < TILE_ROWS; r++) acc[r][0] = acc[r][1] = CAT(splat, SFX)(0);
    for (int64_t c = 0; c < kwidth; c++) {
        const VEC k0 = CAT(load, SFX)(kt + c * padded + j0), k1 = CAT(load, SFX)(kt + c * padded + j0 + W);
        for (int r = 0; r < TILE_ROWS; r++) {
            const VEC a = CAT(splat, SFX)(qt[r * kwidth + c]);
            acc[r][0] += a * k0;
            acc[r][1] += a * k1;
        }
    }
    for (int r = 0; r < TILE_ROWS; r++) {
        memcpy(scores + r * padded + j0, &acc[r][0], sizeof(VEC));
        memcpy(scores + r * padded + j0 + W, &acc[r][1], sizeof(VEC));
    }
}

static void CAT(attend_thread, SFX)(void *p) {
    CAT(attend_ctx, SFX) *c = p;
    const int64_t n = c->length, np = c->padded, kw = c->kwidth;
    T *scores = malloc((size_t)BLOCK_ROWS * np * sizeof(T));
    T *qt = calloc((size_t)BLOCK_ROWS * kw, sizeof(T));
    T *subset = CAT(subset_buffer, SFX)(n);
    int32_t *cols = malloc((size_t)n * sizeof(int32_t));
    T *vals = malloc((size_t)n * sizeof(T));
    if (scores && qt && cols && vals) {
        for (;;) {
            const int64_t r0 = __atomic_fetch_add(&c->next, BLOCK_ROWS, __ATOMIC_RELAXED);
            if (r0 >= n) break;
            const int64_t rows = r0 + BLOCK_ROWS <= n ? BLOCK_ROWS : n - r0;
            memset(qt, 0, (size_t)BLOCK_ROWS * kw * sizeof(T));
            memcpy(qt, c->q + r0 * kw, (size_t)rows * kw * sizeof(T));
            /* Column tiles outside, row tiles inside: each tile of kt is loaded from memory once per block. */
            for (int64_t j0 = 0; j0 < np; j0 += 2 * W)
                for (int64_t g = 0; g < rows; g += TILE_ROWS)
                    CAT(score_tile, SFX)(qt + g * kw, c->kt, np, kw, j0, scores + g * np);
            for (int64_t i = 0; i < rows; i++) {
                const T *s = scores + i * np;
                int64_t nnz;
                const T t = CAT(row_threshold, SFX)(s, n, subset, &nnz);
                const int64_t e = t == t ? CAT(row_support, SFX)(s, n, t, cols, vals, 0) : 0;
                CAT(row_output, SFX)(cols, vals, 0, e, t, c->v, c->width, c->out + (r0 + i) * c->width);
            }
        }
    }
    free(scores);
    free(qt);
    free(subset);
    free(cols);
    free(vals);
}

/* out = sparsemax(q kt) v for one sample, keeping nothing (inference). q: (length x kwidth); kt: the keys
 * transposed, (kwidth x padded) with padded a multiple of 2W and zero columns from length on; v: (length x
 * width). Each thread scores BLOCK_ROWS rows with its own micro-kernel and thresholds them while they are
 * in its cache, so a call has no synchronisation but its end. Returns 0, or -1 without work space. */
int CAT(hspa_attend, SFX)(const T *q, const T *kt, int64_t length, int64_t padded, int64_t kwidth, const T *v,
                          int64_t width, T *out, int n_threads) {
    if (padded % (2 * W) || padded < length) return -1;
    CAT(attend_ctx, SFX) c = {q, kt, v, length, padded, kwidth, width, out, 0};
    const int64_t blocks = (length + BLOCK_ROWS - 1) / BLOCK_ROWS;
    run_threads(n_threads < blocks ? n_threads : (int)blocks, CAT(attend_thread, SFX), &c);
    return c.next >= length ? 0 : -1;
}

typedef struct {
    const int64_t *crow;
    const int32_t *cols;
    const T *g, *v, *k;
    int64_t width, kwidth;
    T *ds, *dq;
} CAT(rows_ctx, SFX);

static void CAT(grad_rows_range, SFX)(void *p, int64_t begin, int64_t end) {
    CAT(rows_ctx, SFX) *c = p;
    const int64_t w = c->width, kw = c->kwidth;
    for (int64_t i = begin; i < end; i++) {
        const int64_t e0 = c->crow[i], e1 = c->crow[i + 1];
        if (e1 == e0) continue;
        const T *g = c->g + i * w;
        T total = 0;
        for (int64_t e = e0; e < e1; e++) {
            const T *vr = c->v + (int64_t)c->cols[e] * w;
            T dot = 0;
            for (int64_t d = 0; d < w; d++) dot += g[d] * vr[d];
            c->ds[e] = dot;
            total += dot;
        }
        const T mean = total / (T)(e1 - e0);
        T *dq = c->dq ? c->dq + i * kw : NULL;
        for (int64_t e = e0; e < e1; e++) {
            const T d_s = c->ds[e] - mean;
            c->ds[e] = d_s;
            if (dq) {
                const T *kr = c->k + (int64_t)c->cols[e] * kw;
                for (int64_t d = 0; d < kw; d++) dq[d] += d_s * kr[d];
            }
        }
    }
}

void CAT(hspa_grad_rows, SFX)(const int64_t *crow, const int32_t *cols, int64_t rows, const T *g, const T *v,
                              int64_t width, const T *k, int64_t kwidth, T *ds, T *dq, int n_threads) {
    CAT(rows_ctx, SFX) c = {crow, cols, g, v, k, width, kwidth, ds, dq};
    parallel_for(rows, 8, n_threads, CAT(grad_rows_range, SFX), &c);
}

typedef struct {
    const int64_t *kptr;
    const int32_t *krow;
    const T *kds, *kp, *q, *g;
    int64_t kwidth, width;
    T *dk, *dv;
} CAT(keys_ctx, SFX);

static void CAT(grad_keys_range, SFX)(void *p, int64_t begin, int64_t end) {
    CAT(keys_ctx, SFX) *c = p;
    const int64_t w = c->width, kw = c->kwidth;
    for (int64_t j = begin; j < end; j++) {
        T *dk = c->dk ? c->dk + j * kw : NULL;
        T *dv = c->dv ? c->dv + j * w : NULL;
        for (int64_t e = c->kptr[j]; e < c->kptr[j + 1]; e++) {
            const int64_t r = c->krow[e];
            if (dk) {
                const T a = c->kds[e], *qr = c->q + r * kw;
                for (int64_t d = 0; d < kw; d++) dk[d] += a * qr[d];
            }
            if (dv) {
                const T a = c->kp[e], *gr = c->g + r * w;
                for (int64_t d = 0; d < w; d++) dv[d] += a * gr[d];
            }
        }
    }
}

/* Returns 0, or -1 when the transpose's work space cannot be allocated. */
int CAT(hspa_grad_keys, SFX)(const int64_t *crow, const int32_t *cols, const T *vals, const T *ds, int64_t rows,
                             int64_t length, const T *q, int64_t kwidth, const T *g, int64_t width, T *dk,
                             T *dv, int n_threads) {
    const int64_t nnz = crow[rows];
    const size_t entries = (size_t)(nnz ? nnz : 1);
    int64_t *kptr = calloc((size_t)length + 1, sizeof(int64_t));
    int64_t *fill = malloc(((size_t)length + 1) * sizeof(int64_t));
    int32_t *krow = malloc(entries * sizeof(int32_t));
    T *kds = malloc(entries * sizeof(T)), *kp = malloc(entries * sizeof(T));
    int status = -1;
    if (kptr && fill && krow && kds && kp) {
        for (int64_t e = 0; e < nnz; e++) kptr[cols[e] + 1]++;
        for (int64_t j = 0; j < length; j++) kptr[j + 1] += kptr[j];
        memcpy(fill, kptr, ((size_t)length + 1) * sizeof(int64_t));
        for (int64_t i = 0; i < rows; i++)
            for (int64_t e = crow[i]; e < crow[i + 1]; e++) {
                const int64_t slot = fill[cols[e]]++;
                krow[slot] = (int32_t)i;
                kds[slot] = ds[e];
                kp[slot] = vals[e];
            }
        CAT(keys_ctx, SFX) c = {kptr, krow, kds, kp, q, g, kwidth, width, dk, dv};
        parallel_for(length, 16, n_threads, CAT(grad_keys_range, SFX), &c);
        status = 0;
    }
    free(kptr);
    free(fill);
    free(krow);
    free(kds);
    free(kp);
    return status;
}

#undef T
#undef W
#undef VEC
#undef IVEC
#undef UVEC
#endif
