"""spa3d refine3d vs relion_refine_mpi --auto_refine on the same particles, in the same run.

Simulates particles of PDB 1TII (or, with ``--protein d2``, a D2 tetramer
built from 1TII's A subunit, refined with D2 imposed) with relion_project
(box 64, 2 Å/pixel, CTF, white noise), then runs RELION 3.1's gold-standard
auto-refinement (``mpirun -n 3 relion_refine_mpi``: a leader and one worker
per half set, on the machine's cores) and spa3d's with the same options: the
ground truth low-passed to 50 Å as reference, initial sampling 7.5°, local
searches from 1.8°, offsets 5/1 px (GUI units), CTF, zero mask, solvent
flattening. The reference is declared CTF-corrected to RELION
(``--ctf_corrected_ref``, "Has reference been CTF-corrected? Yes": it is made
from an atomic model); without it RELION's first iteration scores the images
against projections without the CTF, its poses after that iteration are
nearly random (median error 56° on 150 particles of the D2 tetramer from the
truth at 10 Å, against 3.6° with it) and it does not recover. For each program it prints wall time, iterations, the reported
resolution (half maps' FSC 0.143, unmasked) and the FSC of the final map
against the ground truth (after superposing it on the truth), at 0.5 and 0.143.

Then the shell check, in Fourier shells: the half maps' FSC 0.143 against the
FSC 0.5 of their average against the truth (the resolution it stands for:
FSC_truth = sqrt(2·FSC_half/(1 + FSC_half)), 0.5 at 0.143), both unmasked and
both in one solvent mask (the truth low-passed to 15 Å, thresholded at 5 % of
its maximum, extended 3 px, soft edge 3 px: the same mask for every program),
and the resolution of ``spa3d postprocess``'s FSC corrected by phase
randomisation in that mask. The average is superposed on the truth with
sub-degree, sub-pixel refinement (``superpose(..., refine=True)``), since half
a pixel of error lowers the FSC at box 128 from about shell 30 on.

    python benchmarks/refine3d_vs_relion.py [--n 2000] [--snr 0.05] [--protein d2] [--box 128 --angpix 1.5]
        [--noise-spectrum real_micrograph.mrc] [--workdir DIR] [--reuse-relion] [--skip-relion] [--reuse-spa3d]
        [--unmasked-reconstruction | --masked-reconstruction] [--no-prepass]

``--noise-spectrum`` makes the particles with ``spa3d simulate`` instead:
noise with the spectrum of a real micrograph (e.g. tests/test_data/
epu2.9_example.mrc of mrcfile's source distribution), a per-micrograph
intensity scale and defocus errors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from relion_data import d2_tetramer, print_tail, relion_particles, timed

from spa3d.data import default_structure
from spa3d.fourier.filters import fsc, lowpass, resolution_at
from spa3d.io.mrc import read_map, write_map
from spa3d.io.star import read_star
from spa3d.jobs.simulate import SimulationOptions, simulate
from spa3d.maps.align import superpose


def relion_cmd(a, out: str) -> list[str]:
    # GUI semantics: --offset_step is the coarse step (twice the GUI's 1-pixel step with one oversampling level)
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi", "--o", out,
            "--auto_refine", "--split_random_halves", "--i", a.input, "--ref", "reference.mrc", "--ini_high", "50",
            "--dont_combine_weights_via_disc", "--pool", "3", "--pad", "2", "--ctf", "--ctf_corrected_ref", "--particle_diameter",
            str(a.diameter), "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--healpix_order", "2",
            "--auto_local_healpix_order", "4", "--offset_range", "5", "--offset_step", "2", "--sym", a.sym,
            "--low_resol_join_halves", "40", "--norm", "--scale", "--j", "1", "--random_seed", "0"]


def spa3d_cmd(a, out: str) -> list[str]:
    return [sys.executable, "-m", "spa3d", "refine3d", "--i", a.input, "--ref", "reference.mrc", "--o", out,
            "--ini-high", "50", "--ctf", "--particle-diameter", str(a.diameter), "--flatten-solvent", "--zero-mask",
            "--angular-sampling", "7.5", "--auto-local-healpix-order", "4", "--offset-range", "5", "--offset-step", "2",
            "--sym", a.sym, "--seed", str(a.seed), "--quiet"] + (
        ["--unmasked-reconstruction"] if a.unmasked_reconstruction else []) + (
        ["--masked-reconstruction"] if a.masked_reconstruction else []) + (["--no-prepass"] if a.no_prepass else [])


def score(job: Path, truth, apix: float, relion: bool):
    """(iterations, reported Å, FSC 0.5 Å and FSC 0.143 Å of the final map against the truth, after superposing)."""
    model = read_star(job / "run_model.star")["model_general"]
    reported = float(model["rlnCurrentResolution"].iloc[0])
    its = [int(m.group(1)) for p in job.glob("run_it*_half1_model.star" if not relion else "run_it*_optimiser.star")
           if (m := re.search(r"run_it(\d+)_", p.name))]
    vol, _ = read_map(job / "run_class001.mrc")
    aligned, _ = superpose(vol, truth)
    c = fsc(aligned, truth)
    n = truth.shape[0]
    return max(its), reported, resolution_at(c, n, apix, 0.5), resolution_at(c, n, apix, 0.143)


def shell_check(job: Path, truth, apix: float, mask) -> dict:
    """Shells (cycles per box) of the half maps' FSC 0.143 and of their average's FSC 0.5 against the truth,
    unmasked and in ``mask``, and of the postprocessed (phase-randomisation corrected) FSC 0.143 in ``mask``."""
    from spa3d.maps.postprocess import postprocess

    halves = [read_map(job / f"run_half{h}_class001_unfil.mrc")[0] for h in (1, 2)]
    aligned, _ = superpose((halves[0] + halves[1]) / 2, truth, refine=True)
    n = truth.shape[0]

    def shell(curve, t):
        return n * apix / resolution_at(curve, n, apix, t)

    pp = postprocess(halves[0], halves[1], apix, mask)
    return {"half": shell(fsc(*halves), 0.143), "truth": shell(fsc(aligned, truth), 0.5),
            "half_masked": shell(fsc(halves[0] * mask, halves[1] * mask), 0.143),
            "truth_masked": shell(fsc(aligned * mask, truth * mask), 0.5), "postprocess": n * apix / pp.resolution}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--diameter", type=float, default=110.0)
    ap.add_argument("--protein", choices=("1tii", "d2"), default="1tii")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--angpix", type=float, default=2.0)
    ap.add_argument("--noise-spectrum", default=None, help="a real micrograph (MRC): particles from spa3d simulate "
                    "with noise of its spectrum, a per-micrograph intensity scale (SD 0.1) and defocus error (SD 200 Å) "
                    "instead of relion_project's white noise")
    ap.add_argument("--no-prepass", action="store_true", help="spa3d scores the whole 3.75° grid in its global "
                    "searches, as RELION (default: a 7.5° pre-pass first)")
    ap.add_argument("--unmasked-reconstruction", action="store_true", help="spa3d back-projects the unmasked images "
                    "(RELION's way; refine3d's option)")
    ap.add_argument("--masked-reconstruction", action="store_true", help="spa3d back-projects the masked images at "
                    "every frequency (refine3d's option)")
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--reuse-relion", action="store_true")
    ap.add_argument("--reuse-spa3d", action="store_true", help="score spa3d's finished run in the working directory "
                    "(its time from its run.log) instead of running it again")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    a.sym = "D2" if a.protein == "d2" else "C1"
    work = Path(a.workdir or tempfile.mkdtemp(prefix="spa3d_bench_r3d_"))
    work.mkdir(parents=True, exist_ok=True)
    apix = a.angpix
    structure = str(d2_tetramer(work / "d2.pdb")) if a.protein == "d2" else None
    a.input = "particles.star" if a.noise_spectrum else "noisy.star"
    if not (work / a.input).exists():
        if a.noise_spectrum:
            simulate([structure or default_structure()], work, SimulationOptions(
                n_particles=a.n, snr=a.snr, seed=5, box=a.box, pixel_size=apix, n_micrographs=max(1, a.n // 25),
                micrograph_size=max(512, 8 * a.box), noise_spectrum=a.noise_spectrum, scale_sd=0.1, defocus_error=200.0))
        else:
            relion_particles(work, a.n, a.snr, seed=5, box=a.box, pixel_size=apix, structure=structure)
    truth, _ = read_map(work / "truth_class001.mrc")
    write_map(work / "reference.mrc", lowpass(truth, apix, 50.0), apix)
    rows = []
    out = work / f"spa3d_seed{a.seed}"
    out.mkdir(exist_ok=True)
    if a.reuse_spa3d and (out / "run_class001.mrc").exists():
        t_s = float(re.findall(r"done in ([\d.]+) s", (out / "run.log").read_text())[-1])
    else:
        t_s = timed(spa3d_cmd(a, str(out.relative_to(work))), work)
    rows.append(("spa3d refine3d", t_s, *score(out, truth, apix, False)))
    jobs = {"spa3d refine3d": out}
    if not a.skip_relion:
        rdir = work / "relion"
        stamp = rdir / "wall_seconds.json"
        if not (a.reuse_relion and stamp.exists()):
            rdir.mkdir(exist_ok=True)
            t_r = timed(relion_cmd(a, "relion/run"), work)
            stamp.write_text(json.dumps({"wall_s": t_r}))
        rows.append(("relion_refine_mpi", json.loads(stamp.read_text())["wall_s"], *score(rdir, truth, apix, True)))
        jobs["relion_refine_mpi"] = rdir
    print(f"\n3D auto-refinement of {a.n} particles of {'a D2 tetramer (D2)' if a.sym == 'D2' else '1TII (C1)'} "
          f"({'spa3d simulate, noise of ' + Path(a.noise_spectrum).name if a.noise_spectrum else 'relion_project'}; box {a.box}, {apix} Å/px, SNR {a.snr}), reference: the truth at 50 Å, 7.5° -> local from "
          f"1.8°, offsets 5/1 px, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}")
    print(f"{'program':<18} {'wall (s)':>9} {'iter':>5} {'reported (Å)':>13} {'FSC0.5 (Å)':>11} {'FSC0.143 (Å)':>13}")
    for prog, t, its, rep, r5, r1 in rows:
        print(f"{prog:<18} {t:9.1f} {its:5d} {rep:13.2f} {r5:11.2f} {r1:13.2f}")
    from spa3d.maps.postprocess import create_mask

    mask = create_mask(truth, apix, 15.0, 0.05 * float(lowpass(truth, apix, 15.0).max()), 3, 3)
    print(f"\nshell check (Fourier shells of the box; 1 shell = {a.box * apix:.0f} Å / shell number): half maps' "
          f"FSC 0.143 against their average's FSC 0.5 against the truth; mask: the truth at 15 Å, 5 % of its maximum, "
          f"+3 px, soft 3 px ({100 * mask.mean():.1f} % of the box)")
    print(f"{'program':<18} {'half 0.143':>11} {'truth 0.5':>10} {'diff':>6} {'masked half':>12} {'masked truth':>13} "
          f"{'diff':>6} {'postprocess':>12}")
    for prog, job in jobs.items():
        if not (job / "run_half1_class001_unfil.mrc").exists():  # a RELION run stopped before converging
            continue
        c = shell_check(job, truth, apix, mask)
        print(f"{prog:<18} {c['half']:11.1f} {c['truth']:10.1f} {c['half'] - c['truth']:+6.1f} {c['half_masked']:12.1f} "
              f"{c['truth_masked']:13.1f} {c['half_masked'] - c['truth_masked']:+6.1f} {c['postprocess']:12.1f}")
    print_tail(rows, out / "run.log", work)


if __name__ == "__main__":
    main()
