/* The coarse pass's posterior in one sweep per image (C, OpenMP over images, loaded with ctypes).
 *
 * coarse_significant: for every image b, the log-posterior of each coarse sample (class k, translation t,
 * rotation r) is assembled in place from the pieces the GEMMs produced,
 *
 *     ll[k][b][t][r] = cross[k][b][t][r] - half_power[k][b][r] + row_const[b][k] + prior_t[b][t] (+ prior_r[b][r]),
 *
 * (cross = Re sum conj(w C X S) P, half_power = sum w C^2 |P|^2 / 2, row_const = -sum w |X|^2 / 2 + log prior of
 * class k, -inf for a class the image may not take), then its maximum m and log sum_s exp(ll_s - m) are found
 * and the smallest set of samples that holds `fraction` of the posterior (at most `cap` samples, largest
 * first, ties by index) is listed. The flat index of a sample is (k * T + t) * R + r, as for an array
 * (B, K, T, R). Samples below m - cut contribute less than exp(-cut) each and are neither exponentiated nor
 * listed: `cut` is chosen by the caller so that all of them together hold a negligible part of the posterior.
 * Only samples at or above a threshold tau are copied out for the selection: tau is the cap-th largest of the
 * maxima of disjoint buckets (each row's LANES strided lanes), so at least `cap` samples reach it and none of
 * the `cap` largest lies below it; a flat posterior (all 1.5 M samples of a 7.5 degree search within `cut`)
 * no longer sends every sample through the selection.
 * Each image is handled by one thread in a fixed order, so results do not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "threads.h"

#define LANES 8

/* eight-float vectors (GCC/Clang vector extension; unaligned loads): one AVX register, two SSE ones */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* exp(x) of eight floats, x in [-87, 0]: x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 in two parts, as Cephes' expf),
 * e^r by its degree-7 Taylor polynomial (relative error below 2e-7 on that interval), 2^n from the exponent bits */
static inline __attribute__((always_inline)) void exp8(const v8f *xp, v8f *out)
{
    v8f x = *xp;
    const v8f lo = {-87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f};
    const v8i below = (v8i)(x < lo);
    x = (v8f)((below & (v8i)lo) | (~below & (v8i)x));
    const v8f fx = x * 1.44269504088896341f + 0.5f;
    v8i n = __builtin_convertvector(fx, v8i);  /* truncation: one too high where fx < 0 and not whole */
    n -= (v8i)(__builtin_convertvector(n, v8f) > fx) & 1;
    const v8f fn = __builtin_convertvector(n, v8f);
    const v8f r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    v8f p = 1.0f / 5040.0f + r * 0.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const v8i two_n = (n + 127) << 23;
    v8f scale;
    __builtin_memcpy(&scale, &two_n, sizeof scale);
    *out = p * scale;
}

/* sum of exp(row[r] - m) over the entries row[r] >= floor_v (the others count 0), in eight float lanes added in a
 * fixed order: the same result for any vector width */
__attribute__((target_clones("avx512f", "avx2", "default")))
static double row_exp_sum(const float *row, int64_t n, float m, float floor_v)
{
    v8f acc = {0};
    int64_t r = 0;
    for (; r + LANES <= n; r += LANES) {
        const v8f v = *(const v8u *)(row + r);
        const v8i keep = (v8i)(v >= floor_v);
        int32_t any = 0;
        for (int j = 0; j < LANES; j++)
            any |= keep[j];
        if (any) {  /* most blocks of a sharp posterior lie wholly below the floor */
            const v8f x = v - m;
            v8f e;
            exp8(&x, &e);
            acc += (v8f)(keep & (v8i)e);
        }
    }
    float tail[LANES] = {0};
    for (int j = 0; r + j < n; j++)
        tail[j] = row[r + j];
    {
        v8f v;
        __builtin_memcpy(&v, tail, sizeof v);
        const v8i in = {0, 1, 2, 3, 4, 5, 6, 7};
        const v8i live = in < (v8i){0} + (int32_t)(n - r);
        const v8f x = v - m;
        v8f e;
        exp8(&x, &e);
        acc += (v8f)((v8i)(v >= floor_v) & live & (v8i)e);
    }
    double z = 0.0;
    for (int j = 0; j < LANES; j++)
        z += (double)acc[j];
    return z;
}

typedef struct {
    float v;
    int64_t i;
} sample_t;

/* larger value first; equal values: smaller index first */
static int before(const sample_t *a, const sample_t *b)
{
    return a->v > b->v || (a->v == b->v && a->i < b->i);
}

static int cmp_samples(const void *pa, const void *pb)
{
    const sample_t *a = pa, *b = pb;
    return before(a, b) ? -1 : (before(b, a) ? 1 : 0);
}

