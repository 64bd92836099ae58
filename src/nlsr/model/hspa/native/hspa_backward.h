/* Backward of the fused kernel on the supports it wrote (grad_rows, grad_keys), for one element type:
 * included by hspa_kernel.c once per type, with T, W, VEC, CAT and SFX defined there. */
typedef struct {
    const int64_t *start, *nnz;
    const int32_t *cols;
    const T *g, *v, *k;
    int64_t width, kwidth;
    T *ds, *dq;
} CAT(rows_ctx, SFX);

static void CAT(grad_rows_range, SFX)(void *p, int64_t begin, int64_t end) {
    CAT(rows_ctx, SFX) *c = p;
    const int64_t w = c->width, kw = c->kwidth;
    for (int64_t i = begin; i < end; i++) {
        const int64_t e0 = c->start[i], e1 = e0 + c->nnz[i];
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

/* Row i's support: entries start[i] .. start[i] + nnz[i] of cols (and of ds, which gets dS there). */
static void CAT(grad_rows, SFX)(const int64_t *start, const int64_t *nnz, const int32_t *cols, int64_t rows,
                                const T *g, const T *v, int64_t width, const T *k, int64_t kwidth, T *ds, T *dq,
                                int n_threads) {
    CAT(rows_ctx, SFX) c = {start, nnz, cols, g, v, k, width, kwidth, ds, dq};
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

/* The supports as in grad_rows (all entries start[i] + [0, nnz[i]) together fill [0, sum of nnz)).
 * Returns 0, or -1 when the transpose's work space cannot be allocated. */
static int CAT(grad_keys, SFX)(const int64_t *start, const int64_t *nnz, const int32_t *cols, const T *vals,
                               const T *ds, int64_t rows, int64_t length, const T *q, int64_t kwidth, const T *g,
                               int64_t width, T *dk, T *dv, int n_threads) {
    int64_t entries = 0;
    for (int64_t i = 0; i < rows; i++) entries += nnz[i];
    int64_t *kptr = calloc((size_t)length + 1, sizeof(int64_t));
    int64_t *fill = malloc(((size_t)length + 1) * sizeof(int64_t));
    int32_t *krow = malloc((size_t)(entries ? entries : 1) * sizeof(int32_t));
    T *kds = malloc((size_t)(entries ? entries : 1) * sizeof(T)), *kp = malloc((size_t)(entries ? entries : 1) * sizeof(T));
    int status = -1;
    if (kptr && fill && krow && kds && kp) {
        for (int64_t e = 0; e < entries; e++) kptr[cols[e] + 1]++;
        for (int64_t j = 0; j < length; j++) kptr[j + 1] += kptr[j];
        memcpy(fill, kptr, ((size_t)length + 1) * sizeof(int64_t));
        for (int64_t i = 0; i < rows; i++) /* by row, so each key's entries keep the rows' order */
            for (int64_t e = start[i]; e < start[i] + nnz[i]; e++) {
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

/* grad_rows and grad_keys with their arguments in one structure (hspa_args.h): the entry points ctypes calls. */
void CAT(hspa_grad_rows, SFX)(const hspa_grad_rows_args *a) {
    CAT(grad_rows, SFX)(a->start, a->nnz, a->cols, a->rows, a->g, a->v, a->width, a->k, a->kwidth, a->ds, a->dq,
                        (int)a->n_threads);
}

int CAT(hspa_grad_keys, SFX)(const hspa_grad_keys_args *a) {
    return CAT(grad_keys, SFX)(a->start, a->nnz, a->cols, a->vals, a->ds, a->rows, a->length, a->q, a->kwidth, a->g,
                               a->width, a->dk, a->dv, (int)a->n_threads);
}
