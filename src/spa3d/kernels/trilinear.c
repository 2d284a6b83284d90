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
#include <stdlib.h>
#include "threads.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPA3D_X86 1
#endif

void trilinear_scatter_grid(float *acc, int64_t dz, int64_t dy, int64_t dx, const float *coords, const float *vals,
                            int64_t m, int64_t nch, int64_t nthreads)
{
    const int64_t sy = dx * nch, sz = dy * dx * nch;
    /* each thread owns a slab of z-planes and adds, in sample order, only what falls into it:
     * no two threads write the same voxel, and every voxel sums its samples in the same order */
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t t, nt;
        thread_slot(&t, &nt);
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
/* smooth_x_line: o[x] = sum_j k[j + r] * f(x + j) for x in [0, dx), f(x) = line[x] (times wline[x] when wline
 * is not NULL) for 0 <= x < dx, f(x) = mirror[-x] (times wmirror[-x]) for x < 0, zero beyond dx. The interior
 * runs tap by tap over the whole line, so it vectorises; buf is work space of dx floats. */
static void smooth_x_line(const float *line, const float *wline, const float *mirror, const float *wmirror, float *o,
                          float *buf, int64_t dx, const float *k, int64_t r)
{
    const float *f = line;
    if (wline) {
        for (int64_t x = 0; x < dx; x++)
            buf[x] = line[x] * wline[x];
        f = buf;
    }
    const int64_t lo = r < dx ? r : dx, hi = dx - r > lo ? dx - r : lo;
    for (int64_t x = lo; x < hi; x++)
        o[x] = 0.0f;
    for (int64_t j = -r; j <= r; j++) {
        const float kk = k[j + r];
        const float *src = f + j;
        for (int64_t x = lo; x < hi; x++)
            o[x] += kk * src[x];
    }
    for (int64_t x = 0; x < dx; x++) {
        if (x == lo && hi > lo) {
            x = hi - 1;
            continue;
        }
        float s = 0.0f;
        for (int64_t j = -r; j <= r; j++) {
            const int64_t xx = x + j;
            if (xx >= dx || -xx >= dx) /* zero beyond the grid, also on the mirrored side */
                continue;
            s += k[j + r] * (xx >= 0 ? f[xx] : (wmirror ? mirror[-xx] * wmirror[-xx] : mirror[-xx]));
        }
        o[x] = s;
    }
}

/* smooth_yz: the passes along y (out -> a) and z (a -> out) of smooth_half. */
static void smooth_yz(float *a, float *out, int64_t dz, int64_t dy, int64_t dx, const float *k, int64_t r,
                      int64_t nthreads)
{
    const int64_t sz = dy * dx;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t z = 0; z < dz; z++)
        for (int64_t y = 0; y < dy; y++)
            taps_along(a + z * sz + y * dx, out + z * sz, y, dy, dx, dx, k, r);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t z = 0; z < dz; z++)
        taps_along(out + z * sz, a, z, dz, sz, sz, k, r);
}

/* smooth_x: the pass along x of smooth_half, of a (times w when w is not NULL) into out. */
static void smooth_x(const float *a, const float *w, float *out, int64_t dz, int64_t dy, int64_t dx, const float *k,
                     int64_t r, int64_t nthreads)
{
    const int64_t sz = dy * dx;
    #pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(dx > 0 ? dx : 1));
        #pragma omp for schedule(static)
        for (int64_t z = 0; z < dz; z++) {
            for (int64_t y = 0; y < dy; y++) {
                const int64_t at = z * sz + y * dx, mat = (dz - 1 - z) * sz + (dy - 1 - y) * dx;
                smooth_x_line(a + at, w ? w + at : NULL, a + mat, w ? w + mat : NULL, out + at, buf, dx, k, r);
            }
        }
        free(buf);
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
    smooth_x(a, NULL, out, dz, dy, dx, k, r, nthreads);
    smooth_yz(a, out, dz, dy, dx, k, r, nthreads);
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
    smooth_x(d, w, t2, dz, dy, dx, k, r, nthreads); /* the product d*w formed line by line */
    smooth_yz(t1, t2, dz, dy, dx, k, r, nthreads);  /* t2 -> t1 (along y) -> t2 (along z) */
    float cmax = 0.0f;
    #pragma omp parallel for schedule(static) reduction(max : cmax) num_threads(nthreads)
    for (int64_t i = 0; i < m; i++)
        if (t2[i] > cmax)
            cmax = t2[i];
    const float floor = cmax > 0.0f ? floor_frac * cmax : 1.0f;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < m; i++) {
        if (!live[i])
            d[i] = 0.0f;
        else if (t2[i] > floor)
            d[i] /= t2[i];
    }
}

typedef float v4f __attribute__((vector_size(16)));

