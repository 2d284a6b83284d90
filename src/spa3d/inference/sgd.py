"""De novo initial model by stochastic gradient descent (after RELION 3.1's SGD).

State: K reference maps V_k, their last update Δ_k (momentum), the noise
power σ² per shell, class fractions. Each iteration takes a random
mini-batch, runs the E-step against the current references at the current
resolution (both grow on RELION's schedule: ``ini`` iterations at the initial
values, ``inbetween`` iterations moving linearly to the final ones, the
mini-batch in particles and the resolution in Fourier shells, ``fin``
iterations at the final values), reconstructs each class from the mini-batch
(regularised by T·τ², τ² from the reference's power), and moves the reference
as RELION 3.1 does (ml_optimiser.cpp, maximization): the gradient G is the
regularised reconstruction of the residuals (image − CTF·projection) at the
posterior poses, Δ ← μ·Δ + (1 − μ)·η·G; V ← V + Δ (η = 0.5, μ = 0.9), so the
steady-state step is η·G. The noise spectrum σ² and the class fractions are
running averages with the same μ. With ``flatten_solvent`` the map is masked
by the particle sphere and negative values are set to zero in every
iteration (``positivity="initial"``: during the initial phase only, RELION's
rule; docs/conventions.md gives the measured difference). With
K > 1 the classes are drawn towards their mean until the in-between phase
ends (RELION's annealing, :func:`anneal_classes`).

The E-step and the reconstruction reach ``incr_size`` Fourier shells beyond
the scheduled resolution (RELION's --incr_size, 10 by default).

``final_em`` (spa3d's default, not RELION's): the last iteration is one
expectation-maximisation step over all particles instead of a mini-batch
step, i.e. the reference becomes the regularised reconstruction of every
particle at its posterior poses against the SGD reference. A mini-batch
SGD map averages only a few mini-batches (about 1/η of them); the full pass
uses every particle once, which on the 1TII benchmark gives a finer map for
the cost of about four mini-batches (benchmarks/initial_model_vs_relion.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from spa3d.fourier.backprojector import BackProjector
from spa3d.fourier.ctf import ctf_half_plane
from spa3d.fourier.filters import lowpass, power_spectrum, soft_sphere
from spa3d.fourier.grid import rfft2_centered
from spa3d.fourier.projector import Projector
from spa3d.geometry.euler import random_rotations
from spa3d.inference.estep import expectation
from spa3d.inference.search import SearchGrid, search_batch
from spa3d.inference.likelihood import FourierPixels, gemm_flops
from spa3d.io.particles import ParticleSet


@dataclass
class SgdSchedule:
    ini_iter: int = 25
    inbetween_iter: int = 100
    fin_iter: int = 25
    ini_resol: float = 35.0  # Å
    fin_resol: float = 15.0  # Å
    ini_subset: int = 100
    fin_subset: int = 500
    ramp: str = "shells"  # "shells": RELION's resolution ramp, linear in Fourier shells; "angstrom": linear in Å

    @property
    def total(self) -> int:
        return self.ini_iter + self.inbetween_iter + self.fin_iter

    def at(self, it: int) -> tuple[float, int]:
        """(resolution Å, mini-batch size) of iteration ``it`` (1-based)."""
        if it <= self.ini_iter:
            f = 0.0
        elif it <= self.ini_iter + self.inbetween_iter:
            f = (it - self.ini_iter) / max(self.inbetween_iter, 1)
        else:
            f = 1.0
        res = self.ini_resol + f * (self.fin_resol - self.ini_resol)
        sub = int(round(self.ini_subset + f * (self.fin_subset - self.ini_subset)))
        return res, sub

    def resolution(self, it: int, box: int, pixel_size: float) -> float:
        """Resolution (Å) that iteration ``it`` (1-based) works at, for images of ``box`` pixels of ``pixel_size`` Å.

        ``ramp="shells"`` is RELION's rule (ml_optimiser.cpp, updateCurrentResolution): set after iteration
        it − 1 for iteration it, the initial resolution while it − 1 < ini_iter, then linear in Fourier shells,
        ROUND(N·apix/ini) + ROUND((it − 1 − ini_iter)/inbetween_iter · (ROUND(N·apix/fin) − ROUND(N·apix/ini))),
        and the final resolution from iteration ini_iter + inbetween_iter + 1. ``ramp="angstrom"``: linear in
        Å from iteration ini_iter + 1 (spa3d's rule before 2026-11-27, :meth:`at`).
        """
        if self.ramp == "angstrom":
            return self.at(it)[0]
        prev = it - 1
        if prev < self.ini_iter:
            return self.ini_resol
        if prev >= self.ini_iter + self.inbetween_iter:
            return self.fin_resol
        extent = box * pixel_size
        ini_px, fin_px = np.floor(extent / self.ini_resol + 0.5), np.floor(extent / self.fin_resol + 0.5)
        shell = ini_px + np.floor((prev - self.ini_iter) / max(self.inbetween_iter, 1) * (fin_px - ini_px) + 0.5)
        return float(extent / max(shell, 1.0))


@dataclass
class SgdState:
    """Everything needed to continue a run (saved with every write-out)."""

    maps: np.ndarray  # (K, n, n, n)
    momentum: np.ndarray  # (K, n, n, n)
    sigma2: np.ndarray  # (n//2 + 1,) noise power per shell
    class_fractions: np.ndarray  # (K,)
    iteration: int
    rng_state: dict = field(default_factory=dict)


@dataclass
class MinibatchPoses:
    """Per-image result of a mini-batch E-step (arrays of length B) and its noise sums."""

    best_class: np.ndarray
    best_rotation: np.ndarray  # (B, 3, 3) rotation matrices
    best_translation: np.ndarray  # (B, 2) pixels
    max_posterior: np.ndarray
    n_significant: np.ndarray
    log_evidence: np.ndarray
    class_posterior: np.ndarray  # (B, K)
    residual_power: np.ndarray  # (n_shells,) Σ m·|X S − C P|² at the best pose
    pixel_count: np.ndarray  # (n_shells,)
    flops: float = 0.0  # floating-point operations of the E-step's products (likelihoods and M-step sums)
    poses: float = 0.0  # samples scored, summed over the images


@dataclass
class SgdOptions:
    n_classes: int = 1
    particle_diameter: float = 200.0  # Å
    flatten_solvent: bool = True
    ctf: bool = True
    ctf_intact_first_peak: bool = False
    ctf_phase_flipped: bool = False
    rotations: np.ndarray | None = None  # (R, 3, 3) orientation grid
    translations: np.ndarray | None = None  # (T, 2) pixels
    offset_sigma_px: float = 3.0
    step_size: float = 0.5
    momentum: float = 0.9
    tau2_fudge: float = 4.0
    positivity: str = "always"  # negative densities set to 0 (with flatten_solvent): "always", or "initial" phase only (RELION)
    anneal: bool = True  # K > 1: classes drawn towards their mean until the in-between phase ends (RELION)
    symmetry_ops: np.ndarray | None = None  # (G, 3, 3) point group imposed on every mini-batch reconstruction
    device: torch.device | None = None  # where the E-step and back-projection run (default CPU)
    incr_size: float = 10.0  # Fourier shells searched and reconstructed beyond the scheduled resolution
    final_em: int = 1  # the last ``final_em`` iterations: EM steps over all particles (see module docstring)
    final_translations: np.ndarray | None = None  # (T', 2) pixels searched in those EM steps (default: translations)
    estep_batch: int = 500  # particles per E-step call in the full pass (bounds memory: B·T·R floats)
    # coarse-to-fine search (RELION's adaptive oversampling; None: every pose of ``rotations`` × ``translations``)
    search: SearchGrid | None = None
    coarse_radius_px: float = 1e9  # radius (cycles per box) of the coarse pass
    adaptive_fraction: float = 0.999
    max_significant: int = 256
    marginalise_broad: bool = True  # images whose significant set exceeds max_significant: whole coarse grid


def image_planes(ps: ParticleSet, idx: np.ndarray, mask2d: torch.Tensor, o: SgdOptions):
    """Masked images' half-plane FTs (B, n, n//2+1) and CTFs (B, n, n//2+1; ones without CTF) of particles ``idx``."""
    dev = o.device if o.device is not None else torch.device("cpu")
    x = rfft2_centered(torch.as_tensor(ps.read(idx), device=dev) * mask2d.to(dev))
    if o.ctf:
        c = ctf_half_plane(ps.ctf_params(idx), ps.box, ps.pixel_size, intact_first_peak=o.ctf_intact_first_peak,
                           phase_flipped=o.ctf_phase_flipped, device=dev).to(torch.float32)
    else:
        c = torch.ones(x.shape, dtype=torch.float32, device=dev)
    return x, c


def image_pixels(ps: ParticleSet, idx: np.ndarray, px: FourierPixels, mask2d: torch.Tensor, o: SgdOptions):
    """Masked image pixels (B, P) and CTF (B, P) of particles ``idx``."""
    imgs = torch.as_tensor(ps.read(idx), device=px.index.device) * mask2d.to(px.index.device)
    x = px.take(rfft2_centered(imgs))
    if o.ctf:
        c = px.take(ctf_half_plane(ps.ctf_params(idx), ps.box, ps.pixel_size, intact_first_peak=o.ctf_intact_first_peak,
                                   phase_flipped=o.ctf_phase_flipped, device=px.index.device)).to(torch.float32)
    else:
        c = torch.ones(x.shape, dtype=torch.float32, device=x.device)
    return x, c


def shell_average(values: torch.Tensor, shell: torch.Tensor, nsh: int) -> torch.Tensor:
    s = torch.zeros(nsh, dtype=torch.float64, device=values.device).index_add_(0, shell, values.double())
    c = torch.zeros(nsh, dtype=torch.float64, device=values.device).index_add_(
        0, shell, torch.ones_like(values, dtype=torch.float64))
    return (s / c.clamp_min(1)).cpu()


def initial_state(ps: ParticleSet, o: SgdOptions, schedule: SgdSchedule, rng: np.random.Generator) -> SgdState:
    """Random references (particles back-projected in random orientations) and σ² from the images' power."""
    n, apix = ps.box, ps.pixel_size
    nsh = n // 2 + 1
    mask2d = torch.as_tensor(soft_sphere(n, o.particle_diameter / (2 * apix), 5.0, ndim=2))
    px = FourierPixels.make(n, n // 2, device=o.device)
    idx = rng.choice(len(ps), size=min(len(ps), 1000), replace=False)
    x, c = image_pixels(ps, idx, px, mask2d, o)
    # as RELION: the images' mean power less the power of their average (the part the noise does not explain)
    sigma2 = shell_average((x.abs() ** 2).mean(0) - x.mean(0).abs() ** 2, px.shell, nsh).numpy()
    maps = []
    for _ in range(o.n_classes):
        sel = rng.choice(len(ps), size=min(len(ps), max(schedule.ini_subset, 200)), replace=False)
        xs, cs = image_pixels(ps, sel, px, mask2d, o)
        rots = torch.as_tensor(random_rotations(len(sel), rng), dtype=torch.float32, device=o.device)
        bp = BackProjector(n, r_max=n // 2, device=o.device)
        bp.insert_pixels(xs * cs, cs * cs, rots, px.kx, px.ky)
        v = bp.reconstruct().cpu().numpy()
        maps.append(_flatten(lowpass(v, apix, schedule.ini_resol), o, apix))
    maps = np.array(maps)
    return SgdState(maps, np.zeros_like(maps), sigma2, np.full(o.n_classes, 1.0 / o.n_classes), 0)


def _flatten(v: np.ndarray, o: SgdOptions, apix: float, positive: bool = True) -> np.ndarray:
    """Solvent flattening (with ``o.flatten_solvent``): negative densities set to zero when ``positive`` (RELION:
    while iteration < sgd_ini_iter, ml_optimiser.cpp solventFlatten), then the particle's soft sphere."""
    if not o.flatten_solvent:
        return v.astype(np.float32)
    n = v.shape[0]
    if positive:
        v = np.clip(v, 0, None)
    return (v * soft_sphere(n, o.particle_diameter / (2 * apix), 3.0)).astype(np.float32)


def anneal_classes(maps: np.ndarray, it: int, schedule: SgdSchedule) -> np.ndarray:
    """RELION's annealing of K > 1 SGD references (ml_optimiser.cpp, maximization): until the in-between phase
    ends each class becomes frac·V_k + (1 − frac)·mean_k V_k, frac = (it − ini_iter)/inbetween_iter.

    RELION's formula makes frac negative in the initial phase, which flips every class's difference from the
    mean at each iteration; spa3d takes frac = 0 there, i.e. identical references, as RELION's own comment on
    the initial phase says ("completely identical K references")."""
    if len(maps) < 2 or it >= schedule.ini_iter + schedule.inbetween_iter:
        return maps
    frac = max(0.0, (it - schedule.ini_iter) / max(schedule.inbetween_iter, 1))
    return (frac * maps + (1.0 - frac) * maps.mean(0, keepdims=True)).astype(maps.dtype)


def _estep_minibatch(ps: ParticleSet, idx: np.ndarray, maps: np.ndarray, sigma2: np.ndarray,
                     class_fractions: np.ndarray, o: SgdOptions, r_cur: float, residual: bool = False):
    """E-step of particles ``idx`` against ``maps``: (:class:`MinibatchPoses`, back-projectors).

    With ``residual`` the back-projectors hold the residuals (image − CTF·projection), whose
    reconstruction is the SGD gradient. With ``o.search`` the poses are searched coarse-to-fine
    (:func:`spa3d.inference.search.search_batch`), else exhaustively over ``o.rotations`` ×
    ``o.translations``. The particles go through in chunks of ``o.estep_batch``; their weighted
    sums add up in the same back-projectors."""
    n, apix = ps.box, ps.pixel_size
    dev = o.device
    px = FourierPixels.make(n, r_cur, device=dev)
    mask2d = torch.as_tensor(soft_sphere(n, o.particle_diameter / (2 * apix), 5.0, ndim=2))
    bps = [BackProjector(n, r_max=r_cur, device=dev) for _ in range(o.n_classes)]
    posts = []
    chunks = np.array_split(idx, max(1, -(-len(idx) // o.estep_batch)))
    if o.search is not None:
        grid = o.search
        px_c = FourierPixels.make(n, min(r_cur, o.coarse_radius_px), device=dev)
        projectors = [Projector(maps[k], r_max=min(n // 2, r_cur + 2), device=dev) for k in range(o.n_classes)]
        coarse_refs = [p.project_pixels(grid.coarse_rot, px_c.kx, px_c.ky) for p in projectors]
        sigma2_t = torch.as_tensor(sigma2, dtype=torch.float32, device=dev)
        log_prior = torch.as_tensor(np.log(np.clip(class_fractions, 1e-6, None)), dtype=torch.float32, device=dev)
        for chunk in chunks:
            x, c = image_planes(ps, chunk, mask2d, o)
            r = search_batch(x, c, torch.zeros((len(chunk), 2), device=dev), grid, projectors, coarse_refs, px_c, px,
                             sigma2_t, log_prior, o.offset_sigma_px, bps, adaptive_fraction=o.adaptive_fraction,
                             max_significant=o.max_significant, marginalise_broad=o.marginalise_broad,
                             residual=residual)
            posts.append(MinibatchPoses(r.best_class, r.best_rotation, r.best_translation, r.max_posterior,
                                        r.n_significant, r.log_evidence, r.class_posterior, r.residual_shell,
                                        r.pixel_shell, r.flops, r.poses))
        return (_join_posteriors(posts) if len(posts) > 1 else posts[0]), bps
    sigma2_pix = torch.as_tensor(sigma2, dtype=torch.float32, device=dev)[px.shell].clamp_min(1e-12)
    rots = torch.as_tensor(o.rotations, dtype=torch.float32, device=dev)
    trans = torch.as_tensor(o.translations, dtype=torch.float32, device=dev)
    refs = [Projector(maps[k], r_max=r_cur + 1, device=dev).project_pixels(rots, px.kx, px.ky)
            for k in range(o.n_classes)]
    for chunk in chunks:
        x, c = image_pixels(ps, chunk, px, mask2d, o)
        p = expectation(x, c, px, sigma2_pix, refs, np.log(np.clip(class_fractions, 1e-6, None)), rots, trans,
                        o.offset_sigma_px, bps, residual=residual)
        b_, t_, r_, p_ = len(chunk), len(o.translations), len(o.rotations), len(px.index)
        # likelihood GEMMs per class, and the M-step sums (Σ p·C·X·S and Σ p·C², two GEMMs per class)
        flops = o.n_classes * (gemm_flops(b_, t_, r_, p_) + 2.0 * r_ * b_ * t_ * 2 * p_ + 2.0 * r_ * b_ * p_)
        posts.append(MinibatchPoses(p.best_class, np.asarray(o.rotations)[p.best_rotation],
                                    np.asarray(o.translations)[p.best_translation], p.max_posterior, p.n_significant,
                                    p.log_evidence, p.class_posterior, p.residual_power, p.pixel_count, flops,
                                    float(b_ * o.n_classes * t_ * r_)))
    return (_join_posteriors(posts) if len(posts) > 1 else posts[0]), bps


def _estep_minibatch_worker(args):
    """Dask worker side of :func:`_estep_minibatch`: returns (posterior, accumulators)."""
    star, project_dir, idx, maps, sigma2, fractions, o, r_cur, residual, threads = args
    torch.set_num_threads(int(threads))
    post, bps = _estep_minibatch(ParticleSet(star, project_dir), idx, maps, sigma2, fractions, o, r_cur, residual)
    return post, [bp.acc for bp in bps]


def _join_posteriors(posts: list) -> MinibatchPoses:
    cat = {f: np.concatenate([getattr(p, f) for p in posts]) for f in
           ("best_class", "best_rotation", "best_translation", "max_posterior", "n_significant", "log_evidence",
            "class_posterior")}
    m = max(len(p.residual_power) for p in posts)
    rp, pc = np.zeros(m), np.zeros(m)
    for p in posts:
        rp[:len(p.residual_power)] += p.residual_power
        pc[:len(p.pixel_count)] += p.pixel_count
    return MinibatchPoses(**cat, residual_power=rp, pixel_count=pc, flops=sum(p.flops for p in posts),
                          poses=sum(p.poses for p in posts))


def sgd_iteration(ps: ParticleSet, state: SgdState, o: SgdOptions, schedule: SgdSchedule,
                  rng: np.random.Generator, cluster=None) -> dict:
    """One SGD iteration in place on ``state``; returns per-iteration statistics.

    With ``cluster`` (:class:`spa3d.backend.distributed.DaskCluster`) the mini-batch is split over its
    workers and their accumulators are summed in chunk order: the in-process result up to float rounding.
    """
    it = state.iteration + 1
    n, apix = ps.box, ps.pixel_size
    subset = schedule.at(it)[1]
    res = schedule.resolution(it, n, apix)
    positive = o.positivity == "always" or it < schedule.ini_iter
    # as RELION: the E-step and the reconstruction reach ``incr_size`` shells beyond the scheduled resolution
    r_cur = min(n // 2, n * apix / res + o.incr_size)
    res_eff = n * apix / r_cur
    idx = np.sort(rng.choice(len(ps), size=min(subset, len(ps)), replace=False))
    dev = o.device
    full_pass = it > schedule.total - o.final_em
    if full_pass:
        idx = np.arange(len(ps))
        if o.final_translations is not None:
            o = dataclasses.replace(o, translations=o.final_translations)

    t_estep = time.perf_counter()
    if cluster is None:
        post, bps = _estep_minibatch(ps, idx, state.maps, state.sigma2, state.class_fractions, o, r_cur,
                                     not full_pass)
    else:
        o_cpu = dataclasses.replace(o, device=torch.device("cpu"))
        chunks = [c for c in np.array_split(idx, cluster.n_chunks) if len(c)]
        out = cluster.map(_estep_minibatch_worker, [
            (str(ps.star_path), str(ps.project_dir), c, state.maps, state.sigma2, state.class_fractions, o_cpu,
             r_cur, not full_pass, cluster.threads) for c in chunks])
        post = _join_posteriors([p for p, _ in out])
        bps = [BackProjector(n, r_max=r_cur, device=dev) for _ in range(o.n_classes)]
        for k, bp in enumerate(bps):
            bp.acc = sum(acc[k].cpu() for _, acc in out).to(dev)
    t_estep = time.perf_counter() - t_estep
    # noise spectrum: running average of the best-pose residual power
    m = len(post.pixel_count)
    est = post.residual_power / np.maximum(post.pixel_count, 1)
    upd = post.pixel_count > 0
    mu = 0.0 if full_pass else o.momentum
    state.sigma2[:m][upd] = mu * state.sigma2[:m][upd] + (1 - mu) * est[upd]
    cp = post.class_posterior.astype(np.float64).sum(0)
    frac = cp / max(cp.sum(), 1e-300)  # each image's class posterior sums to 1 only to single precision
    state.class_fractions = mu * state.class_fractions + (1 - mu) * frac
    for k in range(o.n_classes):
        power = power_spectrum(state.maps[k])
        tau2 = (o.tau2_fudge * power / np.maximum(state.sigma2, 1e-12))
        if full_pass:  # EM: the reference becomes the reconstruction of all particles
            v_new = bps[k].reconstruct(symmetry_ops=o.symmetry_ops, tau2=tau2).cpu().numpy()
            v_new = _flatten(lowpass(v_new, apix, res_eff), o, apix, positive)
            state.momentum[k] = v_new - state.maps[k]
            state.maps[k] = v_new
            continue
        # RELION's gradient: the regularised reconstruction of the residuals. Its fixed point is the
        # unregularised solution, so the map does not shrink towards the Wiener estimate of one mini-batch;
        # shells the map has no power in yet are reconstructed without a prior, as RELION does.
        grad = bps[k].reconstruct(symmetry_ops=o.symmetry_ops, tau2=tau2, unregularised_where_tau2_zero=True)
        grad = lowpass(grad.cpu().numpy(), apix, res_eff)
        state.momentum[k] = o.momentum * state.momentum[k] + (1 - o.momentum) * o.step_size * grad
        state.maps[k] = _flatten(lowpass(state.maps[k] + state.momentum[k], apix, res_eff), o, apix, positive)
    if o.anneal and not full_pass:
        state.maps = anneal_classes(state.maps, it, schedule)
    state.iteration = it
    return {"iteration": it, "resolution": res, "subset": len(idx), "indices": idx, "posterior": post,
            "estep_seconds": t_estep,
            "translations": o.translations}
