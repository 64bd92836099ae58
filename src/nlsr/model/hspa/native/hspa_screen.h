/* Screening of the float32 scores with bf16 products, for CPUs with AVX512-BF16 (one VDPBF16PS does the
 * products of two channels, twice the work of a float32 FMA), exact all the same. Included by hspa_kernel.c
 * into its float32 kernels (T float, W 16, suffix f32) after score_block.
 *
 * The screened score of query q and key k differs from the float32 score by at most
 *     err = (2^-7 + 2^-16 + 2.2 kw 2^-24) |q| max_j |k_j|  (+ a term for flushed denormals)
 * (each factor rounded to bf16 is off by a part in 2^8; either sum by at most kw roundings; Cauchy-
 * Schwarz). Shifting every score by err shifts the threshold by err, so the screened row's lower bound
 * minus err bounds the exact threshold from below (`lower`), and every entry above it has a screened score
 * above lower - err. Only those entries are scored again in float32 (exact_score, from the row-major keys),
 * and Michelot's iteration runs on the ones above `lower`. */

/* x rounded to the nearest bf16 (ties to even), as the 16 bits kept. */
static inline uint32_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u; /* NaN */
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

/* kp16 = the keys k (length x kwidth) as bf16 pairs in the micro-kernel's tiles of 2W keys: tile t, channel
 * pair c holds (k[2W t + l][2c], k[2W t + l][2c + 1]) at kp16[(t * pairs + c) * 2W + l], zeros past the
 * length and the width. bounds[0] = max_j |k_j| and bounds[1] = max |k_jc|, rounded up (infinite where a
 * key is not finite). */
void hspa_pack_keys_bf16(const float *k, int64_t length, int64_t kwidth, uint32_t *kp16, float *bounds) {
    const int64_t lanes = 2 * W, pairs = (kwidth + 1) / 2;
    double norm = 0, big = 0;
    int finite = 1;
    for (int64_t j = 0; j < length; j++) {
        double sq = 0;
        for (int64_t c = 0; c < kwidth; c++) {
            const double x = fabs((double)k[j * kwidth + c]);
            finite &= x <= 3.4e38;
            sq += x * x;
            big = x > big ? x : big;
        }
        norm = sq > norm ? sq : norm;
    }
    for (int64_t j0 = 0; j0 < length; j0 += lanes)
        for (int64_t c = 0; c < pairs; c++)
            for (int64_t l = 0; l < lanes; l++) {
                const int64_t j = j0 + l;
                const float lo = j < length ? k[j * kwidth + 2 * c] : 0;
                const float hi = j < length && 2 * c + 1 < kwidth ? k[j * kwidth + 2 * c + 1] : 0;
                kp16[(j0 / lanes * pairs + c) * lanes + l] = bf16_bits(lo) | bf16_bits(hi) << 16;
            }
    bounds[0] = finite ? (float)(sqrt(norm) * 1.001) : INFINITY;
    bounds[1] = finite ? (float)(big * 1.001) : INFINITY;
}

/* The bound err above for query row q against keys with bounds kb; -1 where the row is not screened (a value
 * that is not finite, or scores that could reach 1e30). */
static float screen_error(const float *q, int64_t kw, const float *kb) {
    double sq = 0, big = 0;
    for (int64_t c = 0; c < kw; c++) {
        const double x = fabs((double)q[c]);
        sq += x * x;
        big = x > big ? x : big;
    }
    if (!(big * kb[1] * (double)kw <= 1e30)) return -1; /* also NaN and infinities */
    const double rel = 0x1p-7 + 0x1p-16 + 2.2 * (double)kw * 0x1p-24;
    const double flushed = (double)kw * 0x1p-126 * (1.01 * (big + kb[1]) + 2);
    return (float)((rel * sqrt(sq) * 1.001 * kb[0] + flushed) * 1.001);
}

/* Screened scores of MR query rows against one tile of 2W keys (kp16: that tile's pairs; qt: the rows' pairs
 * at qt[c * MR + r]). */
#define SCREEN_TILE(MR)                                                                                       \
    static void screen_tile_##MR(const uint32_t *qt, const uint32_t *kp, int64_t pairs, float *scores,         \
                                 int64_t stride) {                                                            \
        __m512 acc[MR][2];                                                                                    \
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();                            \
        for (int64_t c = 0; c < pairs; c++) {                                                                 \
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + c * 2 * W),                               \
                           k1 = (__m512bh)_mm512_loadu_si512(kp + c * 2 * W + W);                            \
            for (int r = 0; r < MR; r++) {                                                                    \
                const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qt[c * MR + r]);                         \
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, k0);                                              \
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, k1);                                              \
            }                                                                                                 \
        }                                                                                                     \
        for (int r = 0; r < MR; r++) {                                                                        \
            _mm512_storeu_ps(scores + r * stride, acc[r][0]);                                                 \
            _mm512_storeu_ps(scores + r * stride + W, acc[r][1]);                                             \
        }                                                                                                     \
    }