static inline v4f load4(const float *p)
{
    v4f v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void store4(float *p, v4f v)
{
    __builtin_memcpy(p, &v, sizeof v);
}

/* Trilinear value at padded frequency (x, y, z) of a half-grid Fourier cube, cube[z][y][x][2] (interleaved
 * re, im) with x = 0 .. h and y, z = -h .. h (index + h), d = 2h + 1. A frequency with x < 0 is read at its
 * Friedel mate (-k, complex conjugate). Corners outside the cube count as zero. */
/* fold_friedel: a frequency with x < 0 becomes its Friedel mate -k; returns the sign of the imaginary part. */
static inline float fold_friedel(float *x, float *y, float *z)
{
    if (*x >= 0.0f)
        return 1.0f;
    *x = -*x;
    *y = -*y;
    *z = -*z;
    return -1.0f;
}

static inline void sample_half_one(const float *cube, int64_t h, float x, float y, float z, float *out)
{
    const int64_t d = 2 * h + 1, nx = h + 1;
    const int64_t sy = nx * 2, sz = d * nx * 2;
    const float conj = fold_friedel(&x, &y, &z);
    y += (float)h;
    z += (float)h;
    if (y >= 0.0f && z >= 0.0f) {
        /* x, y, z >= 0: truncation is the floor (no rounding call); all 8 corners inside is the common case */
        const int64_t x0 = (int64_t)x, y0 = (int64_t)y, z0 = (int64_t)z;
        if (x0 + 1 < nx && y0 + 1 < d && z0 + 1 < d) {
            const float fx = x - (float)x0, fy = y - (float)y0, fz = z - (float)z0;
            const float *c = cube + z0 * sz + y0 * sy + x0 * 2;
            /* the corners x0 and x0 + 1 of a (y, z) row are 4 adjacent floats (re, im, re, im): one vector each */
            v4f a = load4(c) * ((1 - fz) * (1 - fy)) + load4(c + sy) * ((1 - fz) * fy);
            a += load4(c + sz) * (fz * (1 - fy)) + load4(c + sz + sy) * (fz * fy);
            out[0] = a[0] * (1 - fx) + a[2] * fx;
            out[1] = conj * (a[1] * (1 - fx) + a[3] * fx);
            return;
        }
    }
    const float fx0 = floorf(x), fy0 = floorf(y), fz0 = floorf(z);
    const int64_t x0 = (int64_t)fx0, y0 = (int64_t)fy0, z0 = (int64_t)fz0;
    const float fx = x - fx0, fy = y - fy0, fz = z - fz0;
    float re = 0.0f, im = 0.0f;
    if (x0 >= 0 && y0 >= 0 && z0 >= 0 && x0 + 1 < nx && y0 + 1 < d && z0 + 1 < d) {
        const float *c = cube + z0 * sz + y0 * sy + x0 * 2;
        const float w000 = (1 - fz) * (1 - fy) * (1 - fx), w001 = (1 - fz) * (1 - fy) * fx;
        const float w010 = (1 - fz) * fy * (1 - fx), w011 = (1 - fz) * fy * fx;
        const float w100 = fz * (1 - fy) * (1 - fx), w101 = fz * (1 - fy) * fx;
        const float w110 = fz * fy * (1 - fx), w111 = fz * fy * fx;
        re = w000 * c[0] + w001 * c[2] + w010 * c[sy] + w011 * c[sy + 2] + w100 * c[sz] + w101 * c[sz + 2]
             + w110 * c[sz + sy] + w111 * c[sz + sy + 2];
        im = w000 * c[1] + w001 * c[3] + w010 * c[sy + 1] + w011 * c[sy + 3] + w100 * c[sz + 1] + w101 * c[sz + 3]
             + w110 * c[sz + sy + 1] + w111 * c[sz + sy + 3];
    } else {
        for (int64_t kz = 0; kz < 2; kz++)
            for (int64_t ky = 0; ky < 2; ky++)
                for (int64_t kx = 0; kx < 2; kx++) {
                    const int64_t xi = x0 + kx, yi = y0 + ky, zi = z0 + kz;
                    if (xi < 0 || yi < 0 || zi < 0 || xi >= nx || yi >= d || zi >= d)
                        continue;
                    const float w = (kz ? fz : 1 - fz) * (ky ? fy : 1 - fy) * (kx ? fx : 1 - fx);
                    const float *c = cube + zi * sz + yi * sy + xi * 2;
                    re += w * c[0];
                    im += w * c[1];
                }
    }
    out[0] = re;
    out[1] = conj * im;
}

/* sample_half: out[i] = the cube at coords[i] = (x, y, z) padded voxels (see sample_half_one). */
void sample_half(const float *cube, int64_t h, const float *coords, int64_t m, float *out, int64_t nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < m; i++)
        sample_half_one(cube, h, coords[3 * i], coords[3 * i + 1], coords[3 * i + 2], out + 2 * i);
}

