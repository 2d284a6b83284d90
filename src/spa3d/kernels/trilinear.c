/* Hand-written CPU kernels of spa3d's hot path, loaded with ctypes (no Python API).
 *
 * trilinear_scatter: add m samples with nch channels each into a 3D grid
 * acc[z][y][x][c] (d voxels per axis, row-major, x fastest) with trilinear
 * weights; coords[i] = (x, y, z) in voxel units. Samples whose 8 neighbours
 * are not all inside the grid are skipped. Sequential, hence deterministic.
 */
#include <math.h>
#include <stdint.h>

void trilinear_scatter(float *acc, int64_t d, const float *coords, const float *vals, int64_t m, int64_t nch)
{
    const int64_t sy = d * nch, sz = d * d * nch;
    for (int64_t i = 0; i < m; i++) {
        const float x = coords[3 * i], y = coords[3 * i + 1], z = coords[3 * i + 2];
        const float fx0 = floorf(x), fy0 = floorf(y), fz0 = floorf(z);
        const int64_t x0 = (int64_t)fx0, y0 = (int64_t)fy0, z0 = (int64_t)fz0;
        if (x0 < 0 || y0 < 0 || z0 < 0 || x0 + 1 >= d || y0 + 1 >= d || z0 + 1 >= d)
            continue;
        const float fx = x - fx0, fy = y - fy0, fz = z - fz0;
        const float w[8] = {
            (1 - fz) * (1 - fy) * (1 - fx), (1 - fz) * (1 - fy) * fx,
            (1 - fz) * fy * (1 - fx),       (1 - fz) * fy * fx,
            fz * (1 - fy) * (1 - fx),       fz * (1 - fy) * fx,
            fz * fy * (1 - fx),             fz * fy * fx};
        const int64_t off[8] = {0, nch, sy, sy + nch, sz, sz + nch, sz + sy, sz + sy + nch};
        float *base = acc + z0 * sz + y0 * sy + x0 * nch;
        const float *v = vals + i * nch;
        for (int k = 0; k < 8; k++) {
            float *p = base + off[k];
            for (int64_t c = 0; c < nch; c++)
                p[c] += w[k] * v[c];
        }
    }
}
