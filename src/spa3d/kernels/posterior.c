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
 * Each image is handled by one thread in a fixed order, so results do not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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
                    float mt = -INFINITY;
                    if (pr) {
                        for (int64_t r = 0; r < n_r; r++) {
                            row[r] = row[r] - hp[r] + c + pr[r];
                            mt = row[r] > mt ? row[r] : mt;
                        }
                    } else {
                        for (int64_t r = 0; r < n_r; r++) {
                            row[r] = row[r] - hp[r] + c;
                            mt = row[r] > mt ? row[r] : mt;
                        }
                    }
                    m = mt > m ? mt : m;
                }
            }
            /* sum of exp over the samples within `cut` of the maximum; those within `cut` are the candidates */
            const float floor_v = (float)(m - cut);
            double z = 0.0;
            int64_t n_c = 0;
            for (int64_t k = 0; k < n_k; k++)
                for (int64_t t = 0; t < n_t; t++) {
                    const float *row = ll + ((k * n_b + b) * n_t + t) * n_r;
                    const int64_t base = (k * n_t + t) * n_r;
                    for (int64_t r = 0; r < n_r; r++)
                        if (row[r] >= floor_v) {
                            z += (double)expf(row[r] - m);
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
        free(cand);
    }
}