/* project_half: central slices out[r][p] = the cube at A_r^T (kx_p, ky_p, 0), kxy[p] = (kx, ky) in padded
 * voxels, rot[r] a row-major 3x3 matrix. Threads split blocks of PROJ_ROT_BLOCK rotations; within a block the
 * pixels go in runs of PROJ_PIX_BLOCK, each run through every rotation of the block. Rotations that lie close
 * together (a local search's, a chunk's neighbours on the grid) then read the same small part of the cube
 * while it is in cache, rather than sweeping the whole slice once per rotation: 19 -> ns per sample for 300
 * rotations within a few degrees at box 128 (the cube, 68 MB, does not fit any cache). */
#define PROJ_ROT_BLOCK 32
#define PROJ_PIX_BLOCK 64
#ifdef SPA3D_X86
/* flip_sign: -v in the lanes of m (a sign flip, as C's unary minus, -0.0 included) */
__attribute__((target("avx512f"))) static inline __m512 flip_sign(__m512 v, __mmask16 m)
{
    const __m512i bits = _mm512_castps_si512(v);
    return _mm512_castsi512_ps(_mm512_mask_xor_epi32(bits, m, bits, _mm512_set1_epi32((int32_t)0x80000000u)));
}

/* project_run_avx512: one rotation a over the pixels p0 .. p1 of a run, 16 at a time, the same arithmetic in
 * the same order as sample_half_one (so the same floats; the build has no FMA contraction). The 8 corners of
 * 16 pixels come in with 16 gathers of (re, im) pairs; a lane whose corners are not all inside the cube (none
 * inside the usual radius) is redone by sample_half_one. kx, ky: the run's pixels, de-interleaved. */
