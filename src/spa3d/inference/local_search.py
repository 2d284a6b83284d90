"""Local searches: each image scored only at rotations near its previous pose (RELION's --sigma_ang).

RELION's auto-refine switches to local searches once its angular sampling
reaches ``--auto_local_healpix_order`` (1.8°): a Gaussian prior of σ (twice
the sampling step) on the angle to the previous rotation, zero beyond 3σ
(ml_optimiser.cpp, updateAngularSampling; sampling.cpp,
selectOrientationsWithNonZeroPriorProbability). Every image has its own
neighbourhood, so the global search's shared GEMM (every image against every
rotation of the grid) would spend almost all of its work on rotations of
zero prior. Here each image is scored against its own rotations,
``A_prev · Δ_j`` for a fixed set of small rotations Δ_j, coarse to fine as
the global search (RELION's adaptive oversampling):

1. coarse pass: Δ_j on a cubic lattice of rotation vectors, spacing twice
   the sampling step, covering the 3σ ball, and the coarse translations, at
   the coarse radius, in one batched matrix product per chunk of images;
   the samples holding ``adaptive_fraction`` of each image's posterior are
   kept;
2. fine pass: their 8 rotation children (± half a coarse spacing along each
   axis: the lattice at the sampling step) and 4 translation children, at
   the full radius, with the M-step sums, by the global search's fine pass
   (:func:`spa3d.inference.search._fine_pass`) on a grid made of the batch's
   own rotations.

Conventions as :mod:`spa3d.inference.search`: half-plane Fourier pixels
inside a radius (cycles per box), translations in pixels moving the image by
+t, the posterior over (class, translation, rotation) of each image.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from spa3d.fourier.backprojector import BackProjector
from spa3d.fourier.projector import Projector
from spa3d.inference.likelihood import FourierPixels
from spa3d.inference.search import BatchResult, _pixel_weights


def local_rotations(step_deg: float, sigma_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The local search's coarse rotations and their children (rotation vectors in degrees).

    Coarse: a cubic lattice of spacing 2·``step_deg`` inside 3σ plus half a
    lattice diagonal (so that the children cover the 3σ ball), the identity
    included; children: the 8 points ± ``step_deg``/2 along each axis around
    each, the lattice at the sampling step (child j of coarse c is row 8c + j).
    Returns (coarse (Jc, 3, 3), their angles (Jc,) in degrees, children (Jc·8, 3, 3)).
    """
    coarse_step = 2.0 * float(step_deg)
    reach = 3 * sigma_deg + 0.5 * np.sqrt(3) * coarse_step
    m = int(np.floor(reach / coarse_step + 1e-9))
    g = np.arange(-m, m + 1) * coarse_step
    v = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    v = v[np.linalg.norm(v, axis=1) <= reach + 1e-9]
    corners = np.stack(np.meshgrid([-1, 1], [-1, 1], [-1, 1], indexing="ij"), -1).reshape(8, 3) * (step_deg / 2)
    children = (v[:, None, :] + corners[None]).reshape(-1, 3)
    as_matrix = lambda r: Rotation.from_rotvec(np.deg2rad(r)).as_matrix()  # noqa: E731
    return as_matrix(v), np.linalg.norm(v, axis=1), as_matrix(children)


# a local pre-pass keeps every pre-pass rotation whose best sample lies within this many nats of the image's best
LOCAL_PREPASS_MARGIN = 30.0


