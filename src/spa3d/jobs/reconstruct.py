"""``spa3d reconstruct``: a 3D map from particles with known poses (as relion_reconstruct).

Each image is Fourier transformed, shifted by +origin (which centres the
particle), multiplied by its CTF (with ``ctf``; the weight is then CTF²),
inserted into the 3D Fourier accumulators at its orientation, and the map is
reconstructed by gridding with density compensation. Particles are streamed
in batches: memory does not grow with their number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from spa3d.backend.device import select_device
from spa3d.errors import InputError
from spa3d.fourier.backprojector import BackProjector
from spa3d.fourier.ctf import ctf_half_plane
from spa3d.fourier.grid import half_plane_freqs, shift_half_plane
from spa3d.geometry.euler import euler_to_matrix
from spa3d.geometry.symmetry import symmetry_matrices
from spa3d.io.mrc import write_map
from spa3d.io.particles import ParticleSet
from spa3d.jobs.progress import Progress

log = logging.getLogger("spa3d")


@dataclass
class ReconstructOptions:
    ctf: bool = False
    ctf_intact_first_peak: bool = False
    ctf_phase_flipped: bool = False
    symmetry: str = "C1"
    maxres: float | None = None  # Å
    pad: int = 2
    batch_size: int | None = None  # None: batch_size_for(box, device)
    subset: int | None = None  # rlnRandomSubset 1 or 2
    class_number: int | None = None
    device: str | None = None
    threads: int | None = None
    workers: int = 0  # > 0: back-project on a local Dask cluster of this many processes
    dask_scheduler: str | None = None


def _backproject_chunk(args) -> torch.Tensor:
    """Worker side: accumulate one chunk of particles; returns the accumulator (D, D, D, 3)."""
    star, project_dir, indices, opts, r_max, threads = args
    torch.set_num_threads(int(threads))
    particles = ParticleSet(star, project_dir)
    return backproject_particles(particles, indices, opts, torch.device("cpu"), r_max).acc


def batch_size_for(box: int, device: torch.device) -> int:
    """Particles per batch when none is given: 256 on a GPU; on the CPU about 4 M pixels (64 at box 256, 32 at
    box 360), so that a batch's arrays stay in the allocator's reused memory: at box 256, batches of 256 took
    the back-projection from 2.9 s to 4.3 s, most of it the kernel's page faults on fresh memory."""
    if torch.device(device).type != "cpu":
        return 256
    return int(np.clip((1 << 22) // (box * box), 16, 256))


def backproject_particles(particles: ParticleSet, indices: np.ndarray, opts: ReconstructOptions,
                          device: torch.device, r_max: float, progress: Progress | None = None) -> BackProjector:
    """Accumulate particles ``indices`` (with their STAR poses) into a new back-projector."""
    n, apix = particles.box, particles.pixel_size
    bp = BackProjector(n, pad=opts.pad, r_max=r_max, device=device)
    bs = opts.batch_size or batch_size_for(n, device)
    buf = _InsertBuffer(bp, n, r_max, bs) if _InsertBuffer.pays(bp, device) else None
    for batch in particles.batches(bs, indices, with_ctf=opts.ctf):
        imgs = torch.as_tensor(batch.images, device=device)
        # shifting the image by +origin centres the particle; the shift by −n/2 is rfft2_centered's ifftshift
        ft = shift_half_plane(torch.fft.rfft2(imgs), np.asarray(batch.origins_px) - n // 2, inplace=True)
        weights = None
        if opts.ctf:
            c = ctf_half_plane(batch.ctf, n, apix, device=device, intact_first_peak=opts.ctf_intact_first_peak,
                               phase_flipped=opts.ctf_phase_flipped)
            ft.mul_(c)
            weights = c.mul_(c)
        rot = torch.as_tensor(euler_to_matrix(*batch.angles.T), device=device, dtype=torch.float32)
        if buf is not None:
            buf.add(ft, rot, weights)
        else:
            bp.insert(ft, rot, weights)
        if progress:
            progress.update(len(batch.indices))
    if buf is not None:
        buf.flush()
    return bp


class _InsertBuffer:
    """Images' half-plane pixels within r_max, gathered over batches into reused arrays and inserted
    ``BUFFER_SAMPLES`` samples at a time: the compiled back-projection sorts that many samples into cache-sized
    tiles of the accumulator before adding them (kernels/trilinear.c, backproject_binned), which pays once the
    call holds millions of samples (box 256: about 320 images). The sums are the same to the bit as batch by
    batch."""

    BUFFER_SAMPLES = 1 << 24
    ACC_BYTES = 64 << 20  # the kernel tiles only accumulators this large (box 64's, 13 MB, stays in cache)

    @classmethod
    def pays(cls, bp: BackProjector, device) -> bool:
        return torch.device(device).type == "cpu" and bp._acc.numel() * 4 >= cls.ACC_BYTES

    def __init__(self, bp: BackProjector, n: int, r_max: float, batch: int):
        kx, ky = half_plane_freqs(n)
        inside = (kx**2 + ky**2 <= r_max**2).reshape(-1)
        self.sel = inside.nonzero()[:, 0]
        self.kx, self.ky = kx.reshape(-1)[self.sel].contiguous(), ky.reshape(-1)[self.sel].contiguous()
        rows = max(batch, self.BUFFER_SAMPLES // max(1, len(self.sel)))
        self.bp, self.k = bp, 0
        self.vals = torch.empty((rows, len(self.sel)), dtype=torch.complex64)
        self.w = torch.empty((rows, len(self.sel)), dtype=torch.float32)
        self.rot = torch.empty((rows, 3, 3), dtype=torch.float32)

    def add(self, ft: torch.Tensor, rot: torch.Tensor, weights: torch.Tensor | None) -> None:
        b = ft.shape[0]
        if self.k + b > self.vals.shape[0]:
            self.flush()
        rows = slice(self.k, self.k + b)
        torch.index_select(ft.reshape(b, -1), 1, self.sel, out=self.vals[rows])
        if weights is None:
            self.w[rows] = 1.0
        else:
            torch.index_select(weights.reshape(b, -1).to(torch.float32), 1, self.sel, out=self.w[rows])
        self.rot[rows] = rot
        self.k += b

    def flush(self) -> None:
        if self.k:
            self.bp.insert_pixels(self.vals[: self.k], self.w[: self.k], self.rot[: self.k], self.kx, self.ky)
            self.k = 0


def reconstruct(star: str, output: str, opts: ReconstructOptions, project_dir: str | None = None) -> np.ndarray:
    """Reconstruct ``star``'s particles into ``output`` (MRC); returns the map."""
    device = select_device(opts.device, opts.threads)
    particles = ParticleSet(star, project_dir)
    if opts.ctf and not particles.has_ctf():
        raise InputError(star, "--ctf needs rlnDefocusU/V in data_particles and rlnVoltage, rlnSphericalAberration")
    if opts.ctf:
        particles.ctf_params()  # validate columns before any work
    ops = symmetry_matrices(opts.symmetry)
    sel = np.ones(len(particles), dtype=bool)
    if opts.subset in (1, 2):
        sel &= particles.column("rlnRandomSubset", 0).astype(int) == opts.subset
    if opts.class_number is not None and opts.class_number > 0:
        sel &= particles.column("rlnClassNumber", 0).astype(int) == opts.class_number
    indices = np.nonzero(sel)[0]
    if len(indices) == 0:
        raise InputError(star, "no particles selected")
    n, apix = particles.box, particles.pixel_size
    r_max = n // 2 if not opts.maxres or opts.maxres <= 0 else min(n // 2, n * apix / opts.maxres)
    log.info(f"reconstruct: {len(indices)} particles, box {n}, {apix:.3f} Å/px, symmetry {opts.symmetry}, "
             f"r_max {r_max:.1f} shells, CTF {'on' if opts.ctf else 'off'}, device {device}")
    prog = Progress(len(indices), label="reconstruct: ")
    if opts.workers or opts.dask_scheduler:
        from spa3d.backend.distributed import DaskCluster

        with DaskCluster(opts.workers, opts.dask_scheduler, opts.threads or 1) as cluster:
            chunks = np.array_split(indices, cluster.n_chunks)
            accs = cluster.map(_backproject_chunk, [(str(particles.star_path), str(particles.project_dir), c, opts,
                                                     r_max, cluster.threads) for c in chunks if len(c)])
        bp = BackProjector(n, pad=opts.pad, r_max=r_max, device=device)
        bp.acc = sum(a.cpu() for a in accs).to(device)
        prog.update(len(indices))
    else:
        bp = backproject_particles(particles, indices, opts, device, r_max, prog)
    vol = bp.reconstruct(symmetry_ops=ops).cpu().numpy()
    write_map(output, vol, apix)
    log.info(f"wrote {output} ({prog.elapsed:.1f} s)")
    return vol


# ---- command line: ``spa3d reconstruct`` ----

DESCRIPTION = ("Reconstruct a map from the particles of a STAR file at their poses (rlnAngleRot/Tilt/Psi in degrees, "
               "rlnOriginX/YAngst in Å).")


def add_args(p) -> None:
    from spa3d.jobs.args import add_dask, add_device

    p.add_argument("--i", required=True, help="particle STAR file (RELION 3.1, or 3.0)")
    p.add_argument("--o", required=True, help="output map (.mrc)")
    p.add_argument("--ctf", action="store_true", help="apply CTF correction")
    p.add_argument("--ctf-intact-first-peak", action="store_true", help="leave CTFs intact until their first peak")
    p.add_argument("--ctf-phase-flipped", action="store_true", help="images have been phase-flipped")
    p.add_argument("--sym", default="C1", help="point group: Cn, Dn, T, O, I (default C1)")
    p.add_argument("--maxres", type=float, default=None, help="maximum resolution in Å (default Nyquist)")
    p.add_argument("--pad", type=int, default=2, help="padding factor (default 2)")
    p.add_argument("--subset", type=int, default=None, help="only rlnRandomSubset 1 or 2")
    p.add_argument("--class", dest="klass", type=int, default=None, help="only particles of this rlnClassNumber")
    p.add_argument("--batch-size", type=int, default=None,
                   help="particles per batch (default: 256 on a GPU, about 4 M pixels on the CPU)")
    add_device(p)
    add_dask(p)
    p.add_argument("--quiet", action="store_true")


def main(a) -> None:
    from spa3d.jobs.progress import setup_logging

    setup_logging(quiet=a.quiet)
    opts = ReconstructOptions(ctf=a.ctf, ctf_intact_first_peak=a.ctf_intact_first_peak,
                              ctf_phase_flipped=a.ctf_phase_flipped, symmetry=a.sym, maxres=a.maxres, pad=a.pad,
                              subset=a.subset, class_number=a.klass, device=a.device, threads=a.threads,
                              batch_size=a.batch_size, workers=a.workers, dask_scheduler=a.dask_scheduler)
    reconstruct(a.i, a.o, opts)
