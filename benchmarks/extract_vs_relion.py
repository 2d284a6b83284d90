"""spa3d extract vs relion_preprocess re-extraction on the same micrographs, in the same run.

The tutorial's step 20 sizes: micrographs of 4096 × 4096 pixels, particles
re-extracted at box 360, rescaled to 256, normalised (background circle 75 %
of the box) and contrast-inverted. ``spa3d simulate`` writes the micrographs
(PDB 1TII particles with CTF and white noise, ``--per-mic`` particles on
each) and a particles.star with refined offsets; both programs then
re-extract them. Prints wall time and peak memory of each, their ratio, and
how far spa3d's particles are from RELION's (image correlation, largest pixel
difference relative to the image's SD, coordinates and origins).

    python benchmarks/extract_vs_relion.py [--mics 20] [--per-mic 100] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from relion_data import measure

from spa3d.data import default_structure
from spa3d.io.particles import ParticleSet
from spa3d.jobs.simulate import SimulationOptions, simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mics", type=int, default=20)
    ap.add_argument("--per-mic", type=int, default=100)
    ap.add_argument("--mic-size", type=int, default=4096)
    ap.add_argument("--box", type=int, default=360)
    ap.add_argument("--rescale", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    if shutil.which("relion_preprocess") is None:
        raise SystemExit("relion_preprocess not found: apt-get install -y relion")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="extract_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "micrographs_ctf.star").exists():
        # particles drawn at box 128 (1 Å/px) into the micrographs; only the micrographs and coordinates matter here
        simulate([default_structure()], work, SimulationOptions(n_particles=a.mics * a.per_mic, snr=0.1, seed=3,
                                                                box=128, pixel_size=1.0, n_micrographs=a.mics,
                                                                micrograph_size=a.mic_size, offset_sigma_px=3.0))
    bg_radius = int(0.75 * a.box / 2 * a.rescale / a.box)  # RELION's default background circle, rescaled pixels
    for d in ("R", "S"):
        shutil.rmtree(work / d, ignore_errors=True)
    t_rel, m_rel = measure(  # seconds, MB
        ["relion_preprocess", "--i", "micrographs_ctf.star", "--reextract_data_star", "particles.star",
         "--part_dir", "R/", "--part_star", "R/particles.star", "--extract", "--extract_size", str(a.box),
         "--scale", str(a.rescale), "--norm", "--bg_radius", str(bg_radius), "--invert_contrast"], work)
    exe = shutil.which("spa3d") or str(Path(sys.executable).parent / "spa3d")
    t_spa, m_spa = measure(
        [exe, "extract", "--mics", "micrographs_ctf.star", "--reextract", "particles.star", "--o", "S", "--quiet",
         "--box", str(a.box), "--rescale", str(a.rescale), "--norm", "--invert"], work)

    r, s = ParticleSet(work / "R" / "particles.star"), ParticleSet(work / "S" / "particles.star")
    assert len(r) == len(s), f"{len(r)} vs {len(s)} particles"
    ir, is_ = r.read(np.arange(len(r))), s.read(np.arange(len(s)))
    cc = np.array([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(ir, is_)])
    rel = np.array([np.abs(x - y).max() / max(x.std(), 1e-12) for x, y in zip(ir, is_)])
    coord = max(np.abs(r.table.particles[c].astype(float).to_numpy() - s.table.particles[c].astype(float).to_numpy())
                .max() for c in ("rlnCoordinateX", "rlnCoordinateY"))
    n_part = len(r)
    print(f"\nre-extraction of {n_part} particles from {a.mics} micrographs of {a.mic_size}² px: box {a.box} → "
          f"{a.rescale}, normalised (background radius {bg_radius} px), contrast inverted; "
          f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}")
    print(f"{'program':18s} {'wall (s)':>9s} {'peak (GB)':>10s} {'particles/s':>12s}")
    print(f"{'spa3d extract':18s} {t_spa:9.1f} {m_spa / 1024:10.2f} {n_part / t_spa:12.0f}")
    print(f"{'relion_preprocess':18s} {t_rel:9.1f} {m_rel / 1024:10.2f} {n_part / t_rel:12.0f}")
    print(f"time ratio spa3d/RELION: {t_spa / t_rel:.3f}; memory ratio {m_spa / m_rel:.2f}")
    print(f"agreement with RELION: lowest image correlation {cc.min():.6f}, largest pixel difference "
          f"{rel.max():.2e} × the image SD, coordinates equal to {coord:.3g} px")
    print(f"\nworking directory: {work}")


if __name__ == "__main__":
    main()