/* move the `keep` first samples in `before` order to s[0..keep) (unordered): quickselect */
static void select_first(sample_t *s, int64_t n, int64_t keep)
{
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const sample_t pivot = s[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (before(&s[i], &pivot))
                i++;
            while (before(&pivot, &s[j]))
                j--;
            if (i <= j) {
                const sample_t tmp = s[i];
                s[i] = s[j];
                s[j] = tmp;
                i++;
                j--;
            }
        }
        if (keep - 1 <= j)
            hi = j;
        else if (keep - 1 >= i)
            lo = i;
        else
            break;
    }
}

void coarse_significant(float *ll, const float *half_power, const float *row_const, const float *prior_t,
                        const float *prior_r, int64_t n_k, int64_t n_b, int64_t n_t, int64_t n_r, double fraction,
                        int64_t cap, double cut, float *row_max, double *log_z, int64_t *sel, float *sel_p,
                        int64_t *count, double *covered, int64_t nthreads)
{
    const int64_t n_s = n_k * n_t * n_r;
    #pragma omp parallel num_threads(nthreads)
    {
        sample_t *cand = malloc(sizeof(sample_t) * (size_t)n_s);
        float *row_top = malloc(sizeof(float) * (size_t)(n_k * n_t));
        float *lane_top = malloc(sizeof(float) * (size_t)(n_k * n_t * LANES));
        sample_t *lanes = malloc(sizeof(sample_t) * (size_t)(n_k * n_t * LANES));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < n_b; b++) {
            float m = -INFINITY;
            for (int64_t k = 0; k < n_k; k++) {
                const float rc = row_const[b * n_k + k];
                const float *hp = half_power + (k * n_b + b) * n_r;
                const float *pr = prior_r ? prior_r + b * n_r : NULL;
                for (int64_t t = 0; t < n_t; t++) {
                    float *row = ll + ((k * n_b + b) * n_t + t) * n_r;
                    const float c = rc + prior_t[b * n_t + t];
                    /* LANES independent running maxima: no loop-carried chain, vectorisable (max is exact in
                     * any order) */
                    float mx[LANES];
                    for (int j = 0; j < LANES; j++)
                        mx[j] = -INFINITY;
                    int64_t r = 0;
                    for (; r + LANES <= n_r; r += LANES)
                        for (int j = 0; j < LANES; j++) {
                            const float v = row[r + j] - hp[r + j] + c + (pr ? pr[r + j] : 0.0f);
                            row[r + j] = v;
                            mx[j] = v > mx[j] ? v : mx[j];
                        }
                    for (; r < n_r; r++) {
                        const float v = row[r] - hp[r] + c + (pr ? pr[r] : 0.0f);
                        row[r] = v;
                        mx[0] = v > mx[0] ? v : mx[0];
                    }
                    float mt = -INFINITY;
                    for (int j = 0; j < LANES; j++) {
                        mt = mx[j] > mt ? mx[j] : mt;
                        lane_top[(k * n_t + t) * LANES + j] = mx[j];
                    }
                    row_top[k * n_t + t] = mt;
                    m = mt > m ? mt : m;
                }
            }
            /* sum of exp over the samples within `cut` of the maximum (rows whose maximum lies below are skipped
             * whole); the candidates: the samples at or above tau */
            const float floor_v = (float)(m - cut);
            float tau = floor_v;
            if (n_k * n_t * LANES >= cap) {  /* the cap-th largest lane maximum: the least of the cap first */
                for (int64_t j = 0; j < n_k * n_t * LANES; j++) {
                    lanes[j].v = lane_top[j];
                    lanes[j].i = j;
                }
                select_first(lanes, n_k * n_t * LANES, cap);
                float t_cap = lanes[0].v;
                for (int64_t j = 1; j < cap; j++)
                    t_cap = lanes[j].v < t_cap ? lanes[j].v : t_cap;
                tau = t_cap > tau ? t_cap : tau;
            }
            double z = 0.0;
            int64_t n_c = 0;
            for (int64_t k = 0; k < n_k; k++)
                for (int64_t t = 0; t < n_t; t++) {
                    if (!(row_top[k * n_t + t] >= floor_v))
                        continue;
                    const float *row = ll + ((k * n_b + b) * n_t + t) * n_r;
                    const int64_t base = (k * n_t + t) * n_r;
                    z += row_exp_sum(row, n_r, m, floor_v);
                    if (!(row_top[k * n_t + t] >= tau))
                        continue;
                    for (int64_t r = 0; r < n_r; r++)
                        if (row[r] >= tau) {
                            cand[n_c].v = row[r];
                            cand[n_c].i = base + r;
                            n_c++;
                        }
                }
            int64_t n_keep = n_c < cap ? n_c : cap;
            if (n_c > n_keep)
                select_first(cand, n_c, n_keep);
            qsort(cand, (size_t)n_keep, sizeof(sample_t), cmp_samples);
            double cum = 0.0;
            int64_t kept = 0;
            for (int64_t j = 0; j < n_keep; j++) {
                const double p = (double)expf(cand[j].v - m) / z;
                if (j > 0 && cum >= fraction)
                    break;
                sel[b * cap + j] = cand[j].i;
                sel_p[b * cap + j] = (float)p;
                cum += p;
                kept++;
            }
            row_max[b] = m;
            log_z[b] = log(z);
            count[b] = kept;
            covered[b] = cum;
        }
        free(lanes);
        free(lane_top);
        free(row_top);
        free(cand);
    }
}