__attribute__((target("avx512f"))) static void project_run_avx512(const float *cube, int64_t h, const float *a,
                                                                    const float *kx, const float *ky, int64_t p0,
                                                                    int64_t p1, float *o)
{
    const int32_t d = (int32_t)(2 * h + 1), nx = (int32_t)(h + 1);
    const int32_t sy = nx * 2, sz = d * nx * 2;
    const __m512 a0 = _mm512_set1_ps(a[0]), a1 = _mm512_set1_ps(a[1]), a2 = _mm512_set1_ps(a[2]);
    const __m512 a3 = _mm512_set1_ps(a[3]), a4 = _mm512_set1_ps(a[4]), a5 = _mm512_set1_ps(a[5]);
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), hf = _mm512_set1_ps((float)h);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i lo_mix = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_mix = _mm512_add_epi32(lo_mix, _mm512_set1_epi32(8));
    const __m512i vsy = _mm512_set1_epi32(sy), vsz = _mm512_set1_epi32(sz);
    const __m512i lim_x = _mm512_set1_epi32(nx - 1), lim_yz = _mm512_set1_epi32(d - 1);
    int64_t p = p0;
    for (; p + 16 <= p1; p += 16) {
        const __m512 vkx = _mm512_loadu_ps(kx + p), vky = _mm512_loadu_ps(ky + p);
        __m512 x = _mm512_add_ps(_mm512_mul_ps(vkx, a0), _mm512_mul_ps(vky, a3));
        __m512 y = _mm512_add_ps(_mm512_mul_ps(vkx, a1), _mm512_mul_ps(vky, a4));
        __m512 z = _mm512_add_ps(_mm512_mul_ps(vkx, a2), _mm512_mul_ps(vky, a5));
        const __mmask16 neg = _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ);
        x = flip_sign(x, neg);
        y = flip_sign(y, neg);
        z = flip_sign(z, neg);
        y = _mm512_add_ps(y, hf);
        z = _mm512_add_ps(z, hf);
        const __m512i x0 = _mm512_cvttps_epi32(x), y0 = _mm512_cvttps_epi32(y), z0 = _mm512_cvttps_epi32(z);
        __mmask16 ok = _mm512_cmp_ps_mask(y, zero, _CMP_GE_OQ) & _mm512_cmp_ps_mask(z, zero, _CMP_GE_OQ);
        ok &= _mm512_cmplt_epi32_mask(x0, lim_x) & _mm512_cmplt_epi32_mask(y0, lim_yz)
              & _mm512_cmplt_epi32_mask(z0, lim_yz);
        const __m512 fx = _mm512_sub_ps(x, _mm512_cvtepi32_ps(x0)), fy = _mm512_sub_ps(y, _mm512_cvtepi32_ps(y0));
        const __m512 fz = _mm512_sub_ps(z, _mm512_cvtepi32_ps(z0));
        const __m512 gx = _mm512_sub_ps(one, fx), gy = _mm512_sub_ps(one, fy), gz = _mm512_sub_ps(one, fz);
        const __m512 w00 = _mm512_mul_ps(gz, gy), w01 = _mm512_mul_ps(gz, fy);
        const __m512 w10 = _mm512_mul_ps(fz, gy), w11 = _mm512_mul_ps(fz, fy);
        /* float offset of corner (x0, y0, z0); lanes outside read offset 0 (then redone) */
        __m512i off = _mm512_add_epi32(_mm512_add_epi32(_mm512_mullo_epi32(z0, vsz), _mm512_mullo_epi32(y0, vsy)),
                                       _mm512_add_epi32(x0, x0));
        off = _mm512_maskz_mov_epi32(ok, off);
        __m512 acc[4]; /* re0, im0, re1, im1: the corners x0 and x0 + 1 summed over the 4 (y, z) rows */
        const int32_t row_off[4] = {0, sy, sz, sz + sy};
        __m512 part[4][4];
        for (int r = 0; r < 4; r++) {
            const __m512i o_r = _mm512_add_epi32(off, _mm512_set1_epi32(row_off[r]));
            for (int xi = 0; xi < 2; xi++) {
                const __m512i o_x = _mm512_add_epi32(o_r, _mm512_set1_epi32(2 * xi));
                const __m512d lo = _mm512_i32gather_pd(_mm512_castsi512_si256(o_x), (const void *)cube, 4);
                const __m512d hi = _mm512_i32gather_pd(_mm512_extracti64x4_epi64(o_x, 1), (const void *)cube, 4);
                part[r][2 * xi] = _mm512_permutex2var_ps(_mm512_castpd_ps(lo), even, _mm512_castpd_ps(hi));
                part[r][2 * xi + 1] = _mm512_permutex2var_ps(_mm512_castpd_ps(lo), odd, _mm512_castpd_ps(hi));
            }
        }
        for (int c = 0; c < 4; c++) {
            const __m512 first = _mm512_add_ps(_mm512_mul_ps(part[0][c], w00), _mm512_mul_ps(part[1][c], w01));
            const __m512 second = _mm512_add_ps(_mm512_mul_ps(part[2][c], w10), _mm512_mul_ps(part[3][c], w11));
            acc[c] = _mm512_add_ps(first, second);
        }
        const __m512 re = _mm512_add_ps(_mm512_mul_ps(acc[0], gx), _mm512_mul_ps(acc[2], fx));
        __m512 im = _mm512_add_ps(_mm512_mul_ps(acc[1], gx), _mm512_mul_ps(acc[3], fx));
        im = flip_sign(im, neg);
        _mm512_storeu_ps(o + 2 * p, _mm512_permutex2var_ps(re, lo_mix, im));
        _mm512_storeu_ps(o + 2 * p + 16, _mm512_permutex2var_ps(re, hi_mix, im));
        if (ok != 0xFFFF)
            for (int l = 0; l < 16; l++)
                if (!((ok >> l) & 1)) {
                    const float qx = kx[p + l], qy = ky[p + l];
                    sample_half_one(cube, h, qx * a[0] + qy * a[3], qx * a[1] + qy * a[4], qx * a[2] + qy * a[5],
                                    o + 2 * (p + l));
                }
    }
    for (; p < p1; p++)
        sample_half_one(cube, h, kx[p] * a[0] + ky[p] * a[3], kx[p] * a[1] + ky[p] * a[4],
                        kx[p] * a[2] + ky[p] * a[5], o + 2 * p);
}

static int use_avx512 = -1;

static int have_avx512(void)
{
    if (use_avx512 < 0) {
        const char *off = getenv("SPA3D_NO_AVX512");
        use_avx512 = (off == NULL || off[0] == '\0' || off[0] == '0') && __builtin_cpu_supports("avx512f");
    }
    return use_avx512;
}
#endif

/* projection_simd: use (1) or not (0) the AVX-512 path of project_half where the CPU has it (default: use,
 * unless SPA3D_NO_AVX512 is set); returns the lanes project_half now uses per step (16 or 1). */
int projection_simd(int enable)
{
#ifdef SPA3D_X86
    if (enable >= 0) {
        use_avx512 = -1;
        use_avx512 = enable && have_avx512();
    }
    return have_avx512() ? 16 : 1;
#else
    (void)enable;
    return 1;
#endif
}

/* project_run_portable: project_run_avx512's pixels one at a time (kxy interleaved) */
static void project_run_portable(const float *cube, int64_t h, const float *a, const float *kxy, int64_t p0,
                                 int64_t p1, float *o)
{
    for (int64_t p = p0; p < p1; p++) {
        const float kx = kxy[2 * p], ky = kxy[2 * p + 1];
        sample_half_one(cube, h, kx * a[0] + ky * a[3], kx * a[1] + ky * a[4], kx * a[2] + ky * a[5], o + 2 * p);
    }
}

