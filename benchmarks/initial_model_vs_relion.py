"""spa3d initial-model vs relion_refine --denovo_3dref --sgd on the same particles, in the same run.

Simulates particles of PDB 1TII (or, with ``--protein d2``, a D2 tetramer of
its A subunit) with relion_project (box 64, 2 Å/pixel, SNR ≈ 0.1, CTF), runs RELION 3.1's SGD initial model and spa3d's with the same
schedule, superposes each result on the ground truth (rotation, shift, both
hands) and prints wall time and FSC resolution (0.5 and 0.143) for both.
``--full`` also times spa3d on the tutorial's full schedule (25/100/25,
100→500); ``--relion-full`` runs RELION on it too (40 min on 2 cores).
``--reuse-relion`` keeps a finished RELION run (and its recorded wall time,
relion_<schedule>/wall_seconds.json) found in ``--workdir``; ``--seeds``
runs spa3d with several seeds.

``--realistic MIC.mrc`` makes the particles with ``spa3d simulate`` instead
of relion_project: noise with the spectrum of the real micrograph MIC.mrc
(e.g. mrcfile's epu2.9_example.mrc), 10 % junk and 5 % empty picks, a
per-particle intensity scale (log-normal SD 0.1), ice thickness (SD 15 %)
and defocus errors (SD 200 Å) in the STAR file. With ``--protein d2`` every
map is then also scored after the tutorial's symmetry steps: spa3d's by
``spa3d align-symmetry --sym D2`` and ``spa3d symmetrize``, RELION's by
``relion_align_symmetry`` and ``relion_image_handler --sym D2``.

    python benchmarks/initial_model_vs_relion.py [--n 2000] [--full] [--relion-full] [--protein d2]
        [--realistic MIC.mrc --snr 0.05] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from relion_data import d2_tetramer, estep_rate_line, relion_particles, sgemm_rate, timed

from spa3d.fourier.filters import fsc, resolution_at
from spa3d.io.mrc import read_map
from spa3d.maps.align import superpose

SHORT = dict(ini=10, inbetween=30, fin=10, ini_subset=100, fin_subset=300)
FULL = dict(ini=25, inbetween=100, fin=25, ini_subset=100, fin_subset=500)


def relion_cmd(s: dict, diameter: float, out: str) -> list[str]:
    return ["relion_refine", "--o", out, "--i", "noisy.star", "--denovo_3dref", "--sgd", "--ctf", "--K", "1",
            "--sym", "C1", "--flatten_solvent", "--zero_mask", "--particle_diameter", str(diameter),
            "--healpix_order", "1", "--oversampling", "1", "--offset_range", "6", "--offset_step", "2",
            "--sgd_ini_iter", str(s["ini"]), "--sgd_inbetween_iter", str(s["inbetween"]), "--sgd_fin_iter", str(s["fin"]),
            "--sgd_ini_subset", str(s["ini_subset"]), "--sgd_fin_subset", str(s["fin_subset"]),
            "--sgd_ini_resol", "35", "--sgd_fin_resol", "15", "--sgd_write_iter", "10", "--j", "2", "--pool", "3",
            "--dont_combine_weights_via_disc"]


def spa3d_cmd(s: dict, diameter: float, out: str, seed: int, extra: list[str]) -> list[str]:
    exe = shutil.which("spa3d") or str(Path(sys.executable).parent / "spa3d")
    return [exe, "initial-model", "--i", "noisy.star", "--o", out, "--particle-diameter", str(diameter),
            "--sgd-ini-iter", str(s["ini"]), "--sgd-inbetween-iter", str(s["inbetween"]), "--sgd-fin-iter", str(s["fin"]),
            "--sgd-ini-subset", str(s["ini_subset"]), "--sgd-fin-subset", str(s["fin_subset"]), "--seed", str(seed),
            "--quiet", *extra]


def score(path: Path, truth: np.ndarray, apix: float) -> tuple[float, float, bool]:
    vol, _ = read_map(path)
    aligned, sup = superpose(vol, truth)
    c = fsc(aligned, truth)
    n = truth.shape[0]
    return resolution_at(c, n, apix, 0.5), resolution_at(c, n, apix, 0.143), sup.mirrored


def realistic_particles(work: Path, n: int, snr: float, micrograph: str, structure: str | None):
    """The particles as ``spa3d simulate`` makes them with its realism options (module docstring): noisy.star and
    truth_class001.mrc in ``work``; returns (truth map, pixel size)."""
    from spa3d.data import default_structure
    from spa3d.jobs.simulate import SimulationOptions, simulate

    simulate([structure or default_structure()], work,
             SimulationOptions(n_particles=n, snr=snr, seed=12, noise_spectrum=micrograph, junk_fraction=0.1,
                               empty_fraction=0.05, scale_sd=0.1, defocus_error=200.0, ice_sd=0.15))
    shutil.copy(work / "particles.star", work / "noisy.star")
    return read_map(work / "truth_class001.mrc")


def symmetrised(path: Path, sym: str, relion: bool) -> Path:
    """The map after the tutorial's symmetry steps: axes aligned to ``sym``'s convention, then ``sym`` imposed
    (RELION's programs for RELION's map, spa3d's for spa3d's)."""
    aligned, out = path.with_name(path.stem + f"_align{sym}.mrc"), path.with_name(path.stem + f"_sym{sym}.mrc")
    if relion:
        steps = [["relion_align_symmetry", "--i", path.name, "--o", aligned.name, "--sym", sym],
                 ["relion_image_handler", "--i", aligned.name, "--o", out.name, "--sym", sym]]
    else:
        exe = shutil.which("spa3d") or str(Path(sys.executable).parent / "spa3d")
        steps = [[exe, "align-symmetry", "--i", path.name, "--o", aligned.name, "--sym", sym],
                 [exe, "symmetrize", "--i", aligned.name, "--o", out.name, "--sym", sym]]
    for cmd in steps:
        timed(cmd, path.parent)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--diameter", type=float, default=110.0, help="mask diameter in Å (1TII is about 80 Å across)")
    ap.add_argument("--full", action="store_true", help="also run spa3d on the tutorial's full schedule")
    ap.add_argument("--relion-full", action="store_true", help="also run RELION on the full schedule (slow)")
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--reuse-relion", action="store_true", help="reuse finished RELION runs in --workdir")
    ap.add_argument("--seeds", default="1", help="spa3d seeds, comma-separated (default 1)")
    ap.add_argument("--spa3d-args", default="", help="extra spa3d initial-model options, e.g. '--final-em 0'")
    ap.add_argument("--protein", choices=("1tii", "d2"), default="1tii",
                    help="1TII's AB5 complex, or a D2 tetramer of its A subunit (relion_data.d2_tetramer)")
    ap.add_argument("--realistic", default=None, metavar="MIC.mrc",
                    help="realistic particles from spa3d simulate, with the noise spectrum of this real micrograph")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="spa3d_bench_im_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.reuse_relion and (work / "noisy.star").exists():  # the particles RELION's recorded runs saw
        truth, apix = read_map(work / "truth_class001.mrc")
    else:
        structure = str(d2_tetramer(work / "d2_tetramer.pdb")) if a.protein == "d2" else None
        if a.realistic:
            truth, apix = realistic_particles(work, a.n, a.snr, a.realistic, structure)
        else:
            truth, apix = relion_particles(work, a.n, a.snr, seed=12, structure=structure)
    sym = "D2" if a.protein == "d2" else None

    def scored(path: Path, relion: bool) -> tuple:
        """(FSC 0.5, FSC 0.143, mirrored) of the map as written and, for D2, after the symmetry steps."""
        raw = score(path, truth, apix)
        return raw + (score(symmetrised(path, sym, relion), truth, apix) if sym else (float("nan"),) * 2 + (False,))

    rows, ran = [], []
    plans = [("short", SHORT, not a.skip_relion)]
    if a.full:
        plans.append(("full", FULL, a.relion_full))
    for label, s, with_relion in plans:
        total = s["ini"] + s["inbetween"] + s["fin"]
        times = []
        for seed in [int(x) for x in a.seeds.split(",")]:
            out = f"spa3d_{label}_seed{seed}"
            (work / out).mkdir(exist_ok=True)
            ran.append(out)
            t_s = timed(spa3d_cmd(s, a.diameter, out, seed, a.spa3d_args.split()), work)
            times.append(t_s)
            rows.append((label, f"spa3d (seed {seed})", t_s,
                         *scored(work / out / f"run_it{total:03d}_class001.mrc", relion=False)))
        if with_relion:
            rdir = work / f"relion_{label}"
            stamp = rdir / "wall_seconds.json"
            if not (a.reuse_relion and stamp.exists()):
                rdir.mkdir(exist_ok=True)
                stamp.write_text(json.dumps({"wall_s": timed(relion_cmd(s, a.diameter, f"relion_{label}/run"), work)}))
            t_r = json.loads(stamp.read_text())["wall_s"]
            rows.append((label, "relion_refine --sgd", t_r, *scored(rdir / f"run_it{total:03d}_class001.mrc",
                                                                    relion=True)))
            rows.append((label, "time ratio spa3d/RELION", max(times) / t_r, *(float("nan"), float("nan"), False) * 2))

    source = (f"spa3d simulate, noise of {Path(a.realistic).name}, 10 % junk, 5 % empty, scale, ice and defocus errors"
              if a.realistic else "relion_project")
    print(f"\nSGD initial model from {a.n} particles of {a.protein} ({source}, box {truth.shape[0]}, {apix} Å/px, "
          f"SNR {a.snr}), {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}; schedules: short 10/30/10, "
          f"100->300; full 25/100/25, 100->500; 35->15 Å; FSC against the truth over both hands"
          + ("; 'after D2': aligned to D2's axes and symmetrised" if sym else ""))
    print(f"{'schedule':<9} {'program':<24} {'wall (s)':>9} {'FSC0.5 (Å)':>11} {'FSC0.143 (Å)':>13} {'hand':>9}"
          + (f" {'after D2: FSC0.5':>17} {'FSC0.143':>9} {'hand':>9}" if sym else ""))
    for label, prog, t, r5, r1, mir, s5, s1, smir in rows:
        hand = "" if np.isnan(r5) else ("mirrored" if mir else "correct")
        line = f"{label:<9} {prog:<24} {t:9.2f} {r5:11.2f} {r1:13.2f} {hand:>9}"
        if sym:
            line += f" {s5:17.2f} {s1:9.2f} {'' if np.isnan(s5) else ('mirrored' if smir else 'correct'):>9}"
        print(line)
    rate = sgemm_rate()
    for out in ran:
        print(f"{out}: {estep_rate_line(work / out / 'run.log', rate)}")
    print(f"\nworking directory: {work}")


if __name__ == "__main__":
    main()
