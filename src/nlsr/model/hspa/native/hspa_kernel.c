/* Exact sparsemax attention kernels for the CPU (HSPA), called through ctypes by model/hspa/blocked.py.
 *
 *   attend      scores, threshold, support and output fused, per block of query rows: each thread scores a
 *               few rows with its register micro-kernel over packed key panels (the blocking given by the
 *               caller, loader.choose_tiles) and thresholds them while they are in its cache; optionally it
 *               writes every row's support (column, p = s - tau) for backward.
 *   threshold   of each row: a lower bound first, the threshold of the lane-wise maxima of 16-vector groups
 *               (any subset's threshold bounds the row's from below), taken in the max pass; then one pass
 *               collects the entries above the bound (found by vector compares and appended by compress
 *               where AVX-512 has it, skipping the groups and quarter groups whose maxima are below it), and
 *               Michelot's iteration (Newton's method on sum_j max(s_j - tau, 0) = 1, which rises
 *               monotonically to the exact threshold) runs on those alone. No sort.
 *   screen      (float32 on CPUs with AVX512-BF16, hspa_screen.h) the block's scores from bf16 products at
 *               twice the rate; each row's threshold from them, widened by their error bound, and the
 *               entries near it scored again in float32: exact, and taken for the blocks after those whose
 *               rows had few candidates.
 *   grad_rows   dP on the support, the sparsemax Jacobian (dS = dP - mean over the support) and dQ.
 *   grad_keys   dK and dV, by key, through a counting-sort transpose of the supports (hspa_backward.h).
 * Rows are shared among threads in small chunks from a common counter (rows differ in cost); the threads are
 * torch's OpenMP team in a -fopenmp build, else a pool of the library's own, each with work space kept
 * between calls (hspa_pool.h).
 * This file includes itself twice to define every kernel for float (suffix f32) and double (f64).
 */
#ifndef HSPA_T
#include "hspa_args.h"
#include "hspa_pool.h"

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define GROUP 16 /* vectors per group whose lane-wise maximum joins the subset */

#define HSPA_T float
#define HSPA_I int32_t
#define SFX f32
#define HSPA_SCREENS /* the float32 kernels screen their scores in bf16 where the CPU has AVX512-BF16 */
#include "hspa_kernel.c"
#undef HSPA_SCREENS
#undef HSPA_T
#undef HSPA_I
#undef SFX

#define HSPA_T double
#define HSPA_I int64_t
#define SFX f64
#include "hspa_kernel.c"