void project_half(const float *cube, int64_t h, const float *rot, int64_t n_rot, const float *kxy, int64_t n_pix,
                  float *out, int64_t nthreads)
{
    float *kx = NULL, *ky = NULL; /* the pixels de-interleaved, for the AVX-512 path */
#ifdef SPA3D_X86
    if (have_avx512() && (2 * h + 1) * (2 * h + 1) * (h + 1) * 2 < ((int64_t)1 << 31)) {
        kx = malloc(sizeof(float) * (size_t)n_pix);
        ky = malloc(sizeof(float) * (size_t)n_pix);
        if (kx == NULL || ky == NULL) {
            free(kx);
            free(ky);
            kx = ky = NULL;
        } else {
            for (int64_t p = 0; p < n_pix; p++) {
                kx[p] = kxy[2 * p];
                ky[p] = kxy[2 * p + 1];
            }
        }
    }
#endif
    const int64_t n_blocks = (n_rot + PROJ_ROT_BLOCK - 1) / PROJ_ROT_BLOCK;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t blk = 0; blk < n_blocks; blk++) {
        const int64_t r0 = blk * PROJ_ROT_BLOCK, r1 = r0 + PROJ_ROT_BLOCK < n_rot ? r0 + PROJ_ROT_BLOCK : n_rot;
        for (int64_t p0 = 0; p0 < n_pix; p0 += PROJ_PIX_BLOCK) {
            const int64_t p1 = p0 + PROJ_PIX_BLOCK < n_pix ? p0 + PROJ_PIX_BLOCK : n_pix;
            for (int64_t r = r0; r < r1; r++) {
#ifdef SPA3D_X86
                if (kx != NULL) {
                    project_run_avx512(cube, h, rot + 9 * r, kx, ky, p0, p1, out + r * n_pix * 2);
                    continue;
                }
#endif
                project_run_portable(cube, h, rot + 9 * r, kxy, p0, p1, out + r * n_pix * 2);
            }
        }
    }
    free(kx);
    free(ky);
}

/* backproject_half: insert central slices into a half-grid accumulator acc[z][y][x][3] (re, im, weight), x =
 * 0 .. h, y, z = -h .. h (index + h), d = 2h + 1: the value vals[r][p] (interleaved re, im) with weight w[r][p]
 * goes to pad * A_r^T (kx_p, ky_p, 0) (kxy[p] = (kx, ky) * pad), to its Friedel mate (-k, conjugate) where x <
 * 0, with trilinear weights; samples whose 8 neighbours are not all inside are skipped. As
 * trilinear_scatter_grid, threads own z-slabs and add their samples in (r, p) order. */
/* where_half: the padded voxel (x0, y0, z0) below sample p of rotation a (the Friedel mate's where x < 0), its
 * fractions and the sign of its imaginary part; 0 when not all 8 neighbours lie inside the grid. */
static inline int where_half(const float *a, float kx, float ky, int64_t h, int64_t *x0, int64_t *y0, int64_t *z0,
                             float *fx, float *fy, float *fz, float *sign)
{
    const int64_t d = 2 * h + 1, nx = h + 1;
    float x = kx * a[0] + ky * a[3], z = kx * a[2] + ky * a[5];
    *sign = x < 0 ? -1.0f : 1.0f;
    z = *sign * z + (float)h;
    if (!(z >= 0.0f))
        return 0;
    x = *sign * x;
    const float y = *sign * (kx * a[1] + ky * a[4]) + (float)h;
    if (!(y >= 0.0f))
        return 0;
    *x0 = (int64_t)x, *y0 = (int64_t)y, *z0 = (int64_t)z;  /* >= 0: truncation is the floor */
    if (*x0 + 1 >= nx || *y0 + 1 >= d || *z0 + 1 >= d)
        return 0;
    *fx = x - (float)*x0, *fy = y - (float)*y0, *fz = z - (float)*z0;
    return 1;
}

/* backproject_binned: backproject_half for many samples. The accumulator (0.8 GB at box 256, pad 2) is far
 * larger than any cache and consecutive slices lie at unrelated angles, so adding each sample where it falls
 * waits on main memory for almost every corner. Here the samples of up to BP_CHUNK of them are first written,
 * with their corner and fractions, into buckets by tiles of BP_TZ z-planes by BP_TY y-rows (a sample whose
 * corners reach the next tile in z or y goes to each tile it touches; in (r, p) order within a bucket); then
 * each tile, under 0.4 MB at box 256, takes its bucket while it stays in a core's cache, reading the bucket
 * front to back. Every voxel receives its shares in the same (r, p) order as in backproject_half, so the sums
 * are the same to the bit. Returns 0 (nothing done) when the bucket memory cannot be had. */