/* The fine pass: for every pair s (image img[s], one significant coarse sample), its 4 child translations
 * child_t[s][j] and 8 child rotations (table rows inv[s][m]). Images, phases and table rows are interleaved
 * complex (re, im) arrays of n_pix pixels; the shifted image is a_j = x[img] * phases[child_t[j]].
 *
 * fine_cross: out[s][j][m] = Re sum_p conj(a_j) * table[inv[s][m]] (x = w C X: the likelihood's cross term).
 * Lane-wise partial sums (8 lanes, fixed order), so the result is the same for any vector width and thread
 * count. */
static void shifted(const float *x, const float *ph, int64_t n_pix, float *a)
{
    for (int64_t p = 0; p < n_pix; p++) {
        const float xr = x[2 * p], xi = x[2 * p + 1], pr = ph[2 * p], pi = ph[2 * p + 1];
        a[2 * p] = xr * pr - xi * pi;
        a[2 * p + 1] = xr * pi + xi * pr;
    }
}


/* four dot products of length n of a0..a3 with row; element q goes to lane q % LANES */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void dot4(const float *a0, const float *a1, const float *a2, const float *a3, const float *row, int64_t n,
                 float *out)
{
    v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    const int64_t n_main = n / LANES * LANES;
    for (int64_t q = 0; q < n_main; q += LANES) {
        const v8f v = *(const v8u *)(row + q);
        s0 += *(const v8u *)(a0 + q) * v;
        s1 += *(const v8u *)(a1 + q) * v;
        s2 += *(const v8u *)(a2 + q) * v;
        s3 += *(const v8u *)(a3 + q) * v;
    }
    for (int64_t q = n_main; q < n; q++) {
        const float v = row[q];
        s0[q - n_main] += a0[q] * v;
        s1[q - n_main] += a1[q] * v;
        s2[q - n_main] += a2[q] * v;
        s3[q - n_main] += a3[q] * v;
    }
    float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    for (int l = 0; l < LANES; l++) {
        t0 += s0[l];
        t1 += s1[l];
        t2 += s2[l];
        t3 += s3[l];
    }
    out[0] = t0;
    out[1] = t1;
    out[2] = t2;
    out[3] = t3;
}

/* row += c0 a0 + c1 a1 + c2 a2 + c3 a3 over n floats */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void axpy4(float *row, const float *a0, const float *a1, const float *a2, const float *a3, float c0, float c1,
                  float c2, float c3, int64_t n)
{
    for (int64_t q = 0; q < n; q++)
        row[q] += c0 * a0[q] + c1 * a1[q] + c2 * a2[q] + c3 * a3[q];
}

void fine_cross(const float *x, const float *phases, const float *table, const int64_t *img, const int64_t *child_t,
                const int64_t *inv, int64_t n_pairs, int64_t n_pix, float *out, int64_t nthreads)
{
    const int64_t n2 = 2 * n_pix;
    #pragma omp parallel num_threads(nthreads)
    {
        float *a = malloc(sizeof(float) * (size_t)(4 * n2));
        #pragma omp for schedule(static)
        for (int64_t s = 0; s < n_pairs; s++) {
            for (int j = 0; j < 4; j++)
                shifted(x + img[s] * n2, phases + child_t[4 * s + j] * n2, n_pix, a + j * n2);
            for (int m = 0; m < 8; m++) {
                float d[4];
                dot4(a, a + n2, a + 2 * n2, a + 3 * n2, table + inv[8 * s + m] * n2, n2, d);
                for (int j = 0; j < 4; j++)
                    out[(s * 4 + j) * 8 + m] = d[j];
            }
        }
        free(a);
    }
}

/* pair_power: out[s][m] = sum_p a[img[s]][p] * tp[inv[s][m]][p] (a = w C^2, tp = |P|^2: the likelihood's power term
 * of each pair's 8 child rotations), real arrays of n_pix floats; lane-wise sums as fine_cross. */
