"""spa3d reconstruct vs relion_reconstruct on the same particles, in the same run.

Simulates particles of PDB 1TII with relion_project (box 64 at 2 Å/pixel by
default, or ``--box 256 --angpix 0.5``; white noise at SNR ≈ 0.1, CTF),
reconstructs them at their true poses with both programs (CTF correction,
and ``--sym D2`` if asked: then the ground truth is the map averaged over D2),
and prints wall time, peak memory and FSC resolution against the ground truth
(0.5 and 0.143), the time and memory ratios, and the mutual FSC. Then
reconstructs ``--big`` particles (the same images listed again and again)
with spa3d to show that peak memory does not grow with the number of
particles.

    python benchmarks/reconstruct_vs_relion.py [--n 2000] [--big 100000] [--workdir DIR]
    python benchmarks/reconstruct_vs_relion.py --box 256 --angpix 0.5 --n 2000 --sym D2 --big 20000 --repeats 1
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from relion_data import measure, relion_particles

from spa3d.fourier.filters import fsc, resolution_at
from spa3d.io.mrc import read_map
from spa3d.io.star import read_particles_star

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--big", type=int, default=100000, help="particles for the memory run (0: skip)")
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each program (best is reported)")
    ap.add_argument("--box", type=int, default=64, help="box in pixels (default 64)")
    ap.add_argument("--angpix", type=float, default=2.0, help="pixel size in Å (default 2)")
    ap.add_argument("--sym", default="C1", help="point group imposed by both programs (default C1)")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    for prog in ("relion_project", "relion_reconstruct"):
        if shutil.which(prog) is None:
            sys.exit(f"{prog} not found: apt-get install -y relion")
    spa3d = shutil.which("spa3d") or str(Path(sys.executable).parent / "spa3d")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="spa3d_bench_rec_"))
    work.mkdir(parents=True, exist_ok=True)

    # -- data: poses and CTFs from spa3d, images from relion_project -------------------------------
    if not (work / "noisy.star").exists():
        relion_particles(work, a.n, a.snr, seed=11, box=a.box, pixel_size=a.angpix)
    truth, apix = read_map(work / "truth_class001.mrc")
    n = truth.shape[0]
    if a.sym.upper() != "C1":
        from spa3d.maps.transform import symmetrize

        truth = symmetrize(truth, a.sym)

    # -- both reconstructions ----------------------------------------------------------------------
    runs = {
        "relion_reconstruct": ["relion_reconstruct", "--i", "noisy.star", "--o", "relion.mrc", "--ctf",
                               "--sym", a.sym],
        "spa3d reconstruct": [spa3d, "reconstruct", "--i", "noisy.star", "--o", "spa3d.mrc", "--ctf", "--sym", a.sym,
                              "--quiet"],
    }
    results = {}
    for name, cmd in runs.items():
        best = min((measure(cmd, work) for _ in range(a.repeats)), key=lambda x: x[0])
        results[name] = best
    maps = {"relion_reconstruct": read_map(work / "relion.mrc")[0], "spa3d reconstruct": read_map(work / "spa3d.mrc")[0]}

    import os
    import time

    print(f"\nreconstruction of {a.n} particles (relion_project, box {n}, {apix} Å/px, SNR {a.snr}, CTF, "
          f"symmetry {a.sym}), {os.cpu_count()} CPU cores, best of {a.repeats}, {time.strftime('%Y-%m-%d')}")
    print(f"{'program':<20} {'wall (s)':>9} {'peak MB':>8} {'FSC0.5 (Å)':>11} {'FSC0.143 (Å)':>13} {'map-GT corr':>12}")
    for name, (wall, rss) in results.items():
        curve = fsc(maps[name], truth)
        corr = np.corrcoef(maps[name].ravel(), truth.ravel())[0, 1]
        print(f"{name:<20} {wall:9.2f} {rss:8.0f} {resolution_at(curve, n, apix, 0.5):11.2f} "
              f"{resolution_at(curve, n, apix, 0.143):13.2f} {corr:12.3f}")
    ratio = results["spa3d reconstruct"][0] / results["relion_reconstruct"][0]
    mem_ratio = results["spa3d reconstruct"][1] / results["relion_reconstruct"][1]
    mutual = fsc(maps["spa3d reconstruct"], maps["relion_reconstruct"])
    print(f"time ratio spa3d / RELION: {ratio:.2f}; peak memory ratio: {mem_ratio:.2f}")
    print(f"mutual FSC spa3d vs RELION, min up to 0.8 Nyquist: {mutual[1:int(0.8 * n / 2) + 1].min():.3f}")

    # -- memory does not grow with the number of particles --------------------------------------------
    if a.big > 0:
        t = read_particles_star(work / "noisy.star")
        reps = int(np.ceil(a.big / len(t.particles)))
        t.particles = t.particles.loc[np.tile(t.particles.index, reps)[: a.big]].reset_index(drop=True)
        t.write(work / "big.star")
        print(f"\nspa3d reconstruct on {a.big} particles (the {a.n} images listed {reps} times), streamed:")
        for count, star in ((a.n, "noisy.star"), (a.big, "big.star")):
            wall, rss = measure([spa3d, "reconstruct", "--i", star, "--o", f"mem_{count}.mrc", "--ctf", "--sym", a.sym,
                                 "--quiet"], work)
            print(f"  {count:>7} particles: {wall:7.1f} s, {count / wall:8.0f} particles/s, peak {rss:6.0f} MB")
    print(f"\nworking directory: {work}")


if __name__ == "__main__":
    main()
