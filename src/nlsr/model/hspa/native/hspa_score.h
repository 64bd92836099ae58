/* The register micro-kernels of the float32 and float64 scores (included by hspa_kernel.c for each element
 * type T, W lanes a vector). */

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