#define BP_TZ 4
#define BP_TY 32
#define BP_CHUNK (1 << 24)
typedef struct {
    int16_t x0, y0, z0, pad;
    float fx, fy, fz, v0, v1, v2;
} bp_entry;

static inline int64_t tiles_of(int64_t y0, int64_t z0, int64_t n_ty, int64_t *tiles)
{
    const int64_t tz = z0 / BP_TZ, ty = y0 / BP_TY;
    const int dz = (z0 + 1) / BP_TZ != tz, dy = (y0 + 1) / BP_TY != ty;
    int64_t m = 0;
    tiles[m++] = tz * n_ty + ty;
    if (dy)
        tiles[m++] = tz * n_ty + ty + 1;
    if (dz) {
        tiles[m++] = (tz + 1) * n_ty + ty;
        if (dy)
            tiles[m++] = (tz + 1) * n_ty + ty + 1;
    }
    return m;
}

static int backproject_binned(float *acc, int64_t h, const float *rot, int64_t n_rot, const float *kxy, int64_t n_pix,
                              const float *vals, const float *w, int64_t nthreads)
{
    const int64_t d = 2 * h + 1, nx = h + 1;
    const int64_t n_ty = (d + BP_TY - 1) / BP_TY, n_tile = ((d + BP_TZ - 1) / BP_TZ) * n_ty;
    const int64_t rows = n_pix >= BP_CHUNK ? 1 : BP_CHUNK / n_pix;  /* rotations per chunk */
    const int64_t rows_all = rows < n_rot ? rows : n_rot;
    if (d >= 32768)
        return 0;
    if (nthreads < 1)
        nthreads = 1;
    int64_t *count = malloc((size_t)(nthreads * n_tile) * sizeof(int64_t));
    int64_t *start = malloc((size_t)(n_tile + 1) * sizeof(int64_t));
    /* at most 4 buckets per sample: this much is enough for any chunk */
    bp_entry *ent = malloc((size_t)(4 * rows_all * n_pix) * sizeof(bp_entry));
    const int ok = count != NULL && start != NULL && ent != NULL;
    for (int64_t c0 = 0; ok && c0 < n_rot; c0 += rows) {
        const int64_t c1 = c0 + rows < n_rot ? c0 + rows : n_rot;
        #pragma omp parallel num_threads(nthreads)
        {
            int64_t t, nt;
            thread_slot(&t, &nt);
            const int64_t r0 = c0 + (c1 - c0) * t / nt, r1 = c0 + (c1 - c0) * (t + 1) / nt;
            int64_t *mine = count + t * n_tile;
            int64_t tl[4];
            for (int64_t s = 0; s < n_tile; s++)
                mine[s] = 0;
            /* pass 0 counts each thread's samples per tile; pass 1 writes them at the offsets that follow */
            for (int pass = 0; pass < 2; pass++) {
                for (int64_t r = r0; r < r1; r++)
                    for (int64_t p = 0; p < n_pix; p++) {
                        int64_t x0, y0, z0;
                        float fx, fy, fz, sg;
                        if (!where_half(rot + 9 * r, kxy[2 * p], kxy[2 * p + 1], h, &x0, &y0, &z0, &fx, &fy, &fz,
                                        &sg))
                            continue;
                        const int64_t m = tiles_of(y0, z0, n_ty, tl);
                        if (pass == 0) {
                            for (int64_t k = 0; k < m; k++)
                                mine[tl[k]]++;
                            continue;
                        }
                        const int64_t i = r * n_pix + p;
                        const bp_entry e = {(int16_t)x0, (int16_t)y0, (int16_t)z0, 0, fx, fy, fz, vals[2 * i],
                                            sg * vals[2 * i + 1], w[i]};
                        for (int64_t k = 0; k < m; k++)
                            ent[mine[tl[k]]++] = e;
                    }
                if (pass == 0) {
                    #pragma omp barrier
                    #pragma omp single
                    {
                        /* offsets: tile-major; within a tile thread t's samples (rotations r0 .. r1) before t + 1's */
                        int64_t total = 0;
                        for (int64_t s = 0; s < n_tile; s++) {
                            start[s] = total;
                            for (int64_t u = 0; u < nt; u++) {
                                const int64_t c = count[u * n_tile + s];
                                count[u * n_tile + s] = total;
                                total += c;
                            }
                        }
                        start[n_tile] = total;
                    }
                }
            }
            #pragma omp barrier
            #pragma omp for schedule(dynamic, 4)
            for (int64_t s = 0; s < n_tile; s++) {
                const int64_t zlo = (s / n_ty) * BP_TZ, zhi = zlo + BP_TZ;
                const int64_t ylo = (s % n_ty) * BP_TY, yhi = ylo + BP_TY;
                for (int64_t k = start[s]; k < start[s + 1]; k++) {
                    const bp_entry *e = ent + k;
                    const float fx = e->fx, fy = e->fy, fz = e->fz, v0 = e->v0, v1 = e->v1, v2 = e->v2;
                    /* corners x0 and x0 + 1 of a (y, z) row: 6 adjacent floats (re, im, weight) x 2 */
                    const v4f lo = {v0 * (1 - fx), v1 * (1 - fx), v2 * (1 - fx), v0 * fx};
                    const float e1 = v1 * fx, e2 = v2 * fx;
                    for (int64_t kz = 0; kz < 2; kz++) {
                        const int64_t zz = e->z0 + kz;
                        if (zz < zlo || zz >= zhi)
                            continue;
                        const float wz = kz ? fz : 1 - fz;
                        for (int64_t ky = 0; ky < 2; ky++) {
                            const int64_t yy = e->y0 + ky;
                            if (yy < ylo || yy >= yhi)
                                continue;
                            float *q = acc + ((zz * d + yy) * nx + e->x0) * 3;
                            const float wk = wz * (ky ? fy : 1 - fy);
                            store4(q, load4(q) + lo * wk);
                            q[4] += wk * e1;
                            q[5] += wk * e2;
                        }
                    }
                }
            }
        }
    }
    free(ent);
    free(start);
    free(count);
    return ok;
}

