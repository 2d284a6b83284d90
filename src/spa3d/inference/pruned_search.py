"""Global search with a pre-pass one HEALPix order coarser (three levels instead of two).

At HEALPix order 3 (3.75°) the global search's coarse pass scores every
image against every rotation of the grid (36,864 in C1, 9,216 in D2) times
every coarse translation, although almost all of an image's posterior sits in
a few of them. This search adds a level in front of the coarse-to-fine search
of :mod:`spa3d.inference.search` (not in RELION, which scores the whole
coarse grid):

1. **pre-pass**: every image against the grid one order coarser (8× fewer
   rotations) at that order's coarse radius (half the coarse pass's), all
   coarse translations; an image keeps every rotation whose best
   translation scores within ``PREPASS_MARGIN`` nats of its best sample (at
   most the ``PREPASS_MAX_ROTATIONS`` best; a
   wider net than the posterior mass: a 15° grid can sit 11° from the true
   pose, and a wrong pose then scores better at the coarse radius);
2. **coarse pass**: each image against only those rotations of the current
   grid within ``reach`` (default 1.25 coarser steps, symmetry mates
   included) of the rotations it kept and of its previous pose, all coarse
   translations, at the coarse radius; significant samples as in
   :func:`spa3d.inference.search.search_batch`;
3. **fine pass**: their children, with the M-step sums, by the global
   search's fine pass (:func:`spa3d.inference.search._fine_pass`).

An image keeps at most the ``PREPASS_MAX_ROTATIONS`` best of the rotations
within the margin; one whose coarse-pass posterior is too broad for
``max_significant`` samples is treated as the exhaustive search treats it:
with ``marginalise_broad`` it goes through that search (marginalised over
the whole grid), without it keeps its ``max_significant`` best samples.
Conventions as :mod:`spa3d.inference.search` (translations in pixels moving
the image by +t, radii in cycles per box); rotations are symmetry mates when
A·L = B for a symmetry operator L (:func:`spa3d.jobs.refine3d.orientation_changes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from spa3d import kernels
from spa3d.fourier.backprojector import BackProjector
from spa3d.fourier.projector import Projector
from spa3d.inference.likelihood import FourierPixels, abs2, residual_power
from spa3d.inference.search import (GPU_CHUNK_BYTES, BatchResult, SearchGrid, _coarse_posterior, _fine_pass,
                                    _pixel_weights, batch_outputs, batch_result, search_batch, significant_samples)

#: a coarse-grid rotation is searched when it lies within this many pre-pass steps of a kept pre-pass
#: rotation: the true pose is within about 0.75 steps of its nearest pre-pass rotation (measured: 11.3° at most on
#: the 15° grid of 300 random rotations) and its nearest coarse rotation about half as far from it (0.38 steps)
PREPASS_REACH = 1.25
#: the pre-pass keeps every rotation whose best translation scores within this many nats (log-likelihood units)
#: of the image's best sample, where the posterior mass alone keeps samples within about 7: measured on 600
#: particles of 1TII entering 3.75°, the exhaustive search's pose lay up to 28 nats below the pre-pass's best
#: (1 % of the particles beyond 19), and 9 of 4,608 rotations lay within 30 nats on average (at most 47)
PREPASS_MARGIN = 30.0
#: but at most this many, the best-scoring: with a real micrograph's noise (1,000 particles of 1TII, SNR 0.1)
#: 400 rotations lay within 30 nats on average, and the exhaustive search's pose was near the pre-pass's 25th
#: best at worst (99 %: 10th; 600 relion_project particles: 11th)
PREPASS_MAX_ROTATIONS = 64


@dataclass
class PrePass:
    """The pre-pass of one batch: the coarser grid's rotations, their projections and the coarse grid's
    rotations near each.

    refs: per class (Rp, Pp) projections of ``rotations`` at ``px``; neighbours: CSR (indptr (Rp + 1,), indices)
    of the coarse grid's rotations within ``reach_deg`` of each pre-pass rotation (long tensors); ``index``
    finds the coarse grid's rotations near any other rotation (an image's previous pose).
    """

    rotations: torch.Tensor  # (Rp, 3, 3)
    px: FourierPixels
    refs: list[torch.Tensor]
    indptr: torch.Tensor
    indices: torch.Tensor
    index: "RotationIndex"
    reach_deg: float
    max_rotations: int = 64  # pre-pass rotations an image keeps at most (PREPASS_MAX_ROTATIONS)


class RotationIndex:
    """The rotations of a grid (R, 3, 3) and their symmetry mates ``rot[r] @ L`` (``ops`` (G, 3, 3)) in a k-d tree
    of unit quaternions q and −q: two rotations θ apart have quaternions 2·sin(θ/4) apart (for the nearer sign)."""

    def __init__(self, rot: np.ndarray, ops: np.ndarray):
        mates = np.einsum("rik,gkj->rgij", rot.astype(np.float64), ops.astype(np.float64)).reshape(-1, 3, 3)
        q = Rotation.from_matrix(mates).as_quat()
        self.owner = np.tile(np.repeat(np.arange(len(rot)), len(ops)), 2)
        self.tree = cKDTree(np.concatenate([q, -q]))

    def near(self, rot: np.ndarray, max_angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
        """For each of ``rot`` (M, 3, 3), the grid's rows with a mate within ``max_angle_deg`` degrees: CSR
        (indptr (M + 1,), indices)."""
        q = Rotation.from_matrix(rot.astype(np.float64)).as_quat()
        hits = self.tree.query_ball_point(q, r=2 * np.sin(np.deg2rad(max_angle_deg) / 4))
        lists = [np.unique(self.owner[np.asarray(h, dtype=np.int64)]) for h in hits]
        indptr = np.zeros(len(lists) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(h) for h in lists])
        return indptr, (np.concatenate(lists) if lists else np.zeros(0)).astype(np.int64)


_INDEX_CACHE: dict = {}


def make_prepass(pre_rot: torch.Tensor, grid: SearchGrid, ops: np.ndarray, projectors: list[Projector],
                 px: FourierPixels, reach_deg: float, max_rotations: int = PREPASS_MAX_ROTATIONS) -> PrePass:
    """The :class:`PrePass` of a chunk of images: projections of the coarser grid ``pre_rot`` at ``px`` and the
    rotations of ``grid.coarse_rot`` within ``reach_deg`` degrees of each (cached: the grids of an iteration
    repeat); each image keeps at most ``max_rotations`` pre-pass rotations."""
    a, b = pre_rot.cpu().numpy(), grid.coarse_rot.cpu().numpy()
    key = (a.shape, b.shape, a.tobytes(), b.tobytes(), ops.tobytes(), float(reach_deg))
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        index = RotationIndex(b, ops)
        _INDEX_CACHE[key] = index, index.near(a, reach_deg)
    index, (indptr, indices) = _INDEX_CACHE[key]
    dev = grid.coarse_rot.device
    refs = [p.project_pixels(pre_rot, px.kx, px.ky) for p in projectors]
    return PrePass(pre_rot, px, refs, torch.as_tensor(indptr, device=dev), torch.as_tensor(indices, device=dev),
                   index, float(reach_deg), int(max_rotations))


def _expand(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR lookup: (position in ``rows`` of each entry, column) for all entries of ``rows``."""
    start, count = indptr[rows], indptr[rows + 1] - indptr[rows]
    src = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), count)
    pos = torch.arange(len(src), device=rows.device) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    return src, indices[start[src] + pos]


