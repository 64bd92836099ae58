/* The parts of hspa_kernel.c that do not depend on the element type: the vector width of the build, the
 * threads (torch's OpenMP team in a -fopenmp build, else a process-wide pool of their own) with
 * parallel_for, per-thread work space, cache sizes and lane masks. */
#ifndef HSPA_POOL_H
#define HSPA_POOL_H
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

#ifdef _OPENMP
#include <omp.h>

/* Runs fn(ctx) on n_threads threads of the OpenMP runtime the library is linked with: torch's own when the
 * loader builds with -fopenmp (the same libgomp), so the kernel runs on torch's threads, which are awake
 * after torch's ops, instead of competing with them. At most omp_get_max_threads() (torch.set_num_threads,
 * 1 in DataLoader workers); fn shares the work itself. The team is always the whole one (a smaller team
 * makes libgomp end torch's other threads, to start them again for torch's next op); the threads beyond
 * n_threads return at once. */
static void run_threads(int n_threads, thread_fn fn, void *ctx) {
    const int team = omp_get_max_threads();
    if (n_threads > team) n_threads = team;
    if (n_threads <= 1 || omp_in_parallel()) {
        fn(ctx);
        return;
    }
#pragma omp parallel num_threads(team)
    if (omp_get_thread_num() < n_threads) fn(ctx);
}

#else
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

#endif

/* Per-thread work space, kept between calls (no page faults of fresh allocations in every call) and freed
 * when its thread ends. */
enum { WS_SCORES, WS_QUERIES, WS_SUBSET, WS_COLS, WS_VALS, WS_SLOTS };
static __thread void *ws_ptr[WS_SLOTS];
static __thread size_t ws_cap[WS_SLOTS];
static pthread_key_t ws_key;
static pthread_once_t ws_once = PTHREAD_ONCE_INIT;

static void ws_free(void *unused) {
    (void)unused;
    for (int i = 0; i < WS_SLOTS; i++) {
        free(ws_ptr[i]);
        ws_ptr[i] = NULL;
        ws_cap[i] = 0;
    }
}

static void ws_key_create(void) { pthread_key_create(&ws_key, ws_free); }

static void *workspace(int slot, size_t bytes) {
    if (ws_cap[slot] < bytes) {
        void *p = NULL;
        pthread_once(&ws_once, ws_key_create);
        pthread_setspecific(ws_key, &ws_once); /* any non-NULL value: ws_free runs when the thread ends */
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

/* Bit l set where lane l of x exceeds t (x: VBYTES of float or double): one instruction where the ISA has
 * it, a loop over the lanes elsewhere. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline uint32_t above_f32(const float *x, float t) {
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(x), _mm512_set1_ps(t), _CMP_GT_OQ);
}
static inline uint32_t above_f64(const double *x, double t) {
    return _mm512_cmp_pd_mask(_mm512_loadu_pd(x), _mm512_set1_pd(t), _CMP_GT_OQ);
}
#elif defined(__AVX__)
#include <immintrin.h>
static inline uint32_t above_f32(const float *x, float t) {
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), _mm256_set1_ps(t), _CMP_GT_OQ));
}
static inline uint32_t above_f64(const double *x, double t) {
    return (uint32_t)_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(x), _mm256_set1_pd(t), _CMP_GT_OQ));
}
#else
static inline uint32_t above_f32(const float *x, float t) {
    uint32_t bits = 0;
    for (int l = 0; l < VBYTES / 4; l++) bits |= (uint32_t)(x[l] > t) << l;
    return bits;
}
static inline uint32_t above_f64(const double *x, double t) {
    uint32_t bits = 0;
    for (int l = 0; l < VBYTES / 8; l++) bits |= (uint32_t)(x[l] > t) << l;
    return bits;
}
#endif

/* append_above_f32/_f64(x, cols_in, first, lanes, t, sub, cols, vals, e): appends x[l] - sub for each of the
 * first `lanes` lanes of x above t, with its column (cols_in[l], or first + l where cols_in is NULL), at
 * vals/cols + e; returns the new e. x may be vals + i and cols_in cols + i for i >= e (compaction in
 * place). With AVX-512 one compress each, stored as whole vectors: room for a vector past e is needed. */
#if defined(__AVX512F__) && defined(__AVX512VL__)
static inline int64_t append_above_f32(const float *x, const int32_t *cols_in, int32_t first, int lanes, float t,
                                       float sub, int32_t *cols, float *vals, int64_t e) {
    const __mmask16 live = (__mmask16)((1u << lanes) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(live, x);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(live, v, _mm512_set1_ps(t), _CMP_GT_OQ);
    const __m512i c = cols_in ? _mm512_maskz_loadu_epi32(live, cols_in)
                              : _mm512_add_epi32(_mm512_set1_epi32(first), _mm512_setr_epi32(
                                    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    _mm512_storeu_ps(vals + e, _mm512_maskz_compress_ps(m, _mm512_sub_ps(v, _mm512_set1_ps(sub))));
    _mm512_storeu_si512(cols + e, _mm512_maskz_compress_epi32(m, c));
    return e + __builtin_popcount(m);
}
static inline int64_t append_above_f64(const double *x, const int32_t *cols_in, int32_t first, int lanes,
                                       double t, double sub, int32_t *cols, double *vals, int64_t e) {
    const __mmask8 live = (__mmask8)((1u << lanes) - 1);
    const __m512d v = _mm512_maskz_loadu_pd(live, x);
    const __mmask8 m = _mm512_mask_cmp_pd_mask(live, v, _mm512_set1_pd(t), _CMP_GT_OQ);
    const __m256i c = cols_in ? _mm256_maskz_loadu_epi32(live, cols_in)
                              : _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm512_storeu_pd(vals + e, _mm512_maskz_compress_pd(m, _mm512_sub_pd(v, _mm512_set1_pd(sub))));
    _mm256_storeu_si256((__m256i *)(cols + e), _mm256_maskz_compress_epi32(m, c));
    return e + __builtin_popcount(m);
}
#else
/* A bit scan of the lanes above t; each store precedes the lanes still to be read. */
#define APPEND_ABOVE(T, SFX)                                                                                  \
    static inline int64_t append_above_##SFX(const T *x, const int32_t *cols_in, int32_t first, int lanes, T t, \
                                             T sub, int32_t *cols, T *vals, int64_t e) {                      \
        uint32_t bits = 0;                                                                                    \
        if (lanes == (int)(VBYTES / sizeof(T)))                                                               \
            bits = above_##SFX(x, t);                                                                         \
        else                                                                                                  \
            for (int l = 0; l < lanes; l++) bits |= (uint32_t)(x[l] > t) << l;                                \
        for (; bits; bits &= bits - 1) {                                                                      \
            const int l = __builtin_ctz(bits);                                                                \
            const int32_t col = cols_in ? cols_in[l] : first + l;                                             \
            vals[e] = x[l] - sub;                                                                             \
            cols[e++] = col;                                                                                  \
        }                                                                                                     \
        return e;                                                                                             \
    }
APPEND_ABOVE(float, f32)
APPEND_ABOVE(double, f64)
#undef APPEND_ABOVE
#endif

#endif