/* samples per call, and accumulator bytes, from which backproject_half sorts the samples into tiles first (see
 * backproject_binned): a smaller accumulator (box 64: 13 MB) stays in cache anyway */
#define BP_BINNED_FROM (1 << 22)
#define BP_BINNED_ACC_BYTES (64 << 20)

void backproject_half(float *acc, int64_t h, const float *rot, int64_t n_rot, const float *kxy, int64_t n_pix,
                      const float *vals, const float *w, int64_t nthreads)
{
    const int64_t d = 2 * h + 1, nx = h + 1;
    const int64_t sy = nx * 3, sz = d * nx * 3;
    if (n_rot * n_pix >= BP_BINNED_FROM && d * sz * (int64_t)sizeof(float) >= BP_BINNED_ACC_BYTES
        && backproject_binned(acc, h, rot, n_rot, kxy, n_pix, vals, w, nthreads))
        return;
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t t, nt;
        thread_slot(&t, &nt);
        const int64_t zlo = d * t / nt, zhi = d * (t + 1) / nt;
        for (int64_t r = 0; r < n_rot; r++) {
            const float *a = rot + 9 * r;
            for (int64_t p = 0; p < n_pix; p++) {
                const float kx = kxy[2 * p], ky = kxy[2 * p + 1];
                float x = kx * a[0] + ky * a[3], z = kx * a[2] + ky * a[5];
                const float sign = x < 0 ? -1.0f : 1.0f;
                z = sign * z + (float)h;
                if (!(z >= 0.0f))  /* a corner below 0: skipped (as every sample not wholly inside) */
                    continue;
                const int64_t z0 = (int64_t)z;  /* z >= 0: truncation is the floor */
                if (z0 + 1 < zlo || z0 >= zhi)
                    continue;
                x = sign * x;
                const float y = sign * (kx * a[1] + ky * a[4]) + (float)h;
                if (!(y >= 0.0f))
                    continue;
                const int64_t x0 = (int64_t)x, y0 = (int64_t)y;
                if (x0 + 1 >= nx || y0 + 1 >= d || z0 + 1 >= d)
                    continue;
                const float fx = x - (float)x0, fy = y - (float)y0, fz = z - (float)z0;
                const int64_t i = r * n_pix + p;
                const float v0 = vals[2 * i], v1 = sign * vals[2 * i + 1], v2 = w[i];
                /* corners x0 and x0 + 1 of a (y, z) row: 6 adjacent floats (re, im, weight) x 2 */
                const v4f lo = {v0 * (1 - fx), v1 * (1 - fx), v2 * (1 - fx), v0 * fx};
                const float e1 = v1 * fx, e2 = v2 * fx;
                for (int64_t kz = 0; kz < 2; kz++) {
                    const int64_t zz = z0 + kz;
                    if (zz < zlo || zz >= zhi)
                        continue;
                    const float wz = kz ? fz : 1 - fz;
                    float *base = acc + zz * sz + y0 * sy + x0 * 3;
                    for (int ky = 0; ky < 2; ky++) {
                        float *q = base + ky * sy;
                        const float wk = wz * (ky ? fy : 1 - fy);
                        store4(q, load4(q) + lo * wk);
                        q[4] += wk * e1;
                        q[5] += wk * e2;
                    }
                }
            }
        }
    }
}

