/* Hand-written CPU kernels of spa3d's hot path, loaded with ctypes (no Python API).
 *
 * trilinear_scatter_grid: add m samples with nch channels each into a 3D grid
 * acc[z][y][x][c] (dz, dy, dx voxels along z, y, x; row-major, x fastest)
 * with trilinear weights; coords[i] = (x, y, z) in voxel units. Samples whose
 * 8 neighbours are not all inside the grid are skipped. Threads split the
 * grid into z-slabs, so the result does not depend on their number.
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

void trilinear_scatter_grid(float *acc, int64_t dz, int64_t dy, int64_t dx, const float *coords, const float *vals,
                            int64_t m, int64_t nch, int64_t nthreads)
{
    const int64_t sy = dx * nch, sz = dy * dx * nch;
    /* each thread owns a slab of z-planes and adds, in sample order, only what falls into it:
     * no two threads write the same voxel, and every voxel sums its samples in the same order */
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const int64_t zlo = dz * t / nt, zhi = dz * (t + 1) / nt;
        for (int64_t i = 0; i < m; i++) {
            const float z = coords[3 * i + 2];
            const float fz0 = floorf(z);
            const int64_t z0 = (int64_t)fz0;
            if (z0 + 1 < zlo || z0 >= zhi)
                continue;
            const float x = coords[3 * i], y = coords[3 * i + 1];
            const float fx0 = floorf(x), fy0 = floorf(y);
            const int64_t x0 = (int64_t)fx0, y0 = (int64_t)fy0;
            if (x0 < 0 || y0 < 0 || z0 < 0 || x0 + 1 >= dx || y0 + 1 >= dy || z0 + 1 >= dz)
                continue;
            const float fx = x - fx0, fy = y - fy0, fz = z - fz0;
            const float wyx[4] = {(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx};
            const int64_t off[4] = {0, nch, sy, sy + nch};
            const float *v = vals + i * nch;
            for (int64_t kz = 0; kz < 2; kz++) {
                const int64_t zz = z0 + kz;
                if (zz < zlo || zz >= zhi)
                    continue;
                const float wz = kz ? fz : 1 - fz;
                float *base = acc + zz * sz + y0 * sy + x0 * nch;
                for (int k = 0; k < 4; k++) {
                    float *p = base + off[k];
                    const float wk = wz * wyx[k];
                    for (int64_t c = 0; c < nch; c++)
                        p[c] += wk * v[c];
                }
            }
        }
    }
}

/* taps_along: o[0..len) = sum over j in [-r, r] with 0 <= i + j < n of k[j + r] * src[(i + j) * stride + 0..len):
 * one output line of a convolution along an axis whose neighbouring lines lie stride floats apart. */
static void taps_along(float *o, const float *src, int64_t i, int64_t n, int64_t stride, int64_t len, const float *k,
                       int64_t r)
{
    for (int64_t x = 0; x < len; x++)
        o[x] = 0.0f;
    for (int64_t j = -r; j <= r; j++) {
        const int64_t ii = i + j;
        if (ii < 0 || ii >= n)
            continue;
        const float kk = k[j + r];
        const float *line = src + ii * stride;
        for (int64_t x = 0; x < len; x++)
            o[x] += kk * line[x];
    }
}

/* smooth_half: separable convolution with a symmetric kernel k[0..2r] of a
 * half grid a[z][y][x] (dz, dy, dx; z and y centred at (dz-1)/2 and
 * (dy-1)/2, x from 0) holding a function with f(-x,-y,-z) = f(x,y,z): the
 * values at x < 0 are read from the mirrored voxels. Zero beyond the grid
 * elsewhere. The result goes to out; a is overwritten (work space).
 * Lines are independent, so the loops run in parallel (deterministic).
 */
void smooth_half(float *a, float *out, int64_t dz, int64_t dy, int64_t dx, const float *k, int64_t r,
                 int64_t nthreads)
{
    (void)nthreads;
    const int64_t sz = dy * dx;
    /* along x: a -> out */
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t z = 0; z < dz; z++) {
        for (int64_t y = 0; y < dy; y++) {
            const float *line = a + z * sz + y * dx;
            const float *mirror = a + (dz - 1 - z) * sz + (dy - 1 - y) * dx;
            float *o = out + z * sz + y * dx;
            for (int64_t x = 0; x < dx; x++) {
                float s = 0.0f;
                if (x >= r && x + r < dx) { /* interior: no bounds to check */
                    for (int64_t j = -r; j <= r; j++)
                        s += k[j + r] * line[x + j];
                } else {
                    for (int64_t j = -r; j <= r; j++) {
                        const int64_t xx = x + j;
                        if (xx >= dx)
                            continue;
                        s += k[j + r] * (xx >= 0 ? line[xx] : mirror[-xx]);
                    }
                }
                o[x] = s;
            }
        }
    }
    /* along y: out -> a (rows of one plane) */
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t z = 0; z < dz; z++)
        for (int64_t y = 0; y < dy; y++)
            taps_along(a + z * sz + y * dx, out + z * sz, y, dy, dx, dx, k, r);
    /* along z: a -> out (whole planes) */
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t z = 0; z < dz; z++)
        taps_along(out + z * sz, a, z, dz, sz, sz, k, r);
}

/* density_iteration: one step of the density compensation of a half grid
 * (Pipe & Menon): conv = (d*w) smoothed by k (as smooth_half), then, where
 * live[i] is set, d[i] /= conv[i] if conv[i] > floor_frac * max(conv), and
 * d[i] = 0 elsewhere. t1 and t2 are work space of the grid's size.
 */
void density_iteration(float *d, const float *w, const uint8_t *live, float *t1, float *t2, int64_t dz, int64_t dy,
                       int64_t dx, const float *k, int64_t r, float floor_frac, int64_t nthreads)
{
    const int64_t sz = dy * dx, m = dz * sz;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < m; i++)
        t2[i] = d[i] * w[i];
    smooth_half(t2, t1, dz, dy, dx, k, r, nthreads);
    float cmax = 0.0f;
    #pragma omp parallel for schedule(static) reduction(max : cmax) num_threads(nthreads)
    for (int64_t i = 0; i < m; i++)
        if (t1[i] > cmax)
            cmax = t1[i];
    const float floor = cmax > 0.0f ? floor_frac * cmax : 1.0f;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < m; i++) {
        if (!live[i])
            d[i] = 0.0f;
        else if (t1[i] > floor)
            d[i] /= t1[i];
    }
}