/* 1 where the float32 kernel can screen its scores in bf16 (a build for a CPU with AVX512-BF16), else 0. */
int hspa_screens(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#else /* the kernels for one element type HSPA_T (HSPA_I: the integer of the same width) */

#define T HSPA_T
#define W (int64_t)(VBYTES / sizeof(T)) /* lanes of one vector */
typedef T CAT(vec, SFX) __attribute__((vector_size(VBYTES)));
typedef HSPA_I CAT(ivec, SFX) __attribute__((vector_size(VBYTES)));
#define VEC CAT(vec, SFX)
#define IVEC CAT(ivec, SFX)

static inline VEC CAT(load, SFX)(const T *p) { VEC v; memcpy(&v, p, sizeof v); return v; }
static inline VEC CAT(splat, SFX)(T x) { return (VEC){0} + x; } /* scalar operands broadcast */
/* Lane-wise maximum (where either lane is NaN: b's); row_bound finds NaNs by a sum instead. */
static inline VEC CAT(vmax, SFX)(VEC a, VEC b) {
    IVEC m = a > b;
    return (VEC)(((IVEC)a & m) | ((IVEC)b & ~m));
}
static inline T CAT(smax, SFX)(T a, T b) { return a > b || a != a ? a : b; } /* keeps a NaN of a or b */

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

/* Michelot's iteration on s[0..n) with maximum m from the lower bound t; returns tau. */
static T CAT(michelot, SFX)(const T *s, int64_t n, T m, T t) {
    int64_t prev = n + 1, cnt;
    for (;;) {
        T sum = CAT(masked_sum, SFX)(s, n, t, m, &cnt);
        if (cnt == 0) { t = (T)NAN; break; } /* no number above t */
        if (cnt >= prev) break;               /* the support stopped shrinking: t is exact */
        prev = cnt;
        t = m + (sum - (T)1) / (T)cnt;
    }
    return t;
}

/* The row's maximum (*max; NaN when the row has a NaN) and a lower bound of its threshold: the threshold of
 * the lane-wise maxima of its GROUP-vector groups. subset (from subset_buffer; NULL: the bound is m - 1)
 * gets those maxima (groups x W entries), then the lane-wise maxima of each quarter of every group (4 x
 * groups x W), which collect reads. The maxima are trees (short dependency chains; the pass reads the
 * scores from L2 at its bandwidth); a NaN shows in the row's sum, which sends the row to a scalar search. */
static T CAT(row_bound, SFX)(const T *s, int64_t n, T *subset, T *max) {
    const int64_t groups = n / (W * GROUP);
    T *quarters = subset ? subset + groups * W : NULL;
    VEC best = CAT(splat, SFX)(-INFINITY), sum = CAT(splat, SFX)(0);
    int64_t j = 0;
    for (int64_t g = 0; g < groups; g++, j += W * GROUP) {
        VEC qm[4];
        for (int h = 0; h < 4; h++) {
            const T *x = s + j + h * (GROUP / 4) * W;
            const VEC x0 = CAT(load, SFX)(x), x1 = CAT(load, SFX)(x + W), x2 = CAT(load, SFX)(x + 2 * W),
                      x3 = CAT(load, SFX)(x + 3 * W);
            sum += (x0 + x1) + (x2 + x3);
            qm[h] = CAT(vmax, SFX)(CAT(vmax, SFX)(x0, x1), CAT(vmax, SFX)(x2, x3));
            if (quarters) memcpy(quarters + (4 * g + h) * W, &qm[h], sizeof qm[h]);
        }
        const VEC gm = CAT(vmax, SFX)(CAT(vmax, SFX)(qm[0], qm[1]), CAT(vmax, SFX)(qm[2], qm[3]));
        if (subset) memcpy(subset + g * W, &gm, sizeof gm);
        best = CAT(vmax, SFX)(best, gm);
    }
    T total = 0;
    for (int l = 0; l < W; l++) total += sum[l];
    if (total != total) /* a NaN score, or both infinities */
        for (int64_t i = 0; i < j; i++)
            if (s[i] != s[i]) {
                *max = s[i];
                return s[i];
            }
    T m = -INFINITY;
    for (int l = 0; l < W; l++) m = CAT(smax, SFX)(m, best[l]);
    for (; j < n; j++) m = CAT(smax, SFX)(m, s[j]);
    T t = m - (T)1;
    if (groups > 1 && subset) {
        T bound = CAT(michelot, SFX)(subset, groups * W, m, t);
        bound -= (T)1e-5 * ((T)1 + fabs((double)m)); /* covers the subset threshold's rounding */
        t = bound > t ? bound : t;
    }
    *max = m;
    return t;
}

/* The calling thread's work space for row_bound's maxima (NULL: none needed, or no memory). */
static T *CAT(subset_buffer, SFX)(int64_t n) {
    const int64_t groups = n / (W * GROUP);
    return groups > 1 ? workspace(WS_SUBSET, (size_t)groups * 5 * W * sizeof(T)) : NULL;
}

/* Appends the entries of the `count` vectors at s (column `first` on) above t to cols/vals from e on. */
static int64_t CAT(collect_vectors, SFX)(const T *s, int64_t first, int64_t count, T t, int32_t *cols, T *vals,
                                         int64_t e) {
    for (int64_t h = 0; h < count * W; h += W)
        e = CAT(append_above, SFX)(s + h, NULL, (int32_t)(first + h), (int)W, t, 0, cols, vals, e);
    return e;
}

/* The entries of s[0..n) above t: columns to cols, values to vals (room for n + 1 + W); returns their count.
 * Groups, and quarters of groups, whose lane-wise maxima (subset, from row_bound; NULL: none) are all at
 * most t are skipped. */
static int64_t CAT(collect, SFX)(const T *s, int64_t n, T t, const T *subset, int32_t *cols, T *vals) {
    const int64_t groups = subset && n / (W * GROUP) > 1 ? n / (W * GROUP) : 0;
    int64_t e = 0, j = 0;
    for (int64_t g = 0; g < groups; g++, j += W * GROUP) {
        if (!CAT(above, SFX)(subset + g * W, t)) continue;
        for (int h = 0; h < 4; h++)
            if (CAT(above, SFX)(subset + (groups + 4 * g + h) * W, t)) {
                const int64_t at = j + h * (GROUP / 4) * W;
                e = CAT(collect_vectors, SFX)(s + at, at, GROUP / 4, t, cols, vals, e);
            }
    }
    e = CAT(collect_vectors, SFX)(s + j, j, (n - j) / W, t, cols, vals, e);
    for (j += (n - j) / W * W; j < n; j++) { cols[e] = (int32_t)j; vals[e] = s[j]; e += s[j] > t; }
    return e;
}

/* Keeps the entries of cols/vals[0..e) above t, in place, as columns and weights vals - t; returns their count. */
static int64_t CAT(keep_support, SFX)(int32_t *cols, T *vals, int64_t e, T t) {
    int64_t k = 0;
    for (int64_t i = 0; i < e; i += W) /* k <= i: the stores precede what is still to be read */
        k = CAT(append_above, SFX)(vals + i, cols + i, 0, e - i < W ? (int)(e - i) : (int)W, t, t, cols, vals, k);
    return k;
}

/* Exact sparsemax of score row s[0..n): sets *tau (NaN for a row with no number above the bound) and leaves
 * the support in cols/vals (work space of n + 1 + W entries) as columns and weights s - tau; returns its size
 * and adds the entries above the lower bound to *candidates.
 * Michelot's passes run over the entries above the lower bound only. */
static int64_t CAT(row_sparsemax, SFX)(const T *s, int64_t n, T *subset, int32_t *cols, T *vals, T *tau,
                                       int64_t *candidates) {
    T m;
    const T bound = CAT(row_bound, SFX)(s, n, subset, &m);
    if (m != m) { /* a NaN score: a NaN row, as sparsemax over the whole row gives */
        *tau = (T)NAN;
        return 0;
    }
    const int64_t e = CAT(collect, SFX)(s, n, bound, subset, cols, vals);
    *candidates += e;
    const T t = CAT(michelot, SFX)(vals, e, m, bound);
    *tau = t;
    return t == t ? CAT(keep_support, SFX)(cols, vals, e, t) : 0;
}

/* o[0..NV W) = sum over the k entries of vals[e] * v[cols[e]][0..NV W), the NV vector sums in registers. */
#define OUTPUT_CHUNK(NV)                                                                                      \
    static void CAT(CAT(output_chunk, NV), SFX)(const int32_t *cols, const T *vals, int64_t k, T zero,          \
                                                const T *v, int64_t w, T *o) {                                \
        VEC acc[NV];                                                                                          \
        for (int i = 0; i < NV; i++) acc[i] = CAT(splat, SFX)(zero);                                          \
        for (int64_t e = 0; e < k; e++) {                                                                     \
            const VEC p = CAT(splat, SFX)(vals[e]);                                                           \
            const T *vr = v + (int64_t)cols[e] * w;                                                           \
            for (int i = 0; i < NV; i++) acc[i] += p * CAT(load, SFX)(vr + i * W);                            \
        }                                                                                                     \
        memcpy(o, acc, sizeof acc);                                                                           \
    }
OUTPUT_CHUNK(1)
OUTPUT_CHUNK(2)
OUTPUT_CHUNK(3)
OUTPUT_CHUNK(4)
#undef OUTPUT_CHUNK

/* o[0..w) = sum over the k entries of vals[e] * v[cols[e]] (NaN for a NaN threshold t): up to four vectors
 * of columns per sweep over the entries, their sums in registers. */
static void CAT(row_output, SFX)(const int32_t *cols, const T *vals, int64_t k, T t, const T *v, int64_t w,
                                 T *o) {
    const T zero = t == t ? (T)0 : (T)NAN;
    int64_t d0 = 0;
    for (; d0 + W <= w; d0 += 4 * W) {
        switch ((w - d0) / W) {
        case 1: CAT(output_chunk_1, SFX)(cols, vals, k, zero, v + d0, w, o + d0); break;
        case 2: CAT(output_chunk_2, SFX)(cols, vals, k, zero, v + d0, w, o + d0); break;
        case 3: CAT(output_chunk_3, SFX)(cols, vals, k, zero, v + d0, w, o + d0); break;
        default: CAT(output_chunk_4, SFX)(cols, vals, k, zero, v + d0, w, o + d0);
        }
    }
    for (d0 = w / W * W; d0 < w; d0++) {
        T acc = zero;
        for (int64_t e = 0; e < k; e++) acc += vals[e] * v[(int64_t)cols[e] * w + d0];
        o[d0] = acc;
    }
}

#include "hspa_score.h"

typedef struct {
    const T *q, *kp, *v;
    const uint32_t *kp16;  /* the keys in bf16 (hspa_pack_keys_bf16) where the kernel screens, else NULL */
    const float *keys;     /* the keys, row-major (length x kwidth), where it screens */
    const float *kbounds;  /* their bounds from hspa_pack_keys_bf16 */
    int screen;            /* 0: never; 1: where it pays (see attend_thread); 2: every block */
    int64_t rows, length, padded, kwidth, width, block_rows, tile_rows, key_tile;
    T *out;                /* rows x width, or NULL */
    int32_t *sup_cols;     /* supports: NULL, or room for `capacity` entries */
    T *sup_vals;
    int64_t capacity, *start, *nnz;
    int64_t next, entries; /* first query row of the next block; support entries taken */
    int failed;
} CAT(attend_ctx, SFX);

/* Scores of the block's query rows r0 .. r0 + rows - 1 into scores (rows `stride` apart). The queries are
 * packed per group of mr rows as the micro-kernel reads them (zero rows pad); key panels of key_tile columns
 * outside, row groups inside: each panel is read from memory once per block and then from the cache. */
static void CAT(score_block, SFX)(const CAT(attend_ctx, SFX) *c, int64_t r0, int64_t rows, T *qt, T *scores,
                                  int64_t stride) {
    const int64_t kw = c->kwidth, mr = c->tile_rows, used = (rows + mr - 1) / mr;
    const CAT(score_fn, SFX) score = CAT(score_kernel, SFX)(mr);
    for (int64_t g = 0; g < used; g++)
        for (int64_t r = 0; r < mr; r++)
            for (int64_t d = 0; d < kw; d++)
                qt[g * mr * kw + d * mr + r] = g * mr + r < rows ? c->q[(r0 + g * mr + r) * kw + d] : 0;
    for (int64_t j0 = 0; j0 < c->padded; j0 += c->key_tile) {
        const int64_t j1 = j0 + c->key_tile < c->padded ? j0 + c->key_tile : c->padded;
        for (int64_t g = 0; g < used; g++)
            for (int64_t j = j0; j < j1; j += 2 * W)
                score(qt + g * mr * kw, c->kp + j * kw, kw, scores + g * mr * stride + j, stride);
    }
}

#if defined(HSPA_SCREENS) && defined(__AVX512BF16__)
#define SCREENING
#include "hspa_screen.h"
#endif

/* Query row `row`'s output and support from its threshold t and its k support entries in cols/vals. */
static void CAT(finish_row, SFX)(CAT(attend_ctx, SFX) *c, int64_t row, const int32_t *cols, const T *vals,
                                 int64_t k, T t) {
    if (c->out) CAT(row_output, SFX)(cols, vals, k, t, c->v, c->width, c->out + row * c->width);
    if (c->start) {
        const int64_t at = __atomic_fetch_add(&c->entries, k, __ATOMIC_RELAXED);
        c->nnz[row] = k;
        c->start[row] = at + k <= c->capacity ? at : -1;
        if (at + k <= c->capacity) {
            memcpy(c->sup_cols + at, cols, (size_t)k * sizeof(int32_t));
            memcpy(c->sup_vals + at, vals, (size_t)k * sizeof(T));
        }
    }
}

static void CAT(attend_thread, SFX)(void *p) {
    CAT(attend_ctx, SFX) *c = p;
    const int64_t n = c->length, np = c->padded, kw = c->kwidth, mr = c->tile_rows;
    const int64_t groups = (c->block_rows + mr - 1) / mr;
    /* Score rows one cache line longer than the keys: rows a power of two apart would share cache sets. */
    const int64_t stride = np + 64 / (int64_t)sizeof(T);
    T *scores = workspace(WS_SCORES, (size_t)(groups * mr) * stride * sizeof(T));
    T *qt = workspace(WS_QUERIES, (size_t)(groups * mr) * kw * sizeof(T));
    T *subset = CAT(subset_buffer, SFX)(n);
    int32_t *cols = workspace(WS_COLS, (size_t)(n + 1 + W) * sizeof(int32_t));
    T *vals = workspace(WS_VALS, (size_t)(n + 1 + W) * sizeof(T));
    const int failed = !scores || !qt || !cols || !vals || (n / (W * GROUP) > 1 && !subset);
#ifdef SCREENING
    int screen_next = 1;
#endif
    if (failed) {
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (;;) {
        const int64_t r0 = __atomic_fetch_add(&c->next, c->block_rows, __ATOMIC_RELAXED);
        if (r0 >= c->rows) break;
        const int64_t rows = r0 + c->block_rows <= c->rows ? c->block_rows : c->rows - r0;
#ifdef SCREENING
        const int screened = c->kp16 && (c->screen == 2 || screen_next);
        if (screened)
            screen_block(c, r0, rows, (uint32_t *)qt, scores, stride);
        else
#endif
            CAT(score_block, SFX)(c, r0, rows, qt, scores, stride);
        int64_t candidates = 0; /* entries above the rows' lower bounds */
        for (int64_t i = 0; i < rows; i++) {
            T t;
            int64_t k = -1;
#ifdef SCREENING
            if (screened) {
                const float *q = c->q + (r0 + i) * kw, err = screen_error(q, kw, c->kbounds);
                if (err >= 0)
                    k = screened_sparsemax(scores + i * stride, n, err, q, c->keys, kw, subset, cols, vals, &t,
                                           &candidates);
                if (k < 0) exact_row(q, c->keys, kw, n, scores + i * stride);
            }
#endif
            if (k < 0) k = CAT(row_sparsemax, SFX)(scores + i * stride, n, subset, cols, vals, &t, &candidates);
            CAT(finish_row, SFX)(c, r0 + i, cols, vals, k, t);
        }
#ifdef SCREENING
        /* Screening saves about 40% of the scoring (n kw products a row) and costs about kw + 160 products for
         * each entry scored again (about the candidates): the next block screens where that pays three times
         * over, since a block can have many more candidates than the one before it (break-even: 4). */
        screen_next = 12 * candidates * (kw + 160) < rows * n * kw;
#endif
    }
}

/* kp = the keys k (length x kwidth) packed as the micro-kernel reads them: in tiles of two vectors of keys,
 * channel-major inside a tile (tile t holds k[2W t + l][c] at kp[2W t kwidth + 2W c + l]), zero keys up to
 * the next multiple of 2W. */
void CAT(hspa_pack_keys, SFX)(const T *k, int64_t length, int64_t kwidth, T *kp) {
    const int64_t lanes = 2 * W;
    for (int64_t j0 = 0; j0 < length; j0 += lanes)
        for (int64_t c = 0; c < kwidth; c++)
            for (int64_t l = 0; l < lanes; l++)
                kp[j0 * kwidth + c * lanes + l] = j0 + l < length ? k[(j0 + l) * kwidth + c] : 0;
}

/* sparsemax(q k^T) v for `rows` query rows q (rows x kwidth) over `length` keys, packed in kp by
 * hspa_pack_keys, and their values v (length x width), into out (rows x width; NULL: not wanted). Each
 * thread takes block_rows query rows at a time, scores them with its micro-kernel of tile_rows rows (4, 6, 8
 * or 12) over panels of key_tile keys (a multiple of 2W) and thresholds them while they are in its cache.
 * screen (float32 with AVX512-BF16 only; kp16 and kbounds from hspa_pack_keys_bf16, keys the keys row-major):
 * 0 scores in float32; 1 screens in bf16 the blocks after those whose rows had few candidates; 2 screens every
 * block (hspa_screen.h). With start (not NULL), row i's support goes to sup_cols/sup_vals (room for
 * `capacity` entries) from entry start[i] on, nnz[i] entries (columns and weights s - tau), rows in no
 * particular order; *total is the number of entries all rows need, and where that exceeds capacity the rows
 * that did not fit have start -1.
 * Returns 0; -1 without work space; -2 for a configuration the kernel does not have. */
static int CAT(attend, SFX)(const T *q, const T *kp, int64_t rows, int64_t length, int64_t kwidth, const T *v,
                            int64_t width, T *out, int64_t block_rows, int64_t tile_rows, int64_t key_tile,
                            int screen, const uint32_t *kp16, const float *keys, const float *kbounds,
                            int32_t *sup_cols, T *sup_vals, int64_t capacity, int64_t *start, int64_t *nnz,
                            int64_t *total, int n_threads) {
    const int64_t lanes = 2 * W, padded = (length + lanes - 1) / lanes * lanes;
    if (block_rows < 1 || key_tile < 1 || key_tile % lanes || !CAT(score_kernel, SFX)(tile_rows)) return -2;
#ifdef SCREENING
    if (screen < 0 || screen > 2 || (screen && (!kp16 || !keys || !kbounds))) return -2;
#else
    if (screen != 0) return -2;
#endif
    CAT(attend_ctx, SFX) c = {q, kp, v, screen ? kp16 : NULL, keys, kbounds, screen, rows, length, padded,
                              kwidth, width, block_rows, tile_rows, key_tile, out, sup_cols, sup_vals, capacity,
                              start, nnz, 0, 0, 0};
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    run_threads(n_threads < blocks ? n_threads : (int)blocks, CAT(attend_thread, SFX), &c);
    if (total) *total = c.entries;
    return c.failed || c.next < rows ? -1 : 0;
}

/* attend with its arguments in one structure (hspa_args.h): the entry point ctypes calls. */
int CAT(hspa_attend, SFX)(const hspa_attend_args *a) {
    return CAT(attend, SFX)(a->q, a->kp, a->rows, a->length, a->kwidth, a->v, a->width, a->out, a->block_rows,
                            a->tile_rows, a->key_tile, (int)a->screen, a->kp16, a->keys, a->kbounds, a->sup_cols,
                            a->sup_vals, a->capacity, a->start, a->nnz, a->total, (int)a->n_threads);
}

#include "hspa_backward.h"

#undef SCREENING
#undef T
#undef W
#undef VEC
#undef IVEC
#endif