def local_prepass_cells(step_deg: float, sigma_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """The local pre-pass: every other point of :func:`local_rotations`' coarse lattice and the cells they own.

    The coarse lattice points whose integer coordinates are all even form the pre-pass lattice (twice the
    coarse spacing, the identity included; about 27 of 250 points). Cell p holds the coarse points within
    one coarse spacing of pre-pass point p along every axis, so every coarse point lies in at least one
    cell. Returns (pre (Jp,) indices into the coarse points, member (Jp, Jc) bool).
    """
    coarse_step = 2.0 * float(step_deg)
    reach = 3 * sigma_deg + 0.5 * np.sqrt(3) * coarse_step
    m = int(np.floor(reach / coarse_step + 1e-9))
    g = np.arange(-m, m + 1)
    ijk = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    ijk = ijk[np.linalg.norm(ijk * coarse_step, axis=1) <= reach + 1e-9]  # the rows of local_rotations' coarse
    pre = np.nonzero((ijk % 2 == 0).all(1))[0]
    member = (np.abs(ijk[None, :, :] - ijk[pre][:, None, :]) <= 1).all(-1)
    return pre, member


def local_search_batch(x_full: torch.Tensor, ctf_full: torch.Tensor, old_offsets: torch.Tensor,
                       prior_rot: torch.Tensor, local: tuple, coarse_trans: torch.Tensor, fine_trans: torch.Tensor,
                       projectors: list[Projector], px_coarse: FourierPixels, px_fine: FourierPixels,
                       sigma2_shell: torch.Tensor, log_class_prior: torch.Tensor, offset_sigma_px: float,
                       sigma_ang: float, backprojectors: list[BackProjector] | None = None,
                       allowed_class: torch.Tensor | None = None, adaptive_fraction: float = 0.999,
                       max_significant: int = 256, half: torch.Tensor | None = None,
                       chunk_bytes: int = 128 << 20, norm_stats: bool = False,
                       x_recon: torch.Tensor | None = None, prepass: tuple | None = None) -> BatchResult:
    """E-step (and M-step sums) of one batch, searching each image's neighbourhood only.

    x_full (B, n, n//2+1): image FTs shifted by ``old_offsets`` (B, 2) pixels;
    ctf_full: CTF times the group scale; prior_rot (B, 3, 3): each image's
    previous rotation; ``local``: :func:`local_rotations`' output as tensors
    (coarse Δ, their angles in degrees, children); the rotations searched are
    ``prior_rot[b] @ Δ``, with a Gaussian prior of ``sigma_ang`` degrees on
    the angle (zero beyond 3σ in the coarse pass); coarse_trans (Tc, 2) and
    fine_trans (Tc·4, 2) pixels (:func:`oversampled_translations`), with a
    Gaussian prior (``offset_sigma_px``) on the total offset; allowed_class
    (B,) restricts an image to one class (-1 any). M-step sums go to
    ``backprojectors[k]`` (``[h·K + k]`` with ``half``), as the global search's, from ``x_recon`` (the
    unmasked images; default ``x_full``).

    ``prepass`` (:func:`local_prepass_cells`' output as tensors, and a margin in nats): the coarse pass first
    scores the pre-pass rotations only, then the coarse rotations in the cells of every pre-pass rotation
    whose best sample lies within the margin of the image's best (and in the previous pose's cell); the
    other coarse samples count as zero posterior. None: every coarse rotation (RELION's way).
    """
    from spa3d.inference.search import SearchGrid, _fine_pass, batch_outputs, batch_result, significant_samples

    dev = x_full.device
    b = x_full.shape[0]
    k_cls = len(projectors)
    deltas, delta_deg, children = local
    n_j, n_t = deltas.shape[0], coarse_trans.shape[0]
    # the batch's own grid: image b's coarse rotations are rows b·Jc .. b·Jc + Jc − 1, their children 8 each
    rots = torch.matmul(prior_rot[:, None].to(torch.float32), deltas[None].to(torch.float32))  # (B, Jc, 3, 3)
    fine_rots = torch.matmul(prior_rot[:, None].to(torch.float32), children[None].to(torch.float32))
    grid = SearchGrid(rots.reshape(-1, 3, 3), fine_rots.reshape(-1, 3, 3), coarse_trans, fine_trans)

    # ---- coarse pass, each image against its own rotations ----
    xs, cs = px_coarse.take(x_full), px_coarse.take(ctf_full).to(torch.float32)
    w = _pixel_weights(px_coarse, sigma2_shell, False)
    phases = px_coarse.shift_phases(coarse_trans)
    n_p = xs.shape[1]
    norm_x = ((xs.real**2 + xs.imag**2) * w).sum(1)
    prior_t_c = -((old_offsets[:, None, :] + coarse_trans[None]) ** 2).sum(-1) / (2 * max(offset_sigma_px, 1e-3) ** 2)
    prior_r_c = -(delta_deg.to(torch.float32) ** 2) / (2 * sigma_ang**2)  # (Jc,)
    allowed = allowed_class if allowed_class is not None else torch.full((b,), -1, device=dev, dtype=torch.long)
    ll = torch.full((b, k_cls, n_t, n_j), -torch.inf, device=dev)
    flops, n_scored = 0.0, 0
    ar_t = torch.arange(n_t, device=dev)

    def score(cols: torch.Tensor) -> None:
        """ll[b, k, t, cols[b, j]] for every image's own coarse rotations cols (B, J), chunked by memory."""
        nonlocal flops
        n_c = cols.shape[1]
        bc = int(max(1, min(b, chunk_bytes // max(1, 8 * n_c * n_p))))
        for s0 in range(0, b, bc):
            sl = slice(s0, min(s0 + bc, b))
            a_ri = torch.view_as_real(xs[sl][:, None, :] * phases[None] * (cs[sl] * w)[:, None, :]).reshape(-1, n_t,
                                                                                                             2 * n_p)
            cw2 = (cs[sl] * cs[sl] * w).repeat_interleave(2, dim=-1)[:, None, :]  # (b, 1, 2P): the weight of re, im
            for k in range(k_cls):
                rows = ((allowed[sl] < 0) | (allowed[sl] == k)).nonzero()[:, 0]
                if len(rows) == 0:
                    continue
                img = rows + s0
                c_r = cols[img]  # (R, J)
                pr = projectors[k].project_pixels(rots[img[:, None], c_r].reshape(-1, 3, 3), px_coarse.kx,
                                                  px_coarse.ky)
                pr_ri = torch.view_as_real(pr).reshape(len(rows), n_c, n_p, 2)
                cross = torch.bmm(a_ri[rows], pr_ri.reshape(len(rows), n_c, 2 * n_p).transpose(1, 2))
                # Σ_p c²w |proj|², squaring the projections in place (they are not needed again): a fresh squared
                # copy and its sum over (re, im) cost ten times the product itself
                power = torch.bmm(cw2[rows], pr_ri.reshape(len(rows), n_c, 2 * n_p).square_().transpose(1, 2))
                val = (cross - 0.5 * power - 0.5 * norm_x[img, None, None] + prior_t_c[img][:, :, None]
                       + prior_r_c[c_r][:, None, :] + log_class_prior[k])
                ll[img[:, None, None], k, ar_t[None, :, None], c_r[:, None, :]] = val
                flops += len(rows) * (2.0 * n_t * 2 * n_p * n_c + 2.0 * n_p * n_c)

    if prepass is None:
        score(torch.arange(n_j, device=dev).expand(b, n_j))
        n_scored = b * n_j
    else:
        pre, member, margin = prepass
        pre, member = pre.to(dev), member.to(dev)
        score(pre.expand(b, len(pre)))
        best_pre = ll[:, :, :, pre].amax(dim=(1, 2))  # (B, Jp)
        keep = best_pre >= best_pre.amax(1, keepdim=True) - float(margin)
        centre = int(torch.nonzero(delta_deg[pre] == 0)[0, 0])  # the previous pose's cell, always
        keep[:, centre] = True
        sel = (keep.to(torch.float32) @ member.to(torch.float32)) > 0  # (B, Jc)
        sel[:, pre] = False  # scored already
        count = sel.sum(1)
        j1 = int(count.max())
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :j1]
        cols = torch.where(torch.arange(j1, device=dev)[None] < count[:, None], order, order[:, :1])
        if j1 > 0:
            score(cols)
        n_scored = int(b * len(pre) + count.sum())
    n_sig_all = torch.zeros(b, dtype=torch.long, device=dev)
    img, flat, n_sig, _ = significant_samples(ll.reshape(b, -1), adaptive_fraction, max_significant)
    n_sig_all[:] = n_sig
    # flat index into the batch's grid: (class, coarse translation, rotation b·Jc + j)
    kk, tt, jj = flat // (n_t * n_j), (flat // n_j) % n_t, flat % n_j
    n_rc = b * n_j
    flat_grid = kk * (n_t * n_rc) + tt * n_rc + img * n_j + jj

    # ---- fine pass: children of the significant samples, M-step sums (the global search's) ----
    def prior_t(total: torch.Tensor) -> torch.Tensor:
        return -(total**2).sum(-1) / (2 * max(offset_sigma_px, 1e-3) ** 2)

    def prior_r(r: torch.Tensor, images: torch.Tensor, cutoff: bool = True) -> torch.Tensor:
        tr = torch.einsum("sij,smij->sm", prior_rot[images].to(torch.float32), r)
        ang = torch.rad2deg(torch.arccos(((tr - 1) / 2).clamp(-1, 1)))
        return -(ang**2) / (2 * sigma_ang**2)

    out, sums = batch_outputs(b, k_cls, int(px_fine.shell.max()) + 1, dev)
    sums["flops"], sums["poses"] = flops, float(k_cls * n_t * n_scored)
    if norm_stats:  # each image's residual power (see search.BatchResult.residual_image)
        sums["res_image"] = torch.zeros(b, dtype=torch.float64, device=dev)
    _fine_pass(img, flat_grid, b, torch.ones(b, dtype=torch.bool, device=dev), x_full, ctf_full, old_offsets, grid,
               projectors, px_fine, sigma2_shell, log_class_prior, k_cls, False, prior_t, prior_r, backprojectors,
               512, out, sums, False, half, fraction=adaptive_fraction, x_recon=x_recon)
    return batch_result(out, sums, n_sig_all)
