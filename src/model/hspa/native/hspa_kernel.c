/* Exact sparsemax attention kernels for the CPU (HSPA), called through ctypes by model/hspa/blocked.py.
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
 *   attend      inference: scores, threshold and output fused, per block of rows, with the blocking
 *               (block rows, micro-kernel rows, key panel) given by the caller (loader.choose_tiles).
 * Rows are shared among threads in small chunks from a common counter (rows differ in cost); the threads
 * are a pool kept for the life of the process, each with work space kept between calls.
 * This file includes itself twice to define every kernel for float (suffix f32) and double (f64).
 */
#ifndef HSPA_T
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Vector width of the target: the kernels use as many vector registers as the ISA has, no more. */
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16 /* SSE2, NEON and the rest */
#endif
#define MAX_THREADS 64

typedef void (*thread_fn)(void *ctx);

/* One process-wide pool of worker threads, started on first use and kept: a call wakes them (a condition
 * variable, no spinning, so cores shared with other work are not burnt) instead of creating threads. */
typedef struct {
    pthread_mutex_t lock; /* guards every field below */
    pthread_cond_t start, finish;
    pthread_mutex_t busy; /* held by the caller whose job the pool runs; other callers run alone */
    thread_fn fn;
    void *ctx;
    int started, wanted, running;
    uint64_t job;
    uint64_t first_job[MAX_THREADS]; /* per worker: the job counter when it was created (it waits for the next) */
} worker_pool;

static worker_pool pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
                           PTHREAD_MUTEX_INITIALIZER, NULL, NULL, 0, 0, 0, 0, {0}};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

/* A forked child (DataLoader workers) has none of the parent's threads: it starts an empty pool. */
static void pool_after_fork(void) {
    worker_pool fresh = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
                         PTHREAD_MUTEX_INITIALIZER, NULL, NULL, 0, 0, 0, 0, {0}};
    pool = fresh;
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static void *worker_main(void *p) {
    const int index = (int)(intptr_t)p; /* 1, 2, ...: worker i takes part in jobs of more than i threads */
    pthread_mutex_lock(&pool.lock);
    uint64_t seen = pool.first_job[index];
    for (;;) {
        while (pool.job == seen) pthread_cond_wait(&pool.start, &pool.lock);
        seen = pool.job;
        if (index > pool.wanted) continue;
        thread_fn fn = pool.fn;
        void *ctx = pool.ctx;
        pthread_mutex_unlock(&pool.lock);
        fn(ctx);
        pthread_mutex_lock(&pool.lock);
        if (--pool.running == 0) pthread_cond_signal(&pool.finish);
    }
    return NULL;
}

/* Runs fn(ctx) on n_threads threads (the calling thread is one of them); fn shares the work itself. */
static void run_threads(int n_threads, thread_fn fn, void *ctx) {
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    pthread_once(&pool_once, pool_init);
    if (n_threads <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        fn(ctx);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    while (pool.started < n_threads - 1) {
        pthread_t t;
        pool.first_job[pool.started + 1] = pool.job;
        if (pthread_create(&t, NULL, worker_main, (void *)(intptr_t)(pool.started + 1)) != 0) break;
        pthread_detach(t);
        pool.started++;
    }
    pool.wanted = pool.running = n_threads - 1 < pool.started ? n_threads - 1 : pool.started;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.job++;
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.lock);
    fn(ctx);
    pthread_mutex_lock(&pool.lock);
    while (pool.running > 0) pthread_cond_wait(&pool.finish, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.busy);
}

/* Per-thread work space, kept between calls (no page faults of fresh allocations in every call). */
enum { WS_SCORES, WS_QUERIES, WS_SUBSET, WS_COLS, WS_VALS, WS_SLOTS };
static __thread void *ws_ptr[WS_SLOTS];
static __thread size_t ws_cap[WS_SLOTS];

static void *workspace(int slot, size_t bytes) {
    if (ws_cap[slot] < bytes) {
        void *p = NULL;
        free(ws_ptr[slot]);
        ws_ptr[slot] = NULL;
        ws_cap[slot] = 0;
        if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
        ws_ptr[slot] = p;
        ws_cap[slot] = bytes;
    }
    return ws_ptr[slot];
}