def _candidates(img: torch.Tensor, k: torch.Tensor, rp: torch.Tensor, k_cls: int, n_rc: int, pre: PrePass,
                seeds: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The coarse (class, rotation) candidates of each image: the coarse rotations near the pre-pass rotations it
    kept (image ``img``, class ``k``, pre-pass rotation ``rp``), same class, and, with ``seeds`` (image, rotation)
    pairs, those rotations in every class.

    Returns (images with candidates, sorted; per image the padded candidate (class, rotation) arrays (B', J) and
    their validity mask)."""
    dev = img.device
    n_rp = pre.rotations.shape[0]
    key = torch.unique((img * k_cls + k) * n_rp + rp)
    src, r = _expand(pre.indptr, pre.indices, key % n_rp)
    cand = [(key // n_rp)[src] * n_rc + r]
    if seeds is not None:
        s_img, s_rot = seeds
        for kk in range(k_cls):
            cand.append((s_img * k_cls + kk) * n_rc + s_rot)
    cand = torch.unique(torch.cat(cand))  # sorted by image, then class, then rotation
    ci, cr = cand // n_rc, cand % n_rc
    c_img, c_cls = ci // k_cls, ci % k_cls
    images, per = torch.unique_consecutive(c_img, return_counts=True)
    j_max = int(per.max()) if len(per) else 0
    row = torch.repeat_interleave(torch.arange(len(images), device=dev), per)
    col = torch.arange(len(cand), device=dev) - torch.repeat_interleave(torch.cumsum(per, 0) - per, per)
    rot_pad = torch.zeros((len(images), j_max), dtype=torch.long, device=dev)
    cls_pad = torch.zeros_like(rot_pad)
    valid = torch.zeros((len(images), j_max), dtype=torch.bool, device=dev)
    rot_pad[row, col], cls_pad[row, col], valid[row, col] = cr, c_cls, True
    return images, rot_pad, cls_pad, valid


def _merge_rows(res: BatchResult, sub: BatchResult, rows: np.ndarray) -> BatchResult:
    """``res`` with the per-image results of ``rows`` from ``sub`` (a search of those images alone) and the batch
    sums of both."""
    for name in ("best_class", "best_rotation", "best_translation", "max_posterior", "n_significant", "log_evidence",
                 "class_posterior", "rot_spread_deg", "trans_spread_px", "scale_xa", "scale_aa", "residual_image"):
        dst = getattr(res, name)
        if dst is not None:
            dst[rows] = getattr(sub, name)
    res.offset_sq_sum += sub.offset_sq_sum
    res.residual_terms = res.residual_terms + sub.residual_terms
    res.residual_shell = residual_power(res.residual_terms)
    res.pixel_shell = res.pixel_shell + sub.pixel_shell
    res.flops += sub.flops
    res.poses += sub.poses
    return res


def _coarse_scores(xs: torch.Tensor, cs: torch.Tensor, w: torch.Tensor, phases: torch.Tensor,
                   coarse_refs: list[torch.Tensor], rot_pad: torch.Tensor, cls_pad: torch.Tensor, valid: torch.Tensor,
                   lpt: torch.Tensor, log_class_prior: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """Log-posteriors (B', Tc, J) of each image's candidates (−inf where not ``valid``), up to a constant per image.

    xs (B', P) complex images, cs (B', P) CTFs, w (P,) weights m/σ², phases (Tc, P), lpt (B', Tc) translation log
    priors; candidate j of image i is class ``cls_pad[i, j]``'s coarse projection ``rot_pad[i, j]``. On the CPU
    the fine pass's compiled kernels score blocks of 4 translations × 8 candidates straight from the projection
    table (a per-image copy of each image's projections cost as much as the products); elsewhere one batched
    product per chunk of images.
    """
    dev = xs.device
    n_i, j_max = rot_pad.shape
    n_t, n_p = phases.shape
    n_rc = coarse_refs[0].shape[0]
    refs_all = coarse_refs[0] if len(coarse_refs) == 1 else torch.cat(coarse_refs)  # (K·Rc, P): row k·Rc + r
    rows_all = cls_pad * n_rc + rot_pad
    norm_x = ((xs.real**2 + xs.imag**2) * w).sum(1)
    ll = torch.full((n_i, n_t, j_max), -torch.inf, dtype=torch.float32, device=dev)
    if kernels.have_compiled_kernels() and dev.type == "cpu":
        per = valid.sum(1)
        n_grp = (per + 7) // 8
        r_img = torch.repeat_interleave(torch.arange(n_i, device=dev), n_grp)  # (image, group of 8) rows
        r_g = torch.arange(len(r_img), device=dev) - torch.repeat_interleave(torch.cumsum(n_grp, 0) - n_grp, n_grp)
        cols = r_g[:, None] * 8 + torch.arange(8, device=dev)
        ok = cols < per[r_img][:, None]  # valid entries come first in each image's row
        cols = torch.minimum(cols, (per[r_img] - 1)[:, None])
        inv = rows_all[r_img[:, None], cols]  # (R, 8) table rows
        n_q = (n_t + 3) // 4
        s_row = torch.arange(len(r_img), device=dev).repeat_interleave(n_q)  # (S,) pairs (row, group of 4 shifts)
        t4 = torch.arange(n_q, device=dev).repeat(len(r_img))[:, None] * 4 + torch.arange(4, device=dev)
        child_t = t4.clamp_max(n_t - 1)
        xw = xs * (cs * w)
        power = kernels.pair_power(cs * cs * w, abs2(refs_all), r_img, inv)  # (R, 8)
        cross = kernels.fine_cross(xw, phases, refs_all, r_img[s_row], child_t, inv[s_row])  # (S, 4, 8)
        img_s = r_img[s_row]
        part = (cross - 0.5 * power[s_row][:, None, :] - 0.5 * norm_x[img_s][:, None, None]
                + lpt[img_s[:, None], child_t][:, :, None] + log_class_prior[inv[s_row] // n_rc][:, None, :])
        keep = (t4 < n_t)[:, :, None] & ok[s_row][:, None, :]
        flat = (img_s[:, None, None] * (n_t * j_max) + child_t[:, :, None] * j_max + cols[s_row][:, None, :])
        ll.view(-1)[flat[keep]] = part[keep]
        return ll
    budget = chunk_bytes if dev.type == "cpu" else max(chunk_bytes, GPU_CHUNK_BYTES)  # a GPU: few large launches
    bc = int(max(1, min(n_i, budget // max(1, 8 * (j_max + n_t) * n_p))))
    for s0 in range(0, n_i, bc):
        sl = slice(s0, min(s0 + bc, n_i))
        a_ri = torch.view_as_real(xs[sl][:, None, :] * phases[None] * (cs[sl] * w)[:, None, :]).reshape(
            -1, n_t, 2 * n_p)
        cw2 = (cs[sl] * cs[sl] * w).repeat_interleave(2, dim=-1)[:, None, :]
        proj = torch.view_as_real(refs_all[rows_all[sl]]).reshape(-1, j_max, 2 * n_p)
        cross = torch.bmm(a_ri, proj.transpose(1, 2))  # (b', Tc, J)
        power = torch.bmm(cw2, proj.square_().transpose(1, 2))  # (b', 1, J), the projections squared in place
        part = (cross - 0.5 * power - 0.5 * norm_x[sl, None, None] + lpt[sl][:, :, None]
                + log_class_prior[cls_pad[sl]][:, None, :])
        ll[sl] = part.masked_fill(~valid[sl][:, None, :], -torch.inf)
    return ll


def pruned_search_batch(x_full: torch.Tensor, ctf_full: torch.Tensor, old_offsets: torch.Tensor, grid: SearchGrid,
                        pre: PrePass, projectors: list[Projector], coarse_refs: list[torch.Tensor],
                        px_coarse: FourierPixels, px_fine: FourierPixels, sigma2_shell: torch.Tensor,
                        log_class_prior: torch.Tensor, offset_sigma_px: float,
                        backprojectors: list[BackProjector] | None = None,
                        allowed_class: torch.Tensor | None = None, adaptive_fraction: float = 0.999,
                        max_significant: int = 256, marginalise_broad: bool = True,
                        half: torch.Tensor | None = None, norm_stats: bool = False,
                        x_recon: torch.Tensor | None = None, prior_rot: torch.Tensor | None = None,
                        chunk_bytes: int = 64 << 20) -> BatchResult:
    """E-step (and M-step sums) of one batch with a pre-pass (see the module's docstring).

    Arguments as :func:`spa3d.inference.search.search_batch` (global searches, soft assignment, no direction
    prior), plus ``pre`` (:func:`make_prepass`) and ``prior_rot`` (B, 3, 3), each image's previous rotation:
    the coarse rotations within the pre-pass's reach of it are always candidates, so that an image whose
    pre-pass misses keeps its previous pose in the running (a 15° grid can sit 11° from a pose, and then a wrong
    one can score better at its coarse radius). The images are searched against ``grid``'s translations at
    every level."""
    dev = x_full.device
    b = x_full.shape[0]
    k_cls = len(coarse_refs)
    n_t, n_rc, n_rp = grid.coarse_trans.shape[0], grid.coarse_rot.shape[0], pre.rotations.shape[0]

    def prior_t(total: torch.Tensor) -> torch.Tensor:
        return -(total**2).sum(-1) / (2 * max(offset_sigma_px, 1e-3) ** 2)

    lpt = prior_t(old_offsets[:, None, :] + grid.coarse_trans[None])  # (B, Tc)
    flops, poses = 0.0, 0.0

    # ---- 1. pre-pass: the coarser grid, every image; each image keeps the rotations whose best translation
    # scores within PREPASS_MARGIN of its best sample (all its log-posteriors: fraction 2 marks every image broad)
    xp, cp = pre.px.take(x_full), pre.px.take(ctf_full)
    wp = _pixel_weights(pre.px, sigma2_shell, False)
    ll1 = _coarse_posterior(xp, cp, wp, pre.refs, pre.px.shift_phases(grid.coarse_trans), log_class_prior,
                            allowed_class, lpt, None, 2.0, 1)[0]  # (B, K, Tc, Rp)
    n_pp = xp.shape[1]
    flops += k_cls * (2.0 * b * n_t * 2 * n_pp * n_rp + 2.0 * b * n_pp * n_rp)
    poses += float(b * k_cls * n_t * n_rp)
    llr = ll1.amax(2).reshape(b, k_cls * n_rp)
    del ll1
    keep1 = llr >= llr.amax(1, keepdim=True) - PREPASS_MARGIN
    if keep1.shape[1] > pre.max_rotations:  # and only the best max_rotations of those
        top = torch.zeros_like(keep1)
        top.scatter_(1, torch.topk(llr, pre.max_rotations, dim=1).indices, True)
        keep1 &= top
    img1, kr = keep1.nonzero(as_tuple=True)
    seeds = None
    if prior_rot is not None:  # and the coarse rotations near each image's previous pose
        indptr, indices = pre.index.near(prior_rot.cpu().numpy(), pre.reach_deg)
        seeds = _expand(torch.as_tensor(indptr, device=dev), torch.as_tensor(indices, device=dev),
                        torch.arange(b, device=dev))
    images, rot_pad, cls_pad, valid = _candidates(img1, kr // n_rp, kr % n_rp, k_cls, n_rc, pre, seeds)
    exhaustive = torch.ones(b, dtype=torch.bool, device=dev)  # an image without candidates: the whole grid
    exhaustive[images] = False

    # ---- 2. coarse pass: each image against the coarse rotations near its pre-pass samples ----
    out, sums = batch_outputs(b, k_cls, int(px_fine.shell.max()) + 1, dev)
    if norm_stats:
        sums["res_image"] = torch.zeros(b, dtype=torch.float64, device=dev)
    n_sig_all = torch.zeros(b, dtype=torch.long, device=dev)
    if len(images):
        ll = _coarse_scores(px_coarse.take(x_full[images]), px_coarse.take(ctf_full[images]).to(torch.float32),
                            _pixel_weights(px_coarse, sigma2_shell, False), px_coarse.shift_phases(grid.coarse_trans),
                            coarse_refs, rot_pad, cls_pad, valid, lpt[images], log_class_prior, chunk_bytes)
        n_i, j_max, n_p = len(images), rot_pad.shape[1], px_coarse.kx.shape[0]
        n_cand = int(valid.sum())
        flops += n_cand * (2.0 * n_t * 2 * n_p + 2.0 * n_p)
        poses += float(n_cand * n_t)
        img2, flat2, n_sig, covered2 = significant_samples(ll.reshape(n_i, -1), adaptive_fraction, max_significant)
        del ll
        # a posterior too broad for the cap: marginalised over the whole grid by the exhaustive search, or (as the
        # exhaustive search does without ``marginalise_broad``) cut to its ``max_significant`` best samples
        broad2 = (covered2 < adaptive_fraction) & marginalise_broad
        exhaustive[images[broad2]] = True
        n_sig_all[images] = n_sig
        ok = ~broad2[img2]
        img2, flat2 = img2[ok], flat2[ok]
        t2, j2 = flat2 // j_max, flat2 % j_max
        flat_grid = cls_pad[img2, j2] * (n_t * n_rc) + t2 * n_rc + rot_pad[img2, j2]
        members = torch.zeros(b, dtype=torch.bool, device=dev)
        members[images[~broad2]] = True
        sums["flops"], sums["poses"] = flops, poses
        if len(img2):
            # ---- 3. fine pass: children of the significant coarse samples, M-step sums ----
            _fine_pass(images[img2], flat_grid, b, members, x_full, ctf_full, old_offsets, grid, projectors,
                       px_fine, sigma2_shell, log_class_prior, k_cls, False, prior_t, None, backprojectors, 512, out,
                       sums, False, half, None, adaptive_fraction, x_recon)
    else:
        sums["flops"], sums["poses"] = flops, poses
    res = batch_result(out, sums, n_sig_all)
    if bool(exhaustive.any()):  # broad posteriors: the whole coarse grid
        sel = exhaustive.nonzero()[:, 0]
        sub = search_batch(x_full[sel], ctf_full[sel], old_offsets[sel], grid, projectors, coarse_refs, px_coarse,
                           px_fine, sigma2_shell, log_class_prior, offset_sigma_px, backprojectors,
                           None if allowed_class is None else allowed_class[sel], False, adaptive_fraction,
                           max_significant, marginalise_broad=marginalise_broad,
                           half=None if half is None else half[sel], norm_stats=norm_stats,
                           x_recon=None if x_recon is None else x_recon[sel])
        res = _merge_rows(res, sub, sel.cpu().numpy())
    return res
