"""``spa3d demo``: steps 17–20 of the RELION tutorial, end to end, on the embedded data.

The data: micrographs holding particles of a mixture built from PDB 1TII
(shipped with spa3d): the AB5 complex (80 %), its B5 ring without the A
subunit (10 %) and compact "junk" (10 %), box 64, 2 Å/pixel, SNR 0.1, CTF:
particles as they are after 2D classification, mostly intact, some broken,
some junk.
Every step runs as a user would run it, in one RELION project directory,
each in its own ``<Type>/jobNNN/`` with note.txt, the pipeline record and a
report.html:

1. Import/job001       ``spa3d simulate`` (micrographs, particles, ground truth)
2. InitialModel/job002 ``spa3d initial-model`` (C1, SGD, the tutorial's schedule)
   then ``spa3d align-symmetry --sym C5``: the B5 ring is five-fold, the
   A subunit breaks the symmetry, so the demo aligns the axis and reports
   how symmetric the map is, but does not impose C5
3. Class3D/job003      ``spa3d class3d`` K=4, T=4 against the initial model
4. Select/job004       ``spa3d select --best 1 --recenter``
5. Extract/job005      ``spa3d extract`` in a bigger box (96 px), inverted,
   normalised, with the refined offsets moved into the coordinates
6. Refine3D/job006     ``spa3d refine3d`` of the extracted particles, from the
   best class padded to the new box (``--rescale-ref``), 50 Å, gold standard;
   the extracted particles are normalised, so the reference is not on their
   greyscale: ``--firstiter-cc`` (the GUI's "absolute greyscale? No")
7. MaskCreate/job007   ``spa3d mask`` of the refined map (15 Å, threshold at
   the map's isosurface level, extended 3 px, soft edge 3 px)
8. PostProcess/job008  ``spa3d postprocess`` of the half maps with that mask
9. ``spa3d fit`` of the atomic model (PDB 1TII) into the post-processed map,
   with the hand stated (a mirrored map is flipped and fitted again)

The summary gives the time of each step and what it achieved against the
ground truth: FSC resolution of the initial model and of the best class
(after superposition, either hand), the adjusted Rand index of the classes,
the purity of the selection, the FSC of a reconstruction from the
re-extracted particles at their refined poses, the refinement's and the
post-processing's resolution (reported, and against the truth) and the
fit's correlation and hand.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from spa3d.analysis.metrics import adjusted_rand_index
from spa3d.data import default_mixture
from spa3d.fourier.filters import fsc, resolution_at
from spa3d.io.mrc import read_map, write_map
from spa3d.io.star import read_particles_star
from spa3d.jobs.pipeline import Pipeline
from spa3d.jobs.symmetry import run_align_symmetry
from spa3d.maps.align import superpose

log = logging.getLogger("spa3d")

FRACTIONS = (0.8, 0.1, 0.1)


def new_project_dir(base: str | Path = ".") -> Path:
    """A fresh directory ``spa3d_demo``, ``spa3d_demo_2``, ... under ``base``."""
    base = Path(base)
    p = base / "spa3d_demo"
    k = 2
    while p.exists():
        p = base / f"spa3d_demo_{k}"
        k += 1
    return p


def _last_job(project: Path) -> str:
    return str(Pipeline(project).processes["rlnPipeLineProcessName"].iloc[-1]).rstrip("/")


def _run(project: Path, args: list[str]) -> str:
    """Run job ``args[0]`` with options ``args[1:]`` in ``project`` through its module's own options and entry point
    (as the command line would: the project's next jobNNN, its pipeline entry and report); its job directory."""
    import importlib

    from spa3d.jobs.runner import parse_job_args, run_job

    name = args[0]
    module = importlib.import_module(f"spa3d.jobs.{name.replace('-', '_')}")
    run_job(parse_job_args(name, module, [*args[1:], "--project", str(project)]))
    return _last_job(project)


def _fsc05(vol: np.ndarray, truth: np.ndarray, apix: float) -> tuple[float, bool]:
    aligned, sup = superpose(vol, truth)
    return resolution_at(fsc(aligned, truth), truth.shape[0], apix, 0.5), sup.mirrored


def _central(vol: np.ndarray, n: int) -> np.ndarray:
    """The central n³ of a map in a bigger box (the same pixels: the demo re-extracts at the same pixel size)."""
    c = vol.shape[0] // 2 - n // 2
    return vol[c:c + n, c:c + n, c:c + n]


def _reported(job: Path) -> float:
    """A refinement's reported resolution (Å): run_model.star's, else its last iteration's half-map FSC 0.143."""
    from spa3d.io.star import read_star

    final = job / "run_model.star"
    if final.exists():
        return float(read_star(final)["model_general"]["rlnCurrentResolution"].iloc[0])
    last = sorted(job.glob("run_it*_half1_model.star"))[-1]
    return float(read_star(last)["model_classes"]["rlnEstimatedResolution"].iloc[0])


def run_demo(project: str | Path | None = None, n_particles: int = 2000, seed: int = 0, device=None,
             quick: bool = False) -> dict:
    """Run the chain in ``project`` (default: a new ./spa3d_demo*); ``quick`` shortens every step (for tests)."""
    project = Path(project) if project else new_project_dir()
    project.mkdir(parents=True, exist_ok=True)
    dev = ["--device", device] if device else []
    times, res = {}, {}

    # 1. data
    t = time.perf_counter()
    src = project / "Truth"
    for k, m in enumerate(default_mixture()):
        write_map(src / f"species{k + 1}.mrc", m, 2.0)
    imp = _run(project, ["simulate", "--i", *(f"Truth/species{k}.mrc" for k in (1, 2, 3)),
                         "--fractions", ",".join(map(str, FRACTIONS)), "--n", str(n_particles), "--snr", "0.1",
                         "--micrographs", str(max(2, n_particles // 100)), "--mic-size", "640",
                         "--seed", str(seed), "--quiet"])
    times["simulate"] = time.perf_counter() - t
    truth, apix = read_map(project / imp / "truth_class001.mrc")
    labels = read_particles_star(project / imp / "particles_truth.star").particles["rlnClassNumber"].to_numpy()

    # 2. initial model + symmetry axis
    t = time.perf_counter()
    # the tutorial's schedule (25/100/25 iterations, mini-batches 100 -> 500, 35 -> 15 Å), searching 10 Fourier
    # shells beyond the scheduled resolution as RELION does (--incr-size)
    sched = ["--sgd-ini-iter", "5", "--sgd-inbetween-iter", "15", "--sgd-fin-iter", "5", "--sgd-fin-subset", "300"] \
        if quick else []
    im = _run(project, ["initial-model", "--i", f"{imp}/particles.star", "--particle-diameter", "110",
                        "--incr-size", "10", *sched, "--seed", str(seed), "--quiet", *dev])
    its = sorted((project / im).glob("run_it*_class001.mrc"))
    im_map = its[-1]
    res["initial_model_fsc05"], mirrored = _fsc05(read_map(im_map)[0], truth, apix)
    aligned_map = im_map.with_name(im_map.stem + "_alignC5.mrc")
    run_align_symmetry(str(im_map), str(aligned_map), "C5")
    from spa3d.report.job_report import make_report

    make_report(project / im)  # again, now with the aligned map
    times["initial-model"] = time.perf_counter() - t

    # 3. classification
    t = time.perf_counter()
    n_iter = "6" if quick else "15"
    cl = _run(project, ["class3d", "--i", f"{imp}/particles.star", "--ref", str(aligned_map.relative_to(project)),
                        "--K", "4", "--tau2-fudge", "4", "--iter", n_iter, "--angular-sampling", "15",
                        "--offset-range", "5", "--offset-step", "1", "--ini-high", "50", "--ctf", "--zero-mask",
                        "--particle-diameter", "110", "--seed", str(seed), "--quiet", *dev])
    model = sorted((project / cl).glob("run_it*_model.star"))[-1]
    data = read_particles_star(str(model).replace("_model.star", "_data.star")).particles
    res["ari"] = adjusted_rand_index(labels, data["rlnClassNumber"].to_numpy())
    times["class3d"] = time.perf_counter() - t

    # 4. selection
    t = time.perf_counter()
    sel = _run(project, ["select", "--i", str(model.relative_to(project)), "--best", "1", "--recenter", "--quiet"])
    chosen = read_particles_star(project / sel / "particles.star").particles
    best_class = int(chosen["rlnClassNumber"].iloc[0])
    res["best_class_fsc05"], _ = _fsc05(read_map(model.with_name(model.name.replace("_model.star", f"_class{best_class:03d}.mrc")))[0], truth, apix)
    truth_of = dict(zip(read_particles_star(project / imp / "particles.star").particles["rlnImageName"], labels))
    res["selected"] = len(chosen)
    res["purity"] = float(np.mean([truth_of.get(n, 0) == 1 for n in chosen["rlnImageName"]]))
    times["select"] = time.perf_counter() - t

    # 5. re-extraction, checked by a reconstruction at the refined poses
    t = time.perf_counter()
    ext = _run(project, ["extract", "--mics", f"{imp}/micrographs_ctf.star", "--reextract", f"{sel}/particles.star",
                         "--box", "96", "--invert", "--norm", "--bg-diameter", "72", "--recenter", "--quiet"])
    from spa3d.jobs.reconstruct import ReconstructOptions, reconstruct

    rec = reconstruct(str(project / ext / "particles.star"), str(project / ext / "reconstruction_check.mrc"),
                      ReconstructOptions(ctf=True, device=device))
    res["extract_fsc05"], _ = _fsc05(_central(rec, truth.shape[0]), truth, apix)
    times["extract"] = time.perf_counter() - t

    # 6. gold-standard refinement of the re-extracted particles, from the best class in the bigger box
    t = time.perf_counter()
    best_map = model.with_name(model.name.replace("_model.star", f"_class{best_class:03d}.mrc"))
    ref = _run(project, ["refine3d", "--i", f"{ext}/particles.star", "--ref", str(best_map.relative_to(project)),
                         "--rescale-ref", "--firstiter-cc", "--ini-high", "50", "--ctf", "--zero-mask", "--flatten-solvent",
                         "--particle-diameter", "110", "--angular-sampling", "7.5", "--offset-range", "5",
                         "--offset-step", "2", "--max-iter", "12" if quick else "40", "--seed", str(seed), "--quiet",
                         *dev])
    times["refine3d"] = time.perf_counter() - t
    refined = project / ref / "run_class001.mrc"
    if not refined.exists():  # not converged within --max-iter (quick): carry on with the last half maps
        last = sorted((project / ref).glob("run_it*_half1_class001.mrc"))[-1]
        halves = [last, Path(str(last).replace("half1", "half2"))]
        write_map(refined, read_map(halves[0])[0] + read_map(halves[1])[0], apix)
    else:
        halves = [project / ref / f"run_half{h}_class001_unfil.mrc" for h in (1, 2)]
    refined_map = read_map(refined)[0]
    res["refine3d_reported"] = _reported(project / ref)
    res["refine3d_fsc05"], _ = _fsc05(_central(refined_map, truth.shape[0]), truth, apix)

    # 7.-8. mask and post-processing
    t = time.perf_counter()
    from spa3d.report.figures import iso_level

    msk = _run(project, ["mask", "--i", str(refined.relative_to(project)), "--lowpass", "15", "--ini-threshold",
                         f"{iso_level(refined_map):.6g}", "--extend-inimask", "3", "--width-soft-edge", "3", "--quiet"])
    pp = _run(project, ["postprocess", "--i", str(halves[0].relative_to(project)), "--i2",
                        str(halves[1].relative_to(project)), "--mask", f"{msk}/mask.mrc", "--quiet"])
    from spa3d.io.star import read_star

    general = read_star(project / pp / "postprocess.star")["general"]
    res["postprocess_resolution"] = float(general["rlnFinalResolution"].iloc[0])
    res["bfactor"] = float(general["rlnBfactorUsedForSharpening"].iloc[0])
    sharpened = project / pp / "postprocess_masked.mrc"
    res["postprocess_fsc05"], _ = _fsc05(_central(read_map(sharpened)[0], truth.shape[0]), truth, apix)
    times["mask+postprocess"] = time.perf_counter() - t

    # 9. the atomic model into the post-processed map, the hand stated (flipped when mirrored)
    t = time.perf_counter()
    import contextlib
    import io

    from spa3d.data import default_structure
    from spa3d.maps.fit import run_fit

    with contextlib.redirect_stdout(io.StringIO()):
        fit = run_fit(str(sharpened), default_structure(), str(project / pp / "1tii_fitted.pdb"))
    res["hand"] = fit.hand
    if fit.hand == "mirrored":
        flipped = project / pp / "postprocess_masked_flipped.mrc"
        write_map(flipped, np.ascontiguousarray(read_map(sharpened)[0][:, :, ::-1]), apix)
        with contextlib.redirect_stdout(io.StringIO()):
            fit = run_fit(str(flipped), default_structure(), str(project / pp / "1tii_fitted.pdb"))
    res["fit_correlation"] = fit.fit.correlation
    times["fit"] = time.perf_counter() - t
    total = sum(times.values())

    print(f"\nspa3d demo in {project} ({total / 60:.1f} min)")
    print(f"  {'step':<15}{'time':>8}  result (against the ground truth)")
    print(f"  {'simulate':<15}{times['simulate']:7.1f}s  {n_particles} particles on micrographs: 1TII complex / "
          f"B5 ring / junk at {'/'.join(f'{100 * f:.0f}' for f in FRACTIONS)} %, SNR 0.1")
    print(f"  {'initial-model':<15}{times['initial-model']:7.1f}s  FSC 0.5 = {res['initial_model_fsc05']:.1f} Å "
          f"(hand {'mirrored' if mirrored else 'correct'}); C5 axis aligned: {aligned_map.relative_to(project)}")
    print(f"  {'class3d':<15}{times['class3d']:7.1f}s  K=4, adjusted Rand index {res['ari']:.3f}")
    print(f"  {'select':<15}{times['select']:7.1f}s  best class {best_class}: {res['selected']} particles, "
          f"{100 * res['purity']:.0f}% intact complex; class map FSC 0.5 = {res['best_class_fsc05']:.1f} Å")
    print(f"  {'extract':<15}{times['extract']:7.1f}s  box 96, re-centred; reconstruction at refined poses "
          f"FSC 0.5 = {res['extract_fsc05']:.1f} Å")
    print(f"  {'refine3d':<15}{times['refine3d']:7.1f}s  gold standard {res['refine3d_reported']:.1f} Å "
          f"(half maps' FSC 0.143); map against the truth FSC 0.5 = {res['refine3d_fsc05']:.1f} Å")
    print(f"  {'mask+postproc.':<15}{times['mask+postprocess']:7.1f}s  {res['postprocess_resolution']:.1f} Å "
          f"(masked, corrected FSC 0.143), B-factor {res['bfactor']:.0f} Å²; sharpened map against the truth "
          f"FSC 0.5 = {res['postprocess_fsc05']:.1f} Å")
    print(f"  {'fit':<15}{times['fit']:7.1f}s  PDB 1TII into the post-processed map: correlation "
          f"{res['fit_correlation']:.3f}, hand {res['hand']}"
          + (" (the map was flipped)" if res["hand"] == "mirrored" else ""))
    jobs = (imp, im, cl, sel, ext, ref, msk, pp)
    print(f"  reports: {', '.join(str(project / j / 'report.html') for j in jobs if (project / j / 'report.html').exists())}")
    print(f"  pipeline: {project / 'default_pipeline.star'} (open the project in RELION's GUI)")
    return {"project": str(project), "times": times, **res}


# ---- command line: ``spa3d demo`` ----

DESCRIPTION = ("Simulate micrographs and particles of the embedded structure, then run spa3d's jobs on them and "
               "report resolution against the ground truth.")


def add_args(p) -> None:
    p.add_argument("--project", default=None, help="project directory (default: a new ./spa3d_demo*)")
    p.add_argument("--n", type=int, default=2000, help="number of particles (default 2000)")
    p.add_argument("--quick", action="store_true", help="shorter schedules (a smoke test, not for the results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")


def main(a) -> None:
    from spa3d.jobs.progress import setup_logging

    setup_logging(quiet=a.quiet)
    run_demo(a.project, n_particles=a.n, seed=a.seed, device=a.device, quick=a.quick)