/* Bytes of one vector register of the build; the column tile of the score micro-kernel is two of them. */
int hspa_vector_bytes(void) { return VBYTES; }

/* L1 data and L2 cache sizes from the C library (0 where it does not say). */
void hspa_cache_sizes(int64_t *l1d, int64_t *l2) {
    long a = -1, b = -1;
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    a = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    *l1d = a > 0 ? a : 0;
    *l2 = b > 0 ? b : 0;
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
#define W (int64_t)(VBYTES / sizeof(T)) /* lanes of one vector */
typedef T CAT(vec, SFX) __attribute__((vector_size(VBYTES)));
typedef HSPA_I CAT(ivec, SFX) __attribute__((vector_size(VBYTES)));
typedef uint64_t CAT(uvec, SFX) __attribute__((vector_size(VBYTES)));
#define VEC CAT(vec, SFX)
#define IVEC CAT(ivec, SFX)
#define UVEC CAT(uvec, SFX)

static inline VEC CAT(load, SFX)(const T *p) { VEC v; memcpy(&v, p, sizeof v); return v; }
static inline VEC CAT(splat, SFX)(T x) { return (VEC){0} + x; } /* scalar operands broadcast */
static inline VEC CAT(vmax, SFX)(VEC a, VEC b) { IVEC m = a > b; return (VEC)(((IVEC)a & m) | ((IVEC)b & ~m)); }
static inline int CAT(any, SFX)(IVEC m) {
    UVEC u = (UVEC)m;
    uint64_t r = 0;
    for (int l = 0; l < VBYTES / 8; l++) r |= u[l];
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

/* The calling thread's work space for row_threshold's subset (NULL: none needed, or no memory). */
static T *CAT(subset_buffer, SFX)(int64_t n) {
    const int64_t groups = n / (W * GROUP);
    return groups > 1 ? workspace(WS_SUBSET, (size_t)groups * W * sizeof(T)) : NULL;
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
    const T *q, *kp, *v;
    int64_t length, padded, kwidth, width, block_rows, tile_rows, key_tile;
    T *out;
    int64_t next; /* first query row of the next block */
    int failed;
} CAT(attend_ctx, SFX);

/* scores[r][j] = q[r] . k[j] for MR query rows and the 2W keys of one packed tile: kp holds k[j0 + l][c]
 * at kp[c * 2W + l], qt holds q[r][c] at qt[c * MR + r]; the MR x 2 accumulators stay in registers. */
#define SCORE_TILE(MR)                                                                                        \
    static void CAT(CAT(score_tile, MR), SFX)(const T *qt, const T *kp, int64_t kwidth, T *scores,              \
                                              int64_t stride) {                                               \
        VEC acc[MR][2];                                                                                       \
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = CAT(splat, SFX)(0);                             \
        for (int64_t c = 0; c < kwidth; c++) {                                                                \
            const VEC k0 = CAT(load, SFX)(kp + c * 2 * W), k1 = CAT(load, SFX)(kp + c * 2 * W + W);          \
            for (int r = 0; r < MR; r++) {                                                                    \
                const VEC a = CAT(splat, SFX)(qt[c * MR + r]);                                               \
                acc[r][0] += a * k0;                                                                          \
                acc[r][1] += a * k1;                                                                          \
            }                                                                                                 \
        }                                                                                                     \
        for (int r = 0; r < MR; r++) {                                                                        \
            memcpy(scores + r * stride, &acc[r][0], sizeof(VEC));                                             \
            memcpy(scores + r * stride + W, &acc[r][1], sizeof(VEC));                                         \
        }                                                                                                     \
    }
SCORE_TILE(4)
SCORE_TILE(6)
SCORE_TILE(8)
SCORE_TILE(12)
#undef SCORE_TILE

typedef void (*CAT(score_fn, SFX))(const T *, const T *, int64_t, T *, int64_t);

static CAT(score_fn, SFX) CAT(score_kernel, SFX)(int64_t tile_rows) {
    switch (tile_rows) {
    case 4: return CAT(score_tile_4, SFX);
    case 6: return CAT(score_tile_6, SFX);
    case 8: return CAT(score_tile_8, SFX);
    case 12: return CAT(score_tile_12, SFX);
    default: return NULL;
    }
}

static void CAT(attend_thread, SFX)(void *p) {
    CAT(attend_ctx, SFX) *c = p;
    const int64_t n = c->length, np = c->padded, kw = c->kwidth, mr = c->tile_rows;
    const int64_t groups = (c->block_rows + mr - 1) / mr;
    /* Score rows one cache line longer than the keys: rows a power of two apart would share cache sets. */
    const int64_t stride = np + 64 / (int64_t)sizeof(T);
    const CAT(score_fn, SFX) score = CAT(score_kernel, SFX)(mr);
    T *scores = workspace(WS_SCORES, (size_t)(groups * mr) * stride * sizeof(T));
    T *qt = workspace(WS_QUERIES, (size_t)(groups * mr) * kw * sizeof(T));
    T *subset = CAT(subset_buffer, SFX)(n);
    int32_t *cols = workspace(WS_COLS, (size_t)n * sizeof(int32_t));
    T *vals = workspace(WS_VALS, (size_t)n * sizeof(T));
    if (!scores || !qt || !cols || !vals || (n / (W * GROUP) > 1 && !subset)) {
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (;;) {
        const int64_t r0 = __atomic_fetch_add(&c->next, c->block_rows, __ATOMIC_RELAXED);
        if (r0 >= n) break;
        const int64_t rows = r0 + c->block_rows <= n ? c->block_rows : n - r0;
        const int64_t used = (rows + mr - 1) / mr;
        /* The block's queries, packed per group of mr rows as the micro-kernel reads them (zero rows pad). */
        for (int64_t g = 0; g < used; g++)
            for (int64_t r = 0; r < mr; r++) {
                const int64_t row = g * mr + r;
                for (int64_t d = 0; d < kw; d++) qt[g * mr * kw + d * mr + r] = row < rows ? c->q[(r0 + row) * kw + d] : 0;
            }
        /* Key panels of key_tile columns outside, row groups inside: each panel is read from memory once
         * per block and then from the L1 cache. */
        for (int64_t j0 = 0; j0 < np; j0 += c->key_tile) {
            const int64_t j1 = j0 + c->key_tile < np ? j0 + c->key_tile : np;
            for (int64_t g = 0; g < used; g++)
                for (int64_t j = j0; j < j1; j += 2 * W)
                    score(qt + g * mr * kw, c->kp + j * kw, kw, scores + g * mr * stride + j, stride);
        }
        for (int64_t i = 0; i < rows; i++) {
            const T *s = scores + i * stride;
            int64_t nnz;
            const T t = CAT(row_threshold, SFX)(s, n, subset, &nnz);
            const int64_t e = t == t ? CAT(row_support, SFX)(s, n, t, cols, vals, 0) : 0;
            CAT(row_output, SFX)(cols, vals, 0, e, t, c->v, c->width, c->out + (r0 + i) * c->width);
        }
    }
}

/* out = sparsemax(q k^T) v for one sample, keeping nothing (inference). q: (length x kwidth); kp: the keys
 * packed in tiles of 2W (two vectors) keys, tile t holding k[2W t + l][c] at kp[(2W t) kwidth + 2W c + l],
 * padded with zero keys to `padded` (a multiple of 2W) keys; v: (length x width). Each thread takes
 * block_rows query rows at a time, scores them with its micro-kernel of tile_rows rows (4, 6, 8 or 12)
 * over key panels of key_tile keys (a multiple of 2W), and thresholds them while they are in its cache.
 * Returns 0; -1 without work space; -2 for a tile configuration the kernel does not have. */
int CAT(hspa_attend, SFX)(const T *q, const T *kp, int64_t length, int64_t padded, int64_t kwidth, const T *v,
                          int64_t width, T *out, int64_t block_rows, int64_t tile_rows, int64_t key_tile,
                          int n_threads) {
    if (padded % (2 * W) || padded < length || block_rows < 1 || key_tile < 1 || key_tile % (2 * W) ||
        !CAT(score_kernel, SFX)(tile_rows))
        return -2;
    CAT(attend_ctx, SFX) c = {q, kp, v, length, padded, kwidth, width, block_rows, tile_rows, key_tile, out, 0, 0};
    const int64_t blocks = (length + block_rows - 1) / block_rows;
    run_threads(n_threads < blocks ? n_threads : (int)blocks, CAT(attend_thread, SFX), &c);
    return c.failed || c.next < length ? -1 : 0;
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
