"""Coarse-to-fine E-step over class × translation × rotation (RELION's adaptive oversampling).

For a batch of images (already shifted by their current offsets):

1. **Coarse pass**: log-likelihoods of every (class k, coarse translation,
   coarse rotation) at a coarse radius (the lower of the current radius and
   ``coarse_radius``), as two GEMMs per class (:mod:`.likelihood`). Each
   image's posterior over these samples is sorted and the smallest set that
   holds ``adaptive_fraction`` of it (at most ``max_significant`` samples) is
   kept: the *significant* coarse samples.
2. **Fine pass**: for every significant coarse sample its 8 rotation children
   (HEALPix order + 1, ψ ± step/4) × 4 translation children (± step/4) are
   scored at the full current radius, in batched matrix products over all
   images of the batch at once. The posterior of each image is normalised
   over its fine samples (all others have zero probability).
3. **Accumulation** (M-step sums): for each fine rotation the posterior-
   weighted, shifted, CTF-multiplied images are summed (``Σ_t p·X·S_t·C``,
   weight ``Σ_t p·C²``) and inserted into that class's back-projector.

All quantities are per half-plane Fourier pixel inside a radius in cycles per
box; translations are in pixels and move the image by +t (the new origin is
the old origin + t).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spa3d import kernels
from spa3d.fourier.backprojector import BackProjector
from spa3d.geometry.sampling import angular_step, oversampled_orientations, oversampled_translations
from spa3d.fourier.projector import Projector
from spa3d.inference.likelihood import (FourierPixels, abs2, coarse_terms, reference_terms, residual_power,
                                        residual_power_terms)


#: on a GPU, the fine pass's pairs are processed in chunks of about this many bytes of operands (on the CPU the
#: compiled kernels take them all at once, the torch code in chunks of ``pair_chunk``)
GPU_CHUNK_BYTES = 1 << 30
#: on the CPU, the coarse pass takes the images in chunks whose log-likelihoods (per class) take about this many
#: bytes, so that its GEMM's output is still in cache when the kernel selects the significant samples
#: (measured: 1.5× faster than one batch-wide GEMM at 300 images, 29 translations, 4,608 rotations)
COARSE_CHUNK_BYTES = 8 << 20
#: bytes of one (pairs, 4, 8) float32 score array assembled at a time once the compiled kernel has the cross terms
#: (broad posteriors give 10⁵ pairs a batch: chunks of 512 spent their time in Python)
SCORE_CHUNK_BYTES = 32 << 20
#: the fine pass keeps the projections of every (class, fine rotation) its samples reach, and their M-step sums,
#: at the full radius: about 40·P bytes a row (P Fourier pixels) plus 4 a row and image. Where they would take
#: more than this, the batch's images go through in parts (local searches give each image rotations of its own,
#: so a batch of 512 images with broad posteriors reached 2·10⁵ rows: 24 GB at box 256 and Nyquist). A global
#: search's parts reach nearly the same rows as the whole (every image meets most of the grid), so each part
#: repeats the projections and back-projections: 1 GiB on the CPU split 512 images of real-micrograph noise at 7.5°
#: into 8 parts, 21.2 s against 7.3 s whole (2.8 GB peak)
FINE_TABLE_BYTES = {"cpu": 4 << 30, "cuda": 4 << 30}


@dataclass
class SearchGrid:
    """Coarse and fine (oversampled ×8 rotations, ×4 translations) search grids."""

    coarse_rot: torch.Tensor  # (Rc, 3, 3)
    fine_rot: torch.Tensor  # (Rc·8, 3, 3); children of coarse c are rows 8c..8c+7
    coarse_trans: torch.Tensor  # (Tc, 2) pixels
    fine_trans: torch.Tensor  # (Tc·4, 2); children of coarse t are rows 4t..4t+3


def make_search_grid(order: int, symmetry: str, offset_range: float, offset_step: float, device=None) -> SearchGrid:
    """The coarse grid (HEALPix ``order``, translations every ``offset_step`` pixels within ``offset_range``)
    and its oversampled children (order + 1, half the translation step)."""
    from spa3d.geometry.euler import euler_to_matrix

    coarse_t, fine_t = oversampled_translations(offset_range, offset_step)
    ce, fe = oversampled_orientations(order, symmetry)
    f32 = dict(dtype=torch.float32, device=device)
    return SearchGrid(torch.as_tensor(euler_to_matrix(*ce.T), **f32), torch.as_tensor(euler_to_matrix(*fe.T), **f32),
                      torch.as_tensor(coarse_t, **f32), torch.as_tensor(fine_t, **f32))


def coarse_radius(order: int, particle_diameter: float, box: int, pixel_size: float) -> float:
    """Radius (cycles per box) of the coarse pass, as RELION sets it.

    A rotation by the coarse angular step moves the particle's edge by
    step·π·diameter/360 Å; the coarse pass uses frequencies up to 1.2× finer
    than that distance.
    """
    moved = angular_step(order) / 360.0 * np.pi * particle_diameter
    return float(np.ceil(box * pixel_size / (moved / 1.2)))


@dataclass
class BatchResult:
    """Per-image results of one batch (arrays of length B) and batch sums."""

    best_class: np.ndarray
    best_rotation: np.ndarray  # (B, 3, 3) rotation matrix of the best sample
    best_translation: np.ndarray  # (B, 2) pixels, the fine translation found (relative to the old offset)
    max_posterior: np.ndarray
    n_significant: np.ndarray  # significant coarse samples; -1: marginalised over all coarse samples
    log_evidence: np.ndarray
    class_posterior: np.ndarray  # (B, K)
    rot_spread_deg: np.ndarray  # posterior RMS angle to the best rotation
    trans_spread_px: np.ndarray  # posterior RMS distance to the best translation
    offset_sq_sum: float  # Σ_b Σ p·|old offset + t|² (pixels²), for the offset prior
    residual_shell: np.ndarray  # (nsh,) Σ_b Σ_poses p·m·|X·S − C·P|² (posterior-weighted), per shell of the fine radius
    pixel_shell: np.ndarray  # (nsh,) Σ_b m per shell
    scale_xa: np.ndarray  # (B,) Σ Re(X·S · conj(C·P)) at the best pose (group scale statistics)
    scale_aa: np.ndarray  # (B,) Σ |C·P|²
    flops: float = 0.0  # floating-point operations of the batch's products (likelihoods and M-step sums)
    poses: float = 0.0  # (class, rotation, translation) samples scored, summed over the batch's images
    residual_terms: np.ndarray | None = None  # (3, nsh) residual_shell's terms (see likelihood.residual_power_terms)
    rot_weight: np.ndarray | None = None  # (K, Rc) Σ posterior per (class, coarse rotation), with a direction prior
    # (B,) with ``norm_stats``: Σ_poses p·Σ m·|X·S − C·P|² over the fine pixels, no σ² (RELION's statistics of
    # the per-image normalisation correction; images marginalised over the coarse grid: at their best pose)
    residual_image: np.ndarray | None = None


def significant_samples(ll: torch.Tensor, fraction: float, max_samples: int):
    """Indices (flat, per image) of the smallest set of samples holding ``fraction`` of each posterior.

    ll: (B, S) log-posteriors up to a constant. Returns (image index, flat
    sample index) arrays over all kept samples, the count per image and the
    posterior mass each image's kept samples hold.
    """
    b, s = ll.shape
    k = min(max_samples, s)
    top, idx = torch.topk(ll, k, dim=1)
    p = torch.exp(top - top[:, :1])
    z = torch.exp(ll - top[:, :1]).sum(1, keepdim=True)
    cum = torch.cumsum(p / z, dim=1)
    keep = (cum - p / z) < fraction  # include the sample that crosses the fraction
    keep[:, 0] = True
    img = torch.arange(b, device=ll.device)[:, None].expand(b, k)[keep]
    covered = torch.where(keep, p / z, torch.zeros_like(p)).sum(1)
    return img, idx[keep], keep.sum(1), covered


def significant_fine(post: torch.Tensor, img: torch.Tensor, n_img: int, fraction: float) -> torch.Tensor:
    """The fine posteriors ``post`` (S, M) with each image's insignificant samples set to zero.

    img: (S,) the image of each row; each image's posteriors sum to 1 over its rows. As RELION's
    ``exp_significant_weight``, an image keeps the largest samples that together hold ``fraction`` of its
    posterior (and every sample as large as the smallest of them); only those enter the M-step sums (the
    rest hold at most 1 − ``fraction`` of it), renormalised to sum to 1 per image. Returns a new tensor;
    ``fraction`` ≥ 1 keeps everything.
    """
    if fraction >= 1.0 or post.numel() == 0:
        return post
    s, m = post.shape
    vals = post.reshape(-1).to(torch.float64)
    owner = img[:, None].expand(s, m).reshape(-1)
    # by image, largest first: one int64 key, the image above the float32 bits of the value (which order as the
    # values do for values ≥ 0); 2.3× faster than a stable sort of a float64 key, which also lost tiny values
    bits = post.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64).clamp_min(0)
    order = torch.argsort(owner.to(torch.int64) * (1 << 31) + ((1 << 31) - 1 - bits))
    v_sorted, o_sorted = vals[order], owner[order]
    before = torch.cumsum(v_sorted, 0) - v_sorted  # mass of all earlier samples (all images)
    count = torch.bincount(o_sorted, minlength=n_img)
    start = torch.cumsum(count, 0) - count
    offset = before[start.clamp_max(max(len(before) - 1, 0))]  # mass of the earlier images' samples
    keep = (before - offset[o_sorted]) < fraction
    thr = torch.full((n_img,), torch.inf, dtype=torch.float64, device=post.device)
    thr = thr.scatter_reduce(0, o_sorted[keep], v_sorted[keep], reduce="amin")
    kept = torch.where(post.to(torch.float64) >= thr[img][:, None], post, torch.zeros_like(post))
    mass = torch.zeros(n_img, dtype=post.dtype, device=post.device).index_add_(0, img, kept.sum(1))
    return kept / mass[img].clamp_min(1e-30)[:, None]


def _pixel_weights(px: FourierPixels, sigma2_shell: torch.Tensor, cross_correlation: bool) -> torch.Tensor:
    """Per-pixel weights m/σ² of the likelihood (m alone for cross-correlation scores)."""
    m = px.multiplicity.to(torch.float32)
    return m if cross_correlation else m / sigma2_shell[px.shell].clamp_min(1e-12)


def add_at(dst: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """dst[rows, cols] += values (repeated (row, col) pairs add up), in place; returns dst (2-D, contiguous).

    Deterministic on the CPU: one index_add_ along the flattened array adds in index order, where
    ``index_put_(..., accumulate=True)`` adds with atomics across threads and so in an order that changes from
    run to run (last-bit differences that a same-seed run must not have).
    """
    flat = (rows * dst.shape[1] + cols).reshape(-1)
    dst.view(-1).index_add_(0, flat, values.reshape(-1).to(dst.dtype))
    return dst


def _segment_logsumexp(values: torch.Tensor, seg: torch.Tensor, n_seg: int):
    """Per-segment max and log Σ exp of ``values`` (N, M), segments ``seg`` (N,)."""
    row_max = values.max(1).values
    mx = torch.full((n_seg,), -torch.inf, dtype=values.dtype, device=values.device)
    mx = mx.scatter_reduce(0, seg, row_max, reduce="amax")
    e = torch.exp(values - mx[seg][:, None])
    z = torch.zeros(n_seg, dtype=values.dtype, device=values.device).index_add_(0, seg, e.sum(1))
    return mx, torch.log(z)


def search_batch(x_full: torch.Tensor, ctf_full: torch.Tensor, old_offsets: torch.Tensor, grid: SearchGrid,
                 projectors: list[Projector], coarse_refs: list[torch.Tensor], px_coarse: FourierPixels,
                 px_fine: FourierPixels, sigma2_shell: torch.Tensor, log_class_prior: torch.Tensor,
                 offset_sigma_px: float, backprojectors: list[BackProjector] | None = None,
                 allowed_class: torch.Tensor | None = None, hard: bool = False,
                 adaptive_fraction: float = 0.999, max_significant: int = 256,
                 prior_rot: torch.Tensor | None = None, sigma_ang: float | None = None,
                 marginalise_broad: bool = True, pair_chunk: int = 512, residual: bool = False,
                 half: torch.Tensor | None = None, log_dir_prior: torch.Tensor | None = None,
                 norm_stats: bool = False, x_recon: torch.Tensor | None = None) -> BatchResult:
    """E-step (and M-step sums) for one batch.

    x_full: (B, n, n//2+1) complex image FTs shifted by the old offsets;
    ctf_full: (B, n, n//2+1) CTF (times the group scale), 1 without CTF;
    old_offsets: (B, 2) pixels; coarse_refs: per class (Rc, Pc) projections at
    ``px_coarse``; sigma2_shell: noise power per shell; log_class_prior: (K,);
    allowed_class: (B,) restricts image b to one class (-1 = any);
    hard: cross-correlation scoring with the best sample taking all the
    weight (RELION's --firstiter_cc); prior_rot (B, 3, 3) and sigma_ang
    (degrees): local searches, a Gaussian prior on the angle to the prior
    rotation, zero beyond 3σ; marginalise_broad: images whose significant
    set would exceed ``max_significant`` are marginalised over the whole
    coarse grid (else their posterior is cut to the top samples).
    residual: the back-projectors receive the residuals Σ p·C·(X·S − C·P) at
    every pose instead of Σ p·C·X·S (RELION's SGD gradient), same weights.
    half: (B,) 0 or 1, the random half set of each image; then ``backprojectors``
    holds 2K back-projectors, half h's class k at index h·K + k.
    log_dir_prior: (K, Rc) log prior of each (class, coarse rotation), RELION's pdf_direction (which holds the
    class's mass, so it replaces ``log_class_prior``); the fine samples take their coarse parent's. The result's
    ``rot_weight`` (K, Rc) then sums the posterior of every (class, coarse rotation) for the M-step.
    norm_stats: also return each image's posterior-weighted residual power (``residual_image``).
    x_recon: the images the back-projectors receive, as ``x_full`` (default ``x_full``): RELION scores the
    masked images but reconstructs from the unmasked ones (ml_optimiser.cpp, ``exp_Fimg_nomask``), which keep
    the CTF-delocalised signal that a mask at the particle's edge cuts off; the noise statistics stay those
    of the scored images.
    """
    dev = x_full.device
    b = x_full.shape[0]
    k_cls = len(coarse_refs)

    def prior_t(total: torch.Tensor) -> torch.Tensor:
        return -(total**2).sum(-1) / (2 * max(offset_sigma_px, 1e-3) ** 2)

    def prior_r(rots: torch.Tensor, images: torch.Tensor | None, cutoff: bool = True) -> torch.Tensor:
        """Log prior of rotations (B, R) or, with ``images``, rotations (S, M) of image ``images``."""
        ref = prior_rot if images is None else prior_rot[images]
        if images is None:
            tr = torch.einsum("bij,rij->br", ref, rots)
        else:
            tr = torch.einsum("sij,smij->sm", ref, rots)
        ang = torch.rad2deg(torch.arccos(((tr - 1) / 2).clamp(-1, 1)))
        lp = -(ang**2) / (2 * sigma_ang**2)
        return torch.where((ang <= 3 * sigma_ang) | (not cutoff), lp, torch.full_like(lp, -torch.inf))

    local = prior_rot is not None and sigma_ang is not None and sigma_ang > 0
    if log_dir_prior is not None:
        log_class_prior = torch.zeros_like(log_class_prior)

    # ---- coarse pass ----
    xc = px_coarse.take(x_full)
    cc = px_coarse.take(ctf_full)
    wc = _pixel_weights(px_coarse, sigma2_shell, hard)
    phases_c = px_coarse.shift_phases(grid.coarse_trans)
    if hard:  # cross-correlation; the best coarse sample only
        lls = []
        for k in range(k_cls):
            ll = _cc_scores(xc, cc, wc, coarse_refs[k], phases_c)
            if local:
                ll = ll + prior_r(grid.coarse_rot, None)[:, None, :]
            if allowed_class is not None:
                ok = (allowed_class < 0) | (allowed_class == k)
                ll = ll.masked_fill(~ok[:, None, None], -torch.inf)
            lls.append(ll)
        ll = torch.stack(lls, dim=1)  # (B, K, Tc, Rc)
        flat = ll.reshape(b, -1).argmax(1)
        img = torch.arange(b, device=dev)
        n_sig = torch.ones(b, dtype=torch.long, device=dev)
        broad = torch.zeros(b, dtype=torch.bool, device=dev)
    else:
        ll, img, flat, n_sig, covered = _coarse_posterior(
            xc, cc, wc, coarse_refs, phases_c, log_class_prior, allowed_class,
            prior_t(old_offsets[:, None, :] + grid.coarse_trans[None]),
            prior_r(grid.coarse_rot, None) if local else None, adaptive_fraction, max_significant, log_dir_prior)
        # images whose posterior is too broad for the cap (ll holds their rows): marginalised over the whole
        # coarse grid instead
        broad = covered < adaptive_fraction
        if not marginalise_broad:
            broad = torch.zeros_like(broad)
        keep = ~broad[img]
        img, flat = img[keep], flat[keep]
    out, sums = batch_outputs(b, k_cls, int(px_fine.shell.max()) + 1, dev)
    if log_dir_prior is not None:
        sums["rot_weight"] = torch.zeros((k_cls, grid.coarse_rot.shape[0]), dtype=torch.float64, device=dev)
    if norm_stats:
        sums["res_image"] = torch.zeros(b, dtype=torch.float64, device=dev)
    n_pc, n_tc, n_rc = xc.shape[1], grid.coarse_trans.shape[0], grid.coarse_rot.shape[0]
    sums["flops"] += k_cls * (2.0 * b * n_tc * 2 * n_pc * n_rc + 2.0 * b * n_pc * n_rc)  # cross and power GEMMs
    sums["poses"] += float(b * k_cls * n_tc * n_rc)
    if bool(broad.any()):
        sel = broad.nonzero()[:, 0]
        rows = ll[sel] if hard else ll  # the hard pass's ll covers every image; _coarse_posterior's the broad ones
        _coarse_marginal(sel, rows.reshape(len(sel), -1), x_full[sel], ctf_full[sel], old_offsets[sel], grid, projectors, px_fine,
                         sigma2_shell, k_cls, backprojectors, out, sums, residual, None if half is None else half[sel],
                         None if x_recon is None else x_recon[sel])
        n_sig[sel] = -1
    del ll
    if len(img):
        _fine_pass(img, flat, b, ~broad, x_full, ctf_full, old_offsets, grid, projectors, px_fine, sigma2_shell,
                   log_class_prior, k_cls, hard, prior_t, prior_r if local else None, backprojectors, pair_chunk,
                   out, sums, residual, half, log_dir_prior, adaptive_fraction, x_recon)
    return batch_result(out, sums, n_sig)


def batch_outputs(b: int, k_cls: int, nsh: int, dev) -> tuple[dict, dict]:
    """Empty per-image outputs (B images, K classes) and batch sums (``nsh`` shells) that the fine pass fills."""
    out = {"bk": torch.zeros(b, dtype=torch.long, device=dev), "brot": torch.zeros((b, 3, 3), device=dev),
           "btrans": torch.zeros((b, 2), device=dev), "pmax": torch.zeros(b, device=dev),
           "loge": torch.zeros(b, device=dev), "class_post": torch.zeros((b, k_cls), device=dev),
           "rot_spread": torch.zeros(b, device=dev), "trans_spread": torch.zeros(b, device=dev),
           "xa": torch.zeros(b, device=dev), "aa": torch.zeros(b, device=dev)}
    sums = {"off_sq": 0.0, "flops": 0.0, "poses": 0.0, "res_terms": torch.zeros((3, nsh), dtype=torch.float64, device=dev),
            "pix_shell": torch.zeros(nsh, dtype=torch.float64, device=dev)}
    return out, sums


def batch_result(out: dict, sums: dict, n_sig: torch.Tensor) -> BatchResult:
    """The :class:`BatchResult` of a batch from the outputs and sums of :func:`batch_outputs`."""
    return BatchResult(out["bk"].cpu().numpy(), out["brot"].cpu().numpy(), out["btrans"].cpu().numpy(),
                       out["pmax"].cpu().numpy(), n_sig.cpu().numpy(), out["loge"].cpu().numpy(),
                       out["class_post"].cpu().numpy(), out["rot_spread"].sqrt().cpu().numpy(),
                       out["trans_spread"].sqrt().cpu().numpy(), float(sums["off_sq"]),
                       residual_power(sums["res_terms"]).cpu().numpy(), sums["pix_shell"].cpu().numpy(),
                       out["xa"].cpu().numpy(), out["aa"].cpu().numpy(), sums["flops"], sums["poses"],
                       sums["res_terms"].cpu().numpy(),
                       sums["rot_weight"].cpu().numpy() if "rot_weight" in sums else None,
                       sums["res_image"].cpu().numpy() if "res_image" in sums else None)


def _coarse_posterior(xc, cc, wc, coarse_refs, phases_c, log_class_prior, allowed_class, log_prior_t, log_prior_r,
                      fraction, cap, log_dir_prior=None):
    """Coarse log-posteriors of the broad images and the significant samples of each image.

    log_prior_t: (B, Tc) translation log priors; log_prior_r: (B, Rc) or None. Returns (ll, image index, flat
    sample index, count per image, covered mass per image) as :func:`significant_samples`, with ll (B', K, Tc,
    Rc) the log-posteriors of the B' images whose significant samples hold less than ``fraction`` (in image
    order). On the CPU the images go through in chunks whose GEMM output stays in cache (about
    ``COARSE_CHUNK_BYTES`` per class) and the compiled kernel assembles ll in place and selects in one sweep
    per image; elsewhere torch does it for the whole batch.
    """
    k_cls = len(coarse_refs)
    b, n_t, n_r = xc.shape[0], phases_c.shape[0], coarse_refs[0].shape[0]
    on_cpu = xc.device.type == "cpu" and kernels.have_compiled_kernels()
    bc = max(1, min(b, int(COARSE_CHUNK_BYTES // (4 * n_t * n_r)))) if on_cpu else b
    parts, broad_ll = [], []
    refs = reference_terms(coarse_refs)
    for s0 in range(0, b, bc):
        s1 = min(b, s0 + bc)
        cross, half_power, norm_x = coarse_terms(xc[s0:s1], cc[s0:s1], wc, refs, phases_c)
        if log_dir_prior is not None:  # a (class, rotation) prior enters as the power term does: −(power/2 − log prior)
            half_power -= log_dir_prior[:, None, :].to(half_power.dtype)
        row_const = (-0.5 * norm_x)[:, None] + log_class_prior[None, :].to(norm_x.dtype)  # (B', K)
        if allowed_class is not None:
            ac = allowed_class[s0:s1, None]
            ok = (ac < 0) | (ac == torch.arange(k_cls, device=xc.device))
            row_const = row_const.masked_fill(~ok, -torch.inf)
        lpt = log_prior_t[s0:s1].contiguous()
        lpr = log_prior_r[s0:s1].contiguous() if log_prior_r is not None else None
        res = kernels.coarse_significant(cross, half_power, row_const.contiguous(), lpt, lpr, fraction, cap)
        if res is not None:
            img, flat, n_sig, covered = res[:4]
            ll = cross.transpose(0, 1)
        else:
            ll = cross - half_power[:, :, None, :] + row_const.T[:, :, None, None] + lpt[None, :, :, None]
            if lpr is not None:
                ll = ll + lpr[None, :, None, :]
            ll = ll.transpose(0, 1)  # (B', K, Tc, Rc)
            img, flat, n_sig, covered = significant_samples(ll.reshape(ll.shape[0], -1), fraction, cap)
        wide = (covered < fraction).nonzero()[:, 0]
        if len(wide):
            broad_ll.append(ll[wide])  # a copy: the chunk itself is freed
        parts.append((img + s0, flat, n_sig, covered))
        del cross, ll
    img, flat, n_sig, covered = (torch.cat([p[i] for p in parts]) for i in range(4))
    ll = torch.cat(broad_ll) if broad_ll else xc.new_empty((0, k_cls, n_t, n_r), dtype=torch.float32)
    return ll, img, flat, n_sig, covered


def _fine_pass(img, flat, b, sharp, x_full, ctf_full, old_offsets, grid, projectors, p_fine, sigma2_shell,
               log_class_prior, k_cls, hard, prior_t, prior_r, backprojectors, pair_chunk, out, sums, residual=False,
               half=None, log_dir_prior=None, fraction=1.0, x_recon=None):
    """Score the children of the significant coarse samples (image ``img``, flat index ``flat``); fill ``out``.

    The M-step sums take each image's significant fine samples only (``fraction`` of its posterior,
    :func:`significant_fine`; 1: all of them); the back-projectors receive ``x_recon`` (default ``x_full``)."""
    dev = x_full.device
    n_tc = grid.coarse_trans.shape[0]
    n_rc = grid.coarse_rot.shape[0]
    local = prior_r is not None
    pk = flat // (n_tc * n_rc)
    pt = (flat // n_rc) % n_tc
    pr = flat % n_rc

    # ---- fine pass over the children of every significant coarse sample ----
    xf = p_fine.take(x_full)
    cf = p_fine.take(ctf_full)
    wf = _pixel_weights(p_fine, sigma2_shell, hard)
    child_r = pr[:, None] * 8 + torch.arange(8, device=dev)[None]  # (S, 8)
    child_t = pt[:, None] * 4 + torch.arange(4, device=dev)[None]  # (S, 4)
    # projections of the fine rotations needed in this batch, per class (and half set: the M-step sums of the
    # two halves go to separate back-projectors, so each (half, class, rotation) is a row of its own)
    n_rf = grid.fine_rot.shape[0]
    dest = pk if half is None else half[img] * k_cls + pk  # back-projector of each sample
    key = dest[:, None] * n_rf + child_r  # (S, 8) unique id of (half, class, fine rotation)
    uniq, inv = torch.unique(key.reshape(-1), return_inverse=True)
    budget = FINE_TABLE_BYTES.get(dev.type, FINE_TABLE_BYTES["cuda"])
    members = sharp.clone()
    members[img] = True
    idx = members.nonzero()[:, 0]
    if len(uniq) * (40 * p_fine.kx.shape[0] + 4 * b) > budget and len(idx) > 1:
        # too many rows for one go: the images in two parts (the outputs are per image, the sums add up)
        del key, uniq, inv, xf, cf, wf, child_r, child_t
        for part in (idx[: len(idx) // 2], idx[len(idx) // 2:]):
            in_part = torch.zeros(b, dtype=torch.bool, device=dev)
            in_part[part] = True
            m = in_part[img]
            _fine_pass(img[m], flat[m], b, sharp & in_part, x_full, ctf_full, old_offsets, grid, projectors, p_fine,
                       sigma2_shell, log_class_prior, k_cls, hard, prior_t, prior_r, backprojectors, pair_chunk, out,
                       sums, residual, half, log_dir_prior, fraction, x_recon)
        return
    inv = inv.reshape(key.shape)
    table = torch.empty((len(uniq), p_fine.kx.shape[0]), dtype=torch.complex64, device=dev)
    u_dest = uniq // n_rf
    u_cls = u_dest % k_cls
    u_rot = uniq % n_rf
    for k in range(k_cls):
        sel = (u_cls == k).nonzero()[:, 0]
        if len(sel):
            table[sel] = projectors[k].project_pixels(grid.fine_rot[u_rot[sel]], p_fine.kx, p_fine.ky).to(torch.complex64)
    phases_f = p_fine.shift_phases(grid.fine_trans)
    n_pairs = len(img)
    scores = torch.empty((n_pairs, 4, 8), dtype=torch.float32, device=dev)
    norm_x = ((xf.real**2 + xf.imag**2) * wf).sum(1)  # (B,)
    # Σ_p C²w|P|² of every sample's 8 child rotations (S, 8)
    table_power = abs2(table)  # (U, P)
    power_pairs, power_flops = _pair_power(cf * cf * wf, table_power, img, inv)
    # interleaved (re, im) real views: one real batched product gives Re Σ conj(a)·P without copies
    table_ri = torch.view_as_real(table).reshape(len(table), -1)  # (U, 2P)
    n_p = xf.shape[1]
    if dev.type != "cpu":  # few large launches: a chunk's operands take about 100·P bytes per pair
        pair_chunk = max(pair_chunk, int(GPU_CHUNK_BYTES // (100 * n_p)))
    xw = xf * (cf * wf)
    cross_all = kernels.fine_cross(xw, phases_f, table, img, child_t, inv)
    if cross_all is not None:  # the scores need no more products: few, large element-wise steps (128 B a pair each)
        pair_chunk = max(pair_chunk, int(SCORE_CHUNK_BYTES // 128))
    for s0 in range(0, n_pairs, pair_chunk):
        s1 = min(n_pairs, s0 + pair_chunk)
        ii = img[s0:s1]
        if cross_all is not None:
            cross = cross_all[s0:s1]
        else:
            a = xw[ii][:, None, :] * phases_f[child_t[s0:s1]]  # (s, 4, P)
            proj = table_ri[inv[s0:s1]]  # (s, 8, 2P)
            cross = torch.bmm(torch.view_as_real(a).reshape(-1, 4, 2 * n_p), proj.transpose(1, 2))  # (s, 4, 8)
        power = power_pairs[s0:s1][:, None, :]  # (s, 1, 8)
        if hard:
            scores[s0:s1] = cross / power.clamp_min(1e-30).sqrt()
        else:
            ll = -0.5 * (norm_x[ii][:, None, None] - 2 * cross + power)
            ll = ll + prior_t(old_offsets[ii][:, None, :] + grid.fine_trans[child_t[s0:s1]])[:, :, None]
            if log_dir_prior is None:
                ll = ll + log_class_prior[pk[s0:s1]][:, None, None]
            else:  # the fine samples take their coarse parent's (class, direction) prior
                ll = ll + log_dir_prior[pk[s0:s1], pr[s0:s1]][:, None, None]
            if local:
                ll = ll + prior_r(grid.fine_rot[child_r[s0:s1]], ii, cutoff=False)[:, None, :]
            scores[s0:s1] = ll
    n_u = len(uniq)
    # per sample: 4 shifted images (6 flops a complex product) and 4 × 8 dot products of 2P; the power terms
    sums["flops"] += n_pairs * (24.0 + 128.0) * n_p + power_flops
    sums["poses"] += 32.0 * n_pairs
    flat_scores = scores.reshape(n_pairs, 32)
    mx, lse = _segment_logsumexp(flat_scores, img, b)
    if hard:
        post = (flat_scores == mx[img][:, None]).to(torch.float32)
        cnt = torch.zeros(b, device=dev).index_add_(0, img, post.sum(1))
        post = post / cnt[img][:, None]
    else:
        post = torch.exp(flat_scores - (mx + lse)[img][:, None])
    post = post.reshape(n_pairs, 4, 8)
    # best sample per image
    pmax_row = post.reshape(n_pairs, 32).max(1)
    best_p = torch.zeros(b, device=dev).scatter_reduce(0, img, pmax_row.values, reduce="amax")
    is_best = pmax_row.values >= best_p[img]
    pair_of_best = torch.full((b,), -1, dtype=torch.long, device=dev)
    pair_of_best[img[is_best]] = is_best.nonzero()[:, 0]
    j = pmax_row.indices[pair_of_best]
    bt = child_t[pair_of_best, j // 8]
    br = child_r[pair_of_best, j % 8]
    bk = pk[pair_of_best]
    class_post = add_at(torch.zeros((b, k_cls), device=dev), img, pk, post.sum((1, 2)))
    if "rot_weight" in sums:
        add_at(sums["rot_weight"], pk, pr, post.sum((1, 2)).double())
    # spreads of the posterior around the best pose
    r_best = grid.fine_rot[br][img]  # (S, 3, 3)
    r_child = grid.fine_rot[child_r]  # (S, 8, 3, 3)
    cosang = ((torch.einsum("sij,skij->sk", r_best, r_child) - 1) / 2).clamp(-1, 1)
    ang2 = torch.rad2deg(torch.arccos(cosang)) ** 2  # (S, 8)
    rot_spread = torch.zeros(b, device=dev).index_add_(0, img, (post.sum(1) * ang2).sum(1))
    t_child = grid.fine_trans[child_t]  # (S, 4, 2)
    d2 = ((t_child - grid.fine_trans[bt][img][:, None, :]) ** 2).sum(-1)  # (S, 4)
    trans_spread = torch.zeros(b, device=dev).index_add_(0, img, (post.sum(2) * d2).sum(1))
    tot = old_offsets[img][:, None, :] + t_child
    off_sq = float((post.sum(2) * (tot**2).sum(-1)).sum())

    # scale statistics at the best pose (images of the fine pass only)
    best_proj = table[inv[pair_of_best, j % 8]]  # (B, P)
    xs_best = xf * phases_f[bt]
    cp = cf * best_proj
    m = p_fine.multiplicity.to(torch.float32)
    sums["pix_shell"].index_add_(0, p_fine.shell, m.double() * int(sharp.sum()))
    sums["off_sq"] += off_sq
    sel = sharp.nonzero()[:, 0]
    out["bk"][sel] = bk[sel]
    out["brot"][sel] = grid.fine_rot[br][sel]
    out["btrans"][sel] = grid.fine_trans[bt][sel]
    out["pmax"][sel] = best_p[sel]
    out["loge"][sel] = (mx + lse)[sel]
    out["class_post"][sel] = class_post[sel]
    out["rot_spread"][sel] = rot_spread[sel]
    out["trans_spread"][sel] = trans_spread[sel]
    out["xa"][sel] = ((xs_best.real * cp.real + xs_best.imag * cp.imag) * m).sum(1)[sel]
    out["aa"][sel] = ((cp.real**2 + cp.imag**2) * m).sum(1)[sel]

    # the M-step sums: each image's significant fine samples only (RELION's exp_significant_weight)
    if not hard:
        post = significant_fine(post.reshape(n_pairs, 32), img, b, fraction).reshape(n_pairs, 4, 8)
    live_pair = (post.reshape(n_pairs, 32) > 0).any(1).nonzero()[:, 0]
    img_m, child_t_m, inv_m, post_m = img[live_pair], child_t[live_pair], inv[live_pair], post[live_pair]
    n_m = len(live_pair)
    # sum the contributions of all images per (class, fine rotation) first: one row each to insert
    c2 = cf * cf
    # Σ_t p over each sample's translations, per (image, table row): the CTF² weights as one GEMM-free sum
    wrow = torch.zeros((b, n_u), dtype=torch.float32, device=dev)
    add_at(wrow, img_m[:, None].expand(-1, 8), inv_m, post_m.sum(1))
    # rows (half, class, fine rotation) that some significant sample reached: the only ones summed and inserted;
    # a live pair's child rotations without weight anywhere go to a spare last row, dropped
    live = (wrow.sum(0) > 0).nonzero()[:, 0]
    n_l = len(live)
    row_live = torch.full((n_u,), n_l, dtype=torch.long, device=dev)
    row_live[live] = torch.arange(n_l, device=dev)
    inv_l = row_live[inv_m]

    def accumulate(xc):  # Σ p·C·X·S per live table row
        acc = kernels.fine_accumulate(xc, phases_f, post_m, img_m, child_t_m, inv_l, n_l + 1)
        if acc is None:
            acc_ri = torch.zeros((n_l + 1, 2 * n_p), dtype=torch.float32, device=dev)  # interleaved (re, im)
            for s0 in range(0, n_m, pair_chunk):
                s1 = min(n_m, s0 + pair_chunk)
                ii = img_m[s0:s1]
                pt_ = post_m[s0:s1].transpose(1, 2)  # (s, 8, 4)
                xsc = xc[ii][:, None, :] * phases_f[child_t_m[s0:s1]]  # (s, 4, P)
                acc_ri.index_add_(0, inv_l[s0:s1].reshape(-1),
                                  torch.bmm(pt_, torch.view_as_real(xsc).reshape(-1, 4, 2 * n_p)).reshape(-1, 2 * n_p))
            acc = torch.view_as_complex(acc_ri.reshape(n_l + 1, n_p, 2))
        return acc[:n_l]

    acc = accumulate(xf * cf)
    # the unmasked images for the back-projection (the masked ones' sums give the noise statistics)
    acc_bp = accumulate(p_fine.take(x_recon) * cf) if (x_recon is not None and backprojectors is not None) else acc
    if "res_image" in sums:
        sums["res_image"][sharp] = _image_residuals(xf, cf, p_fine, phases_f, table, table_ri, table_power, img_m,
                                                    child_t_m, inv_m, post_m, b, pair_chunk)[sharp]
    table_l, u_dest_l, u_rot_l = table[live], u_dest[live], u_rot[live]
    acc_w = kernels.fine_weights(c2, post_m, img_m, inv_l, n_l + 1)  # (U', P) from the pairs alone
    w_flops = 2.0 * n_m * 8 * n_p if acc_w is not None else 2.0 * n_l * b * n_p
    acc_w = wrow[:, live].T @ c2 if acc_w is None else acc_w[:n_l]
    sums["flops"] += n_m * (24.0 + 128.0) * n_p + w_flops  # Σ p·C·X·S per row; Σ p·C²
    # the noise power's statistics: residuals of every significant sample, weighted by its posterior
    sums["res_terms"] += residual_power_terms(p_fine, xf[sharp], acc, acc_w, table_l)
    if backprojectors is not None:
        if residual:  # Σ p·C·(X·S − C·P) = Σ p·C·X·S − (Σ p·C²)·P
            acc_bp = acc_bp - acc_w * table_l
        for d, bp in enumerate(backprojectors):
            sel = (u_dest_l == d).nonzero()[:, 0]
            if len(sel):
                bp.insert_pixels(acc_bp[sel], acc_w[sel], grid.fine_rot[u_rot_l[sel]], p_fine.kx, p_fine.ky)



def _pair_power(a: torch.Tensor, table_power: torch.Tensor, img: torch.Tensor, inv: torch.Tensor):
    """(S, 8) Σ_p a[img]·table_power[inv] and its FLOPs: per pair with the compiled kernel (CPU), else one dense
    (B, U) GEMM gathered per pair (on a GPU, few large launches)."""
    out = kernels.pair_power(a, table_power, img, inv)
    if out is not None:
        return out, 2.0 * inv.numel() * a.shape[1]
    dense = a @ table_power.T  # (B, U)
    return dense[img[:, None], inv], 2.0 * a.shape[0] * table_power.shape[0] * a.shape[1]


def _image_residuals(xf, cf, p_fine, phases_f, table, table_ri, table_power, img, child_t, inv, post, b,
                     pair_chunk):
    """(B,) float64 Σ_pairs Σ_(j,m) post·Σ_p m·|X·S_j − C·P_m|² of each image (σ²-free; see BatchResult)."""
    m = p_fine.multiplicity.to(torch.float32)
    n_p = xf.shape[1]
    xm = xf * (cf * m)
    cross = kernels.fine_cross(xm, phases_f, table, img, child_t, inv)  # (S, 4, 8) Re Σ m·conj(C·X·S)·P
    if cross is None:
        parts = []
        for s0 in range(0, len(img), pair_chunk):
            s1 = min(len(img), s0 + pair_chunk)
            a = xm[img[s0:s1]][:, None, :] * phases_f[child_t[s0:s1]]
            parts.append(torch.bmm(torch.view_as_real(a).reshape(-1, 4, 2 * n_p), table_ri[inv[s0:s1]].transpose(1, 2)))
        cross = torch.cat(parts) if parts else torch.zeros((0, 4, 8), device=xf.device)
    power, _ = _pair_power(cf * cf * m, table_power, img, inv)  # (S, 8) Σ m·C²|P|²
    per_pair = (post * (power[:, None, :] - 2 * cross)).sum((1, 2))
    norm_x = ((xf.real**2 + xf.imag**2) * m).sum(1).double()
    return norm_x + torch.zeros(b, dtype=torch.float64, device=xf.device).index_add_(0, img, per_pair.double())


def _coarse_marginal(sel, ll, x_full, ctf_full, old_offsets, grid, projectors, p_fine, sigma2_shell, k_cls,
                     backprojectors, out, sums, residual=False, half=None, x_recon=None):
    """Images with broad posteriors: marginalise over every coarse sample (no fine pass), fill ``out[sel]``.

    ll: (B', K·Tc·Rc) coarse log-posteriors. The posterior-weighted images are
    summed per coarse rotation by GEMM (as in :mod:`spa3d.inference.estep`) at
    the fine radius and inserted, an eighth each, at the 8 fine children of
    every coarse rotation.
    """
    bb = ll.shape[0]
    n_tc, n_rc = grid.coarse_trans.shape[0], grid.coarse_rot.shape[0]
    # the posterior in place of ll (the caller's buffer of these images' log-posteriors): few passes over the
    # (B', K·Tc·Rc) array, which holds 10⁷–10⁸ floats when most of a batch is broad
    mx = ll.max(1, keepdim=True).values
    post = ll.sub_(mx).exp_()
    z = post.sum(1, keepdim=True)
    post.div_(z)
    pmax, arg = post.max(1)
    post = post.reshape(bb, k_cls, n_tc, n_rc)
    bk, bt, br = arg // (n_tc * n_rc), (arg // n_rc) % n_tc, arg % n_rc
    out["bk"][sel] = bk
    out["brot"][sel] = grid.coarse_rot[br]
    out["btrans"][sel] = grid.coarse_trans[bt]
    out["pmax"][sel] = pmax
    out["loge"][sel] = mx[:, 0] + torch.log(z[:, 0])
    p_kt, p_kr = post.sum(3), post.sum(2)  # (B', K, Tc), (B', K, Rc): every marginal below from these two
    out["class_post"][sel] = p_kt.sum(2)
    if "rot_weight" in sums:
        sums["rot_weight"] += p_kr.sum(0).double()
    p_rot = p_kr.sum(1)  # (B', Rc)
    tr = torch.einsum("bij,rij->br", grid.coarse_rot[br], grid.coarse_rot)
    ang2 = torch.rad2deg(torch.arccos(((tr - 1) / 2).clamp(-1, 1))) ** 2
    out["rot_spread"][sel] = (p_rot * ang2).sum(1)
    p_t = p_kt.sum(1)  # (B', Tc)
    d2 = ((grid.coarse_trans[None] - grid.coarse_trans[bt][:, None]) ** 2).sum(-1)
    out["trans_spread"][sel] = (p_t * d2).sum(1)
    tot = old_offsets[:, None, :] + grid.coarse_trans[None]
    sums["off_sq"] += float((p_t * (tot**2).sum(-1)).sum())
    xf, cf = p_fine.take(x_full), p_fine.take(ctf_full)
    phases = p_fine.shift_phases(grid.coarse_trans)
    m = p_fine.multiplicity.to(torch.float32)
    best_proj = torch.empty_like(xf)
    for k in range(k_cls):
        mine = (bk == k).nonzero()[:, 0]
        if len(mine):
            best_proj[mine] = projectors[k].project_pixels(grid.coarse_rot[br[mine]], p_fine.kx, p_fine.ky).to(xf.dtype)
    xs_best = xf * phases[bt]
    cp = cf * best_proj
    sums["pix_shell"].index_add_(0, p_fine.shell, m.double() * bb)
    out["xa"][sel] = ((xs_best.real * cp.real + xs_best.imag * cp.imag) * m).sum(1)
    out["aa"][sel] = ((cp.real**2 + cp.imag**2) * m).sum(1)
    if "res_image" in sums:  # at the best pose (the posterior is broad here; documented in BatchResult)
        sums["res_image"][sel] = ((xs_best - cp).abs() ** 2 * m).sum(1).double()
    n_p = xf.shape[1]
    # the CTF-multiplied shifted images as interleaved (re, im) rows: one real GEMM gives both parts of Σ p·C·X·S
    cxs = torch.view_as_real(xf[:, None, :] * phases[None] * cf[:, None, :]).reshape(bb * n_tc, 2 * n_p)
    # the back-projection's images: unmasked when given (see search_batch)
    cxs_bp = cxs if x_recon is None else torch.view_as_real(
        p_fine.take(x_recon)[:, None, :] * phases[None] * cf[:, None, :]).reshape(bb * n_tc, 2 * n_p)
    c2 = cf * cf
    x_term = xf  # the images' power enters the residual sum once
    for h in ([None] if half is None else [0, 1]):
        rows = None if h is None else (half == h).to(post.dtype)
        for k in range(k_cls):
            pk = post[:, k] if rows is None else post[:, k] * rows[:, None, None]  # (B', Tc, Rc)
            p_r = p_kr[:, k] if rows is None else p_kr[:, k] * rows[:, None]  # (B', Rc)
            mass = p_r.sum(0)
            keep = (mass > 1e-6 * max(float(mass.max()), 1e-30)).nonzero()[:, 0]
            if len(keep) == 0:
                continue
            pr = pk.reshape(bb * n_tc, n_rc)
            if len(keep) < n_rc:
                pr = pr[:, keep]
            sums["flops"] += 2.0 * len(keep) * bb * n_tc * 2 * n_p + 2.0 * len(keep) * bb * n_p
            data = torch.view_as_complex((pr.T @ cxs).reshape(len(keep), n_p, 2))  # (R', P)
            wsum = p_r[:, keep].T @ c2  # (R', P)
            proj = projectors[k].project_pixels(grid.coarse_rot[keep], p_fine.kx, p_fine.ky).to(data.dtype)
            sums["res_terms"] += residual_power_terms(p_fine, x_term, data, wsum, proj)
            x_term = xf[:0]
            if backprojectors is None:
                continue
            if x_recon is not None:
                data = torch.view_as_complex((pr.T @ cxs_bp).reshape(len(keep), n_p, 2))
            # spread over the 8 fine children of each coarse rotation, an eighth each: the same Fourier coverage
            # as the fine pass (one insertion per child, without copying the sums eight times)
            dest = k if h is None else h * k_cls + k
            data8, wsum8 = data / 8, wsum / 8
            for j in range(8):
                children = keep * 8 + j
                vals = data8
                if residual:  # residuals against each child's own projection
                    vals = data8 - wsum8 * projectors[k].project_pixels(grid.fine_rot[children], p_fine.kx,
                                                                        p_fine.ky).to(data8.dtype)
                backprojectors[dest].insert_pixels(vals, wsum8, grid.fine_rot[children], p_fine.kx, p_fine.ky)


def _cc_scores(images, ctf, weights, projections, phases):
    """Normalised cross-correlation (B, T, R) of shifted images with CTF-multiplied projections."""
    b, p = images.shape
    t = phases.shape[0]
    x = images[:, None, :] * phases[None]
    a = (x * (ctf * weights)[:, None, :]).reshape(b * t, p)
    cross = (torch.cat([a.real, a.imag], 1) @ torch.cat([projections.real, projections.imag], 1).T).reshape(b, t, -1)
    power = (ctf * ctf * weights) @ abs2(projections).T  # (B, R)
    return cross / power.clamp_min(1e-30).sqrt()[:, None, :]
