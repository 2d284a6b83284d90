"""Expected wall time, peak memory and poses searched, before a job runs (``--dry-run``, and run.log's first lines).

The estimate comes from a short calibration on the job's own particles and
machine: real iterations of the job's hot path are timed on copies of its
state (with their own random numbers, so the run itself is unchanged), and
the schedule is summed from them. Memory is the process's peak resident size
during the calibration (the job streams its particles, so the peak does not
grow with their number) and, on a GPU, torch's peak allocation.
"""

from __future__ import annotations

import copy
import dataclasses
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Estimate:
    """What a job is expected to take on this machine."""

    wall_s: float  # seconds
    host_peak_bytes: int
    gpu_peak_bytes: int  # 0 on CPU
    poses_per_particle: float  # (class, rotation, translation) samples scored per particle and iteration, mean
    calibration_s: float

    def lines(self) -> list[str]:
        gpu = f", GPU {self.gpu_peak_bytes / 2**30:.1f} GiB" if self.gpu_peak_bytes else ""
        return [f"estimate: {_duration(self.wall_s)} wall time, peak memory {self.host_peak_bytes / 2**30:.1f} GiB"
                f"{gpu}, {self.poses_per_particle:,.0f} poses scored per particle and iteration "
                f"(from a {self.calibration_s:.1f} s calibration on this machine)"]


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (before reading a clock); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_reconstruction(bp, device: torch.device) -> float:
    """Seconds of one reconstruction of back-projector ``bp`` (on a GPU after one untimed: the first builds
    the FFT plans)."""
    if device.type == "cuda":
        bp.reconstruct(tau2=np.ones(bp.n // 2 + 1), unregularised_where_tau2_zero=True)
    synchronize(device)
    t = time.perf_counter()
    bp.reconstruct(tau2=np.ones(bp.n // 2 + 1), unregularised_where_tau2_zero=True)
    synchronize(device)
    return time.perf_counter() - t


def host_peak_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


#: significant coarse samples per particle assumed once an SGD run has refined its sampling and in its final EM
#: pass (measured: 2–4 on the 2,000-particle benchmarks, 15–52 on the 600-particle test); against the starting
#: maps every image's posterior is broad, and the E-step would score each over the whole coarse grid
SGD_LATE_SIGNIFICANT = 8


def estimate_initial_model(ps, state, opts, schedule, device: torch.device, opts_at=None) -> Estimate:
    """Estimate of an SGD initial model (:func:`spa3d.inference.sgd.sgd_iteration`) from ``state`` on.

    ``opts_at(it)``: the options of iteration ``it`` where the angular sampling changes during the run
    (default: ``opts`` throughout). Within each stretch of iterations at one sampling, times its first and
    last mini-batch iterations (the time of the others is interpolated as the schedule interpolates the
    resolution and mini-batch size between them) and, when the run ends with EM passes over all particles,
    one chunk of such a pass.
    """
    from spa3d.inference.sgd import _estep_minibatch, sgd_iteration

    t_start = time.perf_counter()
    rng = np.random.default_rng(2**31 - 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    opts_at = opts_at or (lambda it: opts)
    last_sgd = schedule.total - opts.final_em
    first = max(state.iteration + 1, 1)

    def timed_iteration(it: int, sharp: bool = False) -> tuple[float, float]:
        st = copy.deepcopy(state)
        st.iteration = it - 1
        o_it = opts_at(it)
        if sharp:  # against the starting maps every pose looks alike; later in a run the posteriors are sharp
            o_it = dataclasses.replace(o_it, max_significant=min(o_it.max_significant, SGD_LATE_SIGNIFICANT),
                                       marginalise_broad=False)
        synchronize(device)
        t = time.perf_counter()
        out = sgd_iteration(ps, st, o_it, schedule, rng)
        synchronize(device)
        return time.perf_counter() - t, float(np.mean(np.maximum(out["posterior"].n_significant, 0)))

    # stretches of iterations searched at one sampling
    stretches: list[list[int]] = []
    for it in range(first, last_sgd + 1):
        o_it = opts_at(it)
        if stretches and opts_at(stretches[-1][0]) is o_it:
            stretches[-1].append(it)
        else:
            stretches.append([it])
    total, n_sig, t_b = 0.0, [], 0.0
    if stretches:
        timed_iteration(stretches[0][0])  # the first call pays one-off costs (allocations, caches)
    for j, its in enumerate(stretches):
        a_it, b_it = its[0], its[-1]
        t_a, ns = timed_iteration(a_it, sharp=j > 0)
        n_sig.append(ns)
        t_b = t_a
        if b_it != a_it:
            t_b, ns = timed_iteration(b_it, sharp=j > 0)
            n_sig.append(ns)
        # the iterations in between: interpolated as the schedule interpolates resolution and mini-batch size
        f_a, f_b = _schedule_fraction(schedule, a_it), _schedule_fraction(schedule, b_it)
        for it in its:
            g = (_schedule_fraction(schedule, it) - f_a) / (f_b - f_a) if f_b > f_a else 0.0
            total += t_a + g * (t_b - t_a)
    o_last = opts_at(schedule.total)
    if opts.final_em > 0 and state.iteration < schedule.total:
        # one chunk of the full pass at the final resolution, E-step and sums only, then its reconstruction time
        n, apix = ps.box, ps.pixel_size
        res, _ = schedule.at(schedule.total)
        r_cur = min(n // 2, n * apix / res + opts.incr_size)
        chunk = np.arange(min(len(ps), 100))
        o_full = o_last if o_last.final_translations is None else dataclasses.replace(
            o_last, translations=o_last.final_translations)
        # the final pass meets sharp posteriors (see timed_iteration)
        o_full = dataclasses.replace(o_full, max_significant=min(o_full.max_significant, SGD_LATE_SIGNIFICANT),
                                     marginalise_broad=False)
        synchronize(device)
        t = time.perf_counter()
        _estep_minibatch(ps, chunk, state.maps, state.sigma2, state.class_fractions, o_full, r_cur, False)
        synchronize(device)
        per_particle = (time.perf_counter() - t) / len(chunk)
        total += opts.final_em * (per_particle * len(ps) + t_b * 0.25)
    if o_last.search is not None:
        poses = len(o_last.search.coarse_rot) * len(o_last.search.coarse_trans) + 32 * float(np.mean(n_sig or [0]))
    else:
        poses = len(o_last.rotations) * len(o_last.translations)
    gpu = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    return Estimate(total, host_peak_bytes(), gpu, poses * opts.n_classes, time.perf_counter() - t_start)


def _schedule_fraction(schedule, it: int) -> float:
    """How far iteration ``it`` is along the schedule's ramp (0 during the initial iterations, 1 at the end)."""
    if it <= schedule.ini_iter:
        return 0.0
    if it <= schedule.ini_iter + schedule.inbetween_iter:
        return (it - schedule.ini_iter) / max(schedule.inbetween_iter, 1)
    return 1.0