/* symmetrise_half: out = in + sum over the operators R of in sampled at R.k, for the half-grid accumulators
 * in[z][y][x][c] (z, y = -h..h at index +h, x = 0..h; nc interleaved channels). Where R.k has x < 0 its Friedel
 * mate -R.k is read and channel `imag` (the imaginary part; -1: none) changes sign. Trilinear, zero beyond the
 * grid. Only voxels with |k| <= h + 2 get the sum: every insertion lies within r_max.pad + sqrt(3) <= h, so
 * samples further out are zero; the others are copied. Each output voxel is written by one thread (deterministic).
 * rots: nops row-major 3x3 matrices, R.k with k = (x, y, z). nc <= 4. An operator whose entries are all 0 or +-1
 * (D2, C2, C4, D4, O) maps grid points onto grid points: its sample is read directly, one voxel instead of eight
 * (the same values: the other seven trilinear weights are 0). */
void symmetrise_half(const float *in, float *out, int64_t h, int64_t nc, int64_t imag, const float *rots,
                     int64_t nops, int64_t nthreads)
{
    const int64_t d = 2 * h + 1, w = h + 1;
    const int64_t sy = w * nc, sz = d * sy;
    const float r2max = (float)((h + 2) * (h + 2));
    int *exact = malloc(sizeof(int) * (size_t)(nops > 0 ? nops : 1));
    for (int64_t op = 0; op < nops; op++) {
        exact[op] = 1;
        for (int j = 0; j < 9; j++) {
            const float r = rots[9 * op + j];
            exact[op] &= r == 0.0f || r == 1.0f || r == -1.0f;
        }
    }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t z = 0; z < d; z++) {
        const float kz = (float)(z - h);
        for (int64_t y = 0; y < d; y++) {
            const float ky = (float)(y - h);
            const float *src = in + z * sz + y * sy;
            float *dst = out + z * sz + y * sy;
            for (int64_t i = 0; i < w * nc; i++)
                dst[i] = src[i];
            const float rem = r2max - kz * kz - ky * ky;
            if (rem < 0.0f)
                continue;
            for (int64_t x = 0; x < w && (float)(x * x) <= rem; x++) {
                const float kx = (float)x;
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (int64_t op = 0; op < nops; op++) {
                    const float *R = rots + 9 * op;
                    float px = R[0] * kx + R[1] * ky + R[2] * kz;
                    float py = R[3] * kx + R[4] * ky + R[5] * kz;
                    float pz = R[6] * kx + R[7] * ky + R[8] * kz;
                    const float sign = fold_friedel(&px, &py, &pz);
                    py += (float)h;
                    pz += (float)h;
                    if (exact[op]) {  /* a grid point (px >= 0 after the fold) */
                        const int64_t xx = (int64_t)px, yy = (int64_t)py, zz = (int64_t)pz;
                        if (xx < w && yy >= 0 && yy < d && zz >= 0 && zz < d) {
                            const float *p = in + zz * sz + yy * sy + xx * nc;
                            for (int64_t c = 0; c < nc; c++)
                                acc[c] += (imag == c ? sign : 1.0f) * p[c];
                        }
                        continue;
                    }
                    const float fx0 = floorf(px), fy0 = floorf(py), fz0 = floorf(pz);
                    const int64_t x0 = (int64_t)fx0, y0 = (int64_t)fy0, z0 = (int64_t)fz0;
                    const float fx = px - fx0, fy = py - fy0, fz = pz - fz0;
                    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    for (int64_t a = 0; a < 2; a++) {
                        const int64_t zz = z0 + a;
                        if (zz < 0 || zz >= d)
                            continue;
                        const float wz = a ? fz : 1.0f - fz;
                        for (int64_t b = 0; b < 2; b++) {
                            const int64_t yy = y0 + b;
                            if (yy < 0 || yy >= d)
                                continue;
                            const float wzy = wz * (b ? fy : 1.0f - fy);
                            for (int64_t e = 0; e < 2; e++) {
                                const int64_t xx = x0 + e;
                                if (xx < 0 || xx >= w)
                                    continue;
                                const float wt = wzy * (e ? fx : 1.0f - fx);
                                const float *p = in + zz * sz + yy * sy + xx * nc;
                                for (int64_t c = 0; c < nc; c++)
                                    s[c] += wt * p[c];
                            }
                        }
                    }
                    if (imag >= 0)
                        s[imag] *= sign;
                    for (int64_t c = 0; c < nc; c++)
                        acc[c] += s[c];
                }
                for (int64_t c = 0; c < nc; c++)
                    dst[x * nc + c] += acc[c];
            }
        }
    }
    free(exact);
}
