"""``spa3d initial-model``: de novo 3D initial model by SGD (RELION 3.1's InitialModel job).

Writes into the job directory, with RELION's names, every ``write_iter``
iterations and at the last: run_itNNN_classKKK.mrc, run_itNNN_model.star,
run_itNNN_data.star, run_itNNN_optimiser.star (and run_itNNN_sgd_state.npz,
which ``--continue run_itNNN_optimiser.star`` resumes from), plus run.log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spa3d.backend.device import select_device
from spa3d.errors import InputError
from spa3d.geometry.euler import euler_to_matrix, matrix_to_euler
from spa3d.geometry.sampling import orientation_grid, translation_grid
from spa3d.geometry.symmetry import symmetry_matrices
from spa3d.inference.search import coarse_radius, make_search_grid
from spa3d.inference.sgd import SgdOptions, SgdSchedule, SgdState, initial_state, sgd_iteration
from spa3d.io.atomic_write import atomic_path, ensure_writable_dir
from spa3d.io.mrc import write_map
from spa3d.io.particles import ParticleSet
from spa3d.io.star import write_star
from spa3d.jobs.estimate import estimate_initial_model
from spa3d.jobs.progress import EStepRate, add_log_file
from spa3d.jobs.resume import (IterationFiles, append_options_block, prepare_continue, remove_stale_staging,
                               state_file)

log = logging.getLogger("spa3d")


@dataclass
class InitialModelOptions:
    n_classes: int = 1
    symmetry: str = "C1"
    particle_diameter: float = 200.0
    flatten_solvent: bool = True
    ctf: bool = True
    ctf_intact_first_peak: bool = False
    ctf_phase_flipped: bool = False
    healpix_order: int = 1  # GUI 15°: coarse order 1, searched at the fine step (order + 1)
    offset_range: float = 6.0
    offset_step: float = 2.0
    schedule: SgdSchedule = None
    write_iter: int = 10
    incr_size: float = 10.0  # Fourier shells beyond the scheduled resolution (RELION's default)
    step_size: float = 0.5  # SGD step size η (RELION's default)
    momentum: float = 0.9  # SGD momentum μ (RELION's default)
    final_em: int = 1  # the last iterations done as EM steps over all particles (spa3d's default 1; RELION 0)
    exhaustive: bool = False  # every pose at the fine sampling, instead of coarse-to-fine (RELION's oversampling)
    coarse_radius_px: float | None = None  # radius of the coarse pass (cycles per box; default RELION's rule)
    estimate: bool = True  # log the expected wall time and memory first (a short calibration)
    dry_run: bool = False  # only print that estimate
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    workers: int = 0  # > 0: the mini-batch E-step on a local Dask cluster of this many processes
    dask_scheduler: str | None = None


def _save_state(path: Path, state: SgdState) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, maps=state.maps, momentum=state.momentum, sigma2=state.sigma2,
                     class_fractions=state.class_fractions, iteration=state.iteration,
                     rng=np.frombuffer(json.dumps(state.rng_state).encode(), dtype=np.uint8))


def _load_state(path: Path) -> SgdState:
    with np.load(path) as z:
        rng_state = json.loads(bytes(z["rng"]).decode())
        return SgdState(z["maps"].copy(), z["momentum"].copy(), z["sigma2"].copy(), z["class_fractions"].copy(),
                        int(z["iteration"]), rng_state)


def _write_iteration(job: Path, ps: ParticleSet, state: SgdState, poses: dict, res: float, o: InitialModelOptions,
                     input_star: str) -> None:
    with IterationFiles(job, state.iteration) as files:
        _write_iteration_files(files, job, ps, state, poses, res, o, input_star)


def _write_iteration_files(files: IterationFiles, job: Path, ps: ParticleSet, state: SgdState, poses: dict, res: float,
                           o: InitialModelOptions, input_star: str) -> None:
    it = state.iteration
    apix = ps.pixel_size
    names = []
    for k in range(len(state.maps)):
        name = job / f"run_it{it:03d}_class{k + 1:03d}.mrc"
        write_map(files.path(name), state.maps[k], apix)
        names.append(str(name))
    general = {"rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2, "rlnOriginalImageSize": ps.box,
               "rlnCurrentResolution": res, "rlnCurrentImageSize": ps.box, "rlnNrClasses": len(state.maps),
               "rlnPixelSize": apix, "rlnTau2FudgeFactor": 4.0}
    classes = pd.DataFrame({"rlnReferenceImage": names, "rlnClassDistribution": state.class_fractions,
                            "rlnEstimatedResolution": res})
    sigma = pd.DataFrame({"rlnSpectralIndex": np.arange(len(state.sigma2)), "rlnSigma2Noise": state.sigma2})
    write_star(files.path(job / f"run_it{it:03d}_model.star"), {"model_general": general, "model_classes": classes,
                                                    "model_group_1": sigma})
    table = ps.table.copy()
    p = table.particles
    seen = np.array(sorted(poses))
    if len(seen):
        vals = np.array([poses[i] for i in seen])
        for j, col in enumerate(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                                 "rlnClassNumber", "rlnMaxValueProbDistribution"]):
            if col not in p:
                p[col] = 0.0
            p.loc[seen, col] = vals[:, j]
        p["rlnClassNumber"] = p["rlnClassNumber"].astype(int)
    table.write(files.path(job / f"run_it{it:03d}_data.star"))
    _save_state(files.path(job / f"run_it{it:03d}_sgd_state.npz"), state)
    optimiser = files.path(job / f"run_it{it:03d}_optimiser.star")
    write_star(optimiser, {"optimiser_general": {
        "rlnOutputRootName": str(job / "run"), "rlnModelStarFile": str(job / f"run_it{it:03d}_model.star"),
        "rlnExperimentalDataStarFile": str(job / f"run_it{it:03d}_data.star"), "rlnCurrentIteration": it,
        "rlnRandomSeed": o.seed, "rlnSgdStateFile": str(job / f"run_it{it:03d}_sgd_state.npz")}})
    append_options_block(optimiser, o, {"input_star": input_star})


def run_initial_model(star: str | None, job_dir: str, o: InitialModelOptions, continue_from: str | None = None,
                      given: set[str] | None = None) -> SgdState:
    """Run the SGD initial model (see module docstring); with ``o.workers`` / ``o.dask_scheduler`` each
    mini-batch's E-step is split over Dask workers.

    ``continue_from``: a run_itNNN_optimiser.star or a job directory (its last complete iteration); the
    run's recorded options are restored except those named in ``given`` (None: all of ``o``'s), see
    :mod:`spa3d.jobs.resume`.
    """
    o = dataclasses.replace(o, schedule=dataclasses.replace(o.schedule or SgdSchedule()))
    input_star = str(Path(star).resolve()) if star else None
    if continue_from:
        continue_from, o, first = prepare_continue(o, continue_from, job_dir, star, given, {"n_classes"})
        input_star = first or input_star
    cluster = None
    if o.workers or o.dask_scheduler:
        from spa3d.backend.distributed import DaskCluster

        cluster = DaskCluster(o.workers, o.dask_scheduler, o.threads or 1)
    try:
        return _run_initial_model(star, job_dir, o, continue_from, cluster, input_star)
    finally:
        if cluster is not None:
            cluster.close()


def _run_initial_model(star, job_dir, o: InitialModelOptions, continue_from, cluster, input_star) -> SgdState:
    job = Path(job_dir)
    if not o.dry_run:
        ensure_writable_dir(job)
        add_log_file(job / "run.log")
    remove_stale_staging(job)
    device = select_device(o.device, o.threads)
    sched = o.schedule or SgdSchedule()
    if o.n_classes < 1:
        raise InputError(None, "--K must be at least 1")
    if continue_from:
        sfile = state_file(continue_from)
        if sfile is None or not sfile.exists():
            raise InputError(continue_from, f"state file {sfile} not found")
        state = _load_state(sfile)
        if len(state.maps) != o.n_classes:
            raise InputError(continue_from, f"--continue cannot change K ({len(state.maps)} classes in the run)")
        # the poses found so far are in the iteration's data.star
        star = str(Path(continue_from).parent / f"run_it{state.iteration:03d}_data.star")
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng_state
        log.info(f"initial model: continuing from iteration {state.iteration} ({continue_from})")
    if star is None:
        raise InputError(None, "--i particles.star is required")
    # a resumed run reads the poses found so far from the iteration's data.star, and the images from where
    # the run's particles were (their names are relative to that STAR file's project)
    ps = ParticleSet(star, ParticleSet(input_star).project_dir if continue_from and input_star else None)
    if o.ctf and not ps.has_ctf():
        raise InputError(star, "--ctf needs rlnDefocusU/V, rlnVoltage and rlnSphericalAberration")
    apix = ps.pixel_size
    if o.particle_diameter / apix > ps.box:
        log.info(f"particle diameter {o.particle_diameter} Å exceeds the box; using the box")
        o.particle_diameter = ps.box * apix
    grid = orientation_grid(o.healpix_order + 1, o.symmetry)
    search = None if o.exhaustive else make_search_grid(o.healpix_order, o.symmetry, o.offset_range, o.offset_step,
                                                         device)
    opts = SgdOptions(n_classes=o.n_classes, particle_diameter=o.particle_diameter, flatten_solvent=o.flatten_solvent,
                      ctf=o.ctf, ctf_intact_first_peak=o.ctf_intact_first_peak, ctf_phase_flipped=o.ctf_phase_flipped,
                      rotations=euler_to_matrix(*grid.T), translations=translation_grid(o.offset_range, o.offset_step),
                      offset_sigma_px=max(o.offset_range / 2, 1.0), symmetry_ops=symmetry_matrices(o.symmetry),
                      device=device, incr_size=o.incr_size, step_size=o.step_size, momentum=o.momentum,
                      final_em=o.final_em, final_translations=translation_grid(o.offset_range, o.offset_step / 2),
                      search=search, coarse_radius_px=o.coarse_radius_px or coarse_radius(o.healpix_order,
                                                                                          o.particle_diameter, ps.box,
                                                                                          apix))
    if not continue_from:
        rng = np.random.default_rng(o.seed)
        state = initial_state(ps, opts, sched, rng)
    if search is None:
        how = f"{len(grid)} orientations x {len(opts.translations)} translations (every pose)"
    else:
        how = (f"{len(search.coarse_rot)} x {len(search.coarse_trans)} coarse poses (radius ≤ "
               f"{opts.coarse_radius_px:.0f} px), then {len(grid)} orientations x {len(search.fine_trans)} "
               f"translations around the significant ones")
    log.info(f"initial model: {len(ps)} particles, box {ps.box}, {apix:.3f} Å/px, K={o.n_classes}, {how}, "
             f"{sched.total} iterations")
    if o.estimate or o.dry_run:
        est = estimate_initial_model(ps, state, opts, sched, device)
        for line in est.lines():
            log.info(line)
        if o.dry_run:
            return state
    poses: dict[int, tuple] = {}
    start = time.perf_counter()
    first_it = state.iteration
    res = sched.at(max(state.iteration, 1))[0]
    rate = EStepRate()
    while state.iteration < sched.total:
        t0 = time.perf_counter()
        out = sgd_iteration(ps, state, opts, sched, rng, cluster)
        post = out["posterior"]
        res = out["resolution"]
        rate.add(post.flops, out["estep_seconds"], post.poses, out["subset"])
        r, t, p = matrix_to_euler(np.asarray(post.best_rotation, dtype=np.float64))
        tr = np.asarray(post.best_translation) * apix
        for j, i in enumerate(out["indices"]):
            poses[int(i)] = (r[j], t[j], p[j], tr[j, 0], tr[j, 1], post.best_class[j] + 1, post.max_posterior[j])
        done = state.iteration - first_it
        elapsed = time.perf_counter() - start
        left = elapsed / done * (sched.total - state.iteration)
        log.info(f"iteration {state.iteration}/{sched.total}: {res:.1f} Å, mini-batch {out['subset']}, "
                 f"{rate.line()}, {out['subset'] / (time.perf_counter() - t0):.0f} particles/s, {left:.0f} s left")
        state.rng_state = rng.bit_generator.state
        if state.iteration % o.write_iter == 0 or state.iteration == sched.total:
            _write_iteration(job, ps, state, poses, res, o, input_star or str(Path(ps.star_path).resolve()))
    if rate.particles:
        log.info(rate.summary())
    log.info(f"done in {time.perf_counter() - start:.1f} s: {job / f'run_it{state.iteration:03d}_class001.mrc'}")
    return state