SCREEN_TILE(4)
SCREEN_TILE(6)
SCREEN_TILE(8)
SCREEN_TILE(12)
#undef SCREEN_TILE

typedef void (*screen_fn)(const uint32_t *, const uint32_t *, int64_t, float *, int64_t);

static screen_fn screen_kernel(int64_t tile_rows) {
    switch (tile_rows) {
    case 4: return screen_tile_4;
    case 6: return screen_tile_6;
    case 8: return screen_tile_8;
    case 12: return screen_tile_12;
    default: return NULL;
    }
}

/* The float32 score of query q and key k (kw channels). */
static inline float exact_score(const float *q, const float *k, int64_t kw) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < kw; c += W) {
        const __mmask16 live = kw - c >= W ? (__mmask16)0xffff : (__mmask16)((1u << (kw - c)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, q + c), _mm512_maskz_loadu_ps(live, k + c), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* The entries of sh[0..n) above cut (found as collect finds them) whose float32 score q . keys[j] is above
 * lower, into cols/vals with that score; returns their count and adds the entries scored to *candidates. */
static int64_t rescore_above(const float *sh, int64_t n, float cut, float lower, const float *subset,
                             const float *q, const float *keys, int64_t kw, int32_t *cols, float *vals,
                             int64_t *candidates) {
    const int64_t e = collect_f32(sh, n, cut, subset, cols, vals);
    *candidates += e;
    int64_t k = 0;
    for (int64_t i = 0; i < e; i++) {
        if (i + 8 < e) __builtin_prefetch(keys + (int64_t)cols[i + 8] * kw); /* keys scattered over L2 and L3 */
        const int32_t col = cols[i];
        const float x = exact_score(q, keys + (int64_t)col * kw, kw);
        cols[k] = col;
        vals[k] = x;
        k += x > lower;
    }
    return k;
}

/* Float32 scores of query q against keys[0..n) into row. */
static void exact_row(const float *q, const float *keys, int64_t kw, int64_t n, float *row) {
    for (int64_t j = 0; j < n; j++) row[j] = exact_score(q, keys + j * kw, kw);
}

/* Exact sparsemax of one row from its screened scores sh[0..n), each within err of the float32 score of
 * query q (keys: the keys, row-major): as row_sparsemax, the support left in cols/vals. Adds the entries
 * scored again to *candidates. Returns -1 where the screened row has a NaN or an infinity, or leaves no entry
 * (the caller then scores the row in float32). */
static int64_t screened_sparsemax(const float *sh, int64_t n, float err, const float *q, const float *keys,
                                  int64_t kw, float *subset, int32_t *cols, float *vals, float *tau,
                                  int64_t *candidates) {
    float mh;
    const float bound = row_bound_f32(sh, n, subset, &mh);
    if (!(mh - mh == 0) || !(bound - bound == 0)) return -1;
    const float lower = bound - err;
    const int64_t e = rescore_above(sh, n, lower - err, lower, subset, q, keys, kw, cols, vals, candidates);
    if (e == 0) return -1;
    float m = vals[0];
    for (int64_t i = 1; i < e; i++) m = vals[i] > m ? vals[i] : m;
    const float t = michelot_f32(vals, e, m, lower);
    *tau = t;
    return t == t ? keep_support_f32(cols, vals, e, t) : 0;
}

/* score_block with bf16 products: the same blocking, on the keys' and the queries' bf16 pairs. */
static void screen_block(const CAT(attend_ctx, SFX) *c, int64_t r0, int64_t rows, uint32_t *qt, float *scores,
                         int64_t stride) {
    const int64_t kw = c->kwidth, pairs = (kw + 1) / 2, mr = c->tile_rows, used = (rows + mr - 1) / mr;
    const screen_fn score = screen_kernel(mr);
    for (int64_t g = 0; g < used; g++)
        for (int64_t r = 0; r < mr; r++) {
            const float *q = c->q + (r0 + g * mr + r) * kw;
            for (int64_t d = 0; d < pairs; d++)
                qt[g * mr * pairs + d * mr + r] = g * mr + r >= rows ? 0
                    : bf16_bits(q[2 * d]) | (2 * d + 1 < kw ? bf16_bits(q[2 * d + 1]) << 16 : 0);
        }
    for (int64_t j0 = 0; j0 < c->padded; j0 += c->key_tile) {
        const int64_t j1 = j0 + c->key_tile < c->padded ? j0 + c->key_tile : c->padded;
        for (int64_t g = 0; g < used; g++)
            for (int64_t j = j0; j < j1; j += 2 * W)
                score(qt + g * mr * pairs, c->kp16 + j * pairs, pairs, scores + g * mr * stride + j, stride);
    }
}