void pair_power(const float *a, const float *tp, const int64_t *img, const int64_t *inv, int64_t n_pairs,
                int64_t n_pix, float *out, int64_t nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t s = 0; s < n_pairs; s++) {
        const float *row = a + img[s] * n_pix;
        const int64_t *iv = inv + 8 * s;
        dot4(tp + iv[0] * n_pix, tp + iv[1] * n_pix, tp + iv[2] * n_pix, tp + iv[3] * n_pix, row, n_pix, out + 8 * s);
        dot4(tp + iv[4] * n_pix, tp + iv[5] * n_pix, tp + iv[6] * n_pix, tp + iv[7] * n_pix, row, n_pix,
             out + 8 * s + 4);
    }
}

/* fine_accumulate: acc[inv[s][m]] += sum_j post[s][j][m] * a_j for every pair in order (x = C X: the M-step's
 * posterior-weighted images). Each thread owns the table rows u with u % nthreads == its number, so every row
 * sums its pairs in pair order whatever the thread count. */
void fine_accumulate(const float *x, const float *phases, const float *post, const int64_t *img,
                     const int64_t *child_t, const int64_t *inv, int64_t n_pairs, int64_t n_pix, float *acc,
                     int64_t nthreads)
{
    const int64_t n2 = 2 * n_pix;
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t me, nt;
        thread_slot(&me, &nt);
        float *a = malloc(sizeof(float) * (size_t)(4 * n2));
        for (int64_t s = 0; s < n_pairs; s++) {
            int mine = 0;
            for (int m = 0; m < 8; m++)
                mine |= (inv[8 * s + m] % nt) == me;
            if (!mine)
                continue;
            for (int j = 0; j < 4; j++)
                shifted(x + img[s] * n2, phases + child_t[4 * s + j] * n2, n_pix, a + j * n2);
            const float *ps = post + s * 32;
            for (int m = 0; m < 8; m++) {
                const int64_t u = inv[8 * s + m];
                if (u % nt != me)
                    continue;
                axpy4(acc + u * n2, a, a + n2, a + 2 * n2, a + 3 * n2, ps[m], ps[8 + m], ps[16 + m], ps[24 + m], n2);
            }
        }
        free(a);
    }
}

/* residual_terms: per pixel p, t1[p] = sum_u Re data[u][p] conj(proj[u][p]) and t2[p] = sum_u weight[u][p] |proj[u][p]|^2
 * (the noise power's cross and power terms over the fine pass's table rows u; interleaved complex data and proj,
 * real weight, (n_u, n_pix) row-major). Each product in float as the torch formulation, summed over u in double in
 * row order; each thread owns a block of pixels, so results do not depend on the thread count. */
#define RES_BLOCK 64
void residual_terms(const float *data, const float *proj, const float *weight, int64_t n_u, int64_t n_pix,
                    double *t1, double *t2, int64_t nthreads)
{
    const int64_t n_blocks = (n_pix + RES_BLOCK - 1) / RES_BLOCK;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t blk = 0; blk < n_blocks; blk++) {
        const int64_t p0 = blk * RES_BLOCK, p1 = p0 + RES_BLOCK < n_pix ? p0 + RES_BLOCK : n_pix, np = p1 - p0;
        double s1[RES_BLOCK] = {0}, s2[RES_BLOCK] = {0};
        for (int64_t u = 0; u < n_u; u++) {
            const float *d = data + 2 * (u * n_pix + p0), *q = proj + 2 * (u * n_pix + p0), *w = weight + u * n_pix + p0;
            for (int64_t j = 0; j < np; j++) {
                const float re = q[2 * j], im = q[2 * j + 1];
                s1[j] += (double)(d[2 * j] * re + d[2 * j + 1] * im);
                s2[j] += (double)(w[j] * (re * re + im * im));
            }
        }
        for (int64_t j = 0; j < np; j++) {
            t1[p0 + j] = s1[j];
            t2[p0 + j] = s2[j];
        }
    }
}

/* fine_weights: acc[inv[s][m]] += (sum_j post[s][j][m]) * c2[img[s]] for every pair in order (c2 = C^2, real, n_pix
 * per image: the M-step's weights of each table row, without the dense (rows x images) product). Rows owned by
 * threads as in fine_accumulate. */
void fine_weights(const float *c2, const float *post, const int64_t *img, const int64_t *inv, int64_t n_pairs,
                  int64_t n_pix, float *acc, int64_t nthreads)
{
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t me, nt;
        thread_slot(&me, &nt);
        for (int64_t s = 0; s < n_pairs; s++) {
            const float *ps = post + s * 32;
            const float *row = c2 + img[s] * n_pix;
            for (int m = 0; m < 8; m++) {
                const int64_t u = inv[8 * s + m];
                if (u % nt != me)
                    continue;
                const float w = ps[m] + ps[8 + m] + ps[16 + m] + ps[24 + m];
                if (w == 0.0f)
                    continue;
                float *a = acc + u * n_pix;
                for (int64_t q = 0; q < n_pix; q++)
                    a[q] += w * row[q];
            }
        }
    }
}
