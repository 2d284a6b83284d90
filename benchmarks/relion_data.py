"""Benchmark data shared by the benchmarks: particles of PDB 1TII projected by relion_project.

Poses, origins and CTFs come from ``spa3d simulate``; the images from
``relion_project`` (noise-free ``clean.star`` and, with white noise at the
requested SNR, ``noisy.star``), so both programs see RELION-made data.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np

from spa3d.data import default_mixture, default_structure
from spa3d.io.mrc import read_map
from spa3d.io.particles import ParticleSet
from spa3d.jobs.simulate import SimulationOptions, simulate


def timed(cmd: list[str], cwd: Path) -> float:
    """Wall time (s) of a command run in ``cwd``; raises with its stderr when it fails."""
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"{cmd[0]} failed: {r.stderr[-2000:]}")
    return time.perf_counter() - t


_MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
            "w = time.perf_counter() - t; "
            "print(r.returncode, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
            "sys.stderr.write(r.stderr[-3000:] if r.returncode else '')")


def measure(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall time (s) and peak resident memory (MB) of a command."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], cwd=cwd, capture_output=True, text=True)
    code, wall, rss = out.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr}")
    return float(wall), float(rss)


def d2_tetramer(path: Path, offset=(18.0, 12.0, 8.0)) -> Path:
    """A D2 tetramer built from 1TII's A subunit (chain A): a second protein for the benchmarks.

    The chain's centre of mass is put at ``offset`` (Å) and copied by D2's four operators (identity, 2-folds
    about x, y and z; RELION's D2 axes): a 4 × 186-residue particle about 80 × 62 × 64 Å, of another shape and
    symmetry than 1TII's AB5 complex. Written as a PDB file (gemmi).
    """
    import gemmi

    st = gemmi.read_structure(default_structure())
    st.remove_hydrogens()
    st.remove_waters()
    model = st[0]
    chain = model["A"]
    xyz = np.array([a.pos.tolist() for r in chain for a in r])
    shift = np.asarray(offset) - xyz.mean(0)
    out = gemmi.Structure()
    out.cell = st.cell
    new = gemmi.Model("1")
    for name, d in zip("ABCD", ([1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1])):
        c = gemmi.Chain(name)
        for r in chain:
            res = gemmi.Residue()
            res.name, res.seqid = r.name, r.seqid
            for a in r:
                b = gemmi.Atom()
                b.name, b.element, b.occ, b.b_iso = a.name, a.element, a.occ, a.b_iso
                p = (np.array(a.pos.tolist()) + shift) * np.asarray(d)
                b.pos = gemmi.Position(*p)
                res.add_atom(b)
            c.add_residue(res)
        new.add_chain(c)
    out.add_model(new)
    out.setup_entities()
    out.write_pdb(str(path))
    return path


def relion_particles(work: Path, n: int, snr: float, seed: int, box: int = 64, pixel_size: float = 2.0,
                     structure: str | None = None) -> tuple[np.ndarray, float]:
    """Write truth_class001.mrc, particles.star, clean.* and noisy.* into ``work``; return (truth map, pixel size).

    ``structure``: an atomic model or map (default: the embedded PDB 1TII)."""
    if shutil.which("relion_project") is None:
        raise SystemExit("relion_project not found: apt-get install -y relion")
    simulate([structure or default_structure()], work / "poses",
             SimulationOptions(n_particles=n, snr=1.0, seed=seed, box=box, pixel_size=pixel_size))
    for f in ("particles.star", "truth_class001.mrc"):
        shutil.copy(work / "poses" / f, work / f)
    project = ["relion_project", "--i", "truth_class001.mrc", "--ang", "particles.star", "--ctf"]
    subprocess.run([*project, "--o", "clean"], cwd=work, check=True, capture_output=True)
    clean = ParticleSet(work / "clean.star").read(np.arange(min(n, 500)))
    sigma = float(np.sqrt(clean.var(axis=(1, 2)).mean() / snr))
    subprocess.run([*project, "--o", "noisy", "--add_noise", "--white_noise", f"{sigma:.5f}"], cwd=work, check=True,
                   capture_output=True)
    return read_map(work / "truth_class001.mrc")


def d2_mixture(work: Path, box: int = 64, pixel_size: float = 2.0) -> list[np.ndarray]:
    """Three species of other proteins than :func:`spa3d.data.default_mixture`'s: the D2 tetramer of
    :func:`d2_tetramer`, its A–B dimer (a 2-fold half), and the monomer (chain A) alone."""
    import gemmi

    from spa3d.io.atomic import density_from_atoms

    st = gemmi.read_structure(str(d2_tetramer(work / "d2_tetramer.pdb")))
    atoms = [(a.pos.tolist(), a.element.atomic_number, ch.name) for ch in st[0] for r in ch for a in r]
    xyz = np.array([a[0] for a in atoms])
    z = np.array([a[1] for a in atoms], dtype=float)
    chain = np.array([a[2] for a in atoms])
    species = [np.ones(len(xyz), bool), np.isin(chain, ["A", "B"]), chain == "A"]
    # each species centred on its own centre of mass, as a picker would centre it
    return [density_from_atoms(xyz[m], z[m], box, pixel_size) for m in species]


def relion_mixture(work: Path, n: int, fractions: list[float], snr: float, seed: int,
                   maps: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Particles of three species (default: :func:`spa3d.data.default_mixture`'s) projected by relion_project.

    Writes truth_classNNN.mrc, noisy.star (all particles, no class labels) and
    truth.star (the same with the true rlnClassNumber) into ``work``; the noise
    is white, one σ for all species, set from the first species' clean
    images for the given SNR, and the images are divided by it (unit noise
    variance, as RELION expects of normalised particles). Returns the true maps.
    """
    if shutil.which("relion_project") is None:
        raise SystemExit("relion_project not found: apt-get install -y relion")
    from spa3d.io.mrc import write_map
    from spa3d.io.star import read_star, write_star

    maps = default_mixture() if maps is None else maps
    for k, m in enumerate(maps):
        write_map(work / f"truth_class{k + 1:03d}.mrc", m, 2.0)
    simulate([str(work / f"truth_class{k + 1:03d}.mrc") for k in range(len(maps))], work / "poses",
             SimulationOptions(n_particles=n, snr=1.0, seed=seed, fractions=fractions))
    tables = read_star(work / "poses" / "particles_truth.star")
    optics, parts = tables["optics"], tables["particles"]
    labels = parts["rlnClassNumber"].to_numpy()
    sigma = None
    names = parts["rlnImageName"].copy()
    for k in range(1, len(maps) + 1):
        sub = parts[labels == k].drop(columns=["rlnClassNumber"])
        write_star(work / f"poses_{k}.star", {"optics": optics, "particles": sub})
        project = ["relion_project", "--i", f"truth_class{k:03d}.mrc", "--ang", f"poses_{k}.star", "--ctf"]
        if sigma is None:
            subprocess.run([*project, "--o", "clean_1"], cwd=work, check=True, capture_output=True)
            clean = ParticleSet(work / "clean_1.star").read(np.arange(min(len(sub), 500)))
            sigma = float(np.sqrt(clean.var(axis=(1, 2)).mean() / snr))
        subprocess.run([*project, "--o", f"noisy_{k}", "--add_noise", "--white_noise", f"{sigma:.5f}"], cwd=work,
                       check=True, capture_output=True)
        # normalised as relion_preprocess --norm leaves particles: background noise of unit variance
        with mrcfile.open(work / f"noisy_{k}.mrcs", "r+") as mrc:
            mrc.data[...] = mrc.data / sigma
        names[labels == k] = [f"{i + 1:06d}@noisy_{k}.mrcs" for i in range(len(sub))]
    parts = parts.assign(rlnImageName=names)
    write_star(work / "truth.star", {"optics": optics, "particles": parts})
    # as picked particles: no class, pose or offset yet
    drop = [c for c in parts.columns if c == "rlnClassNumber" or c.startswith(("rlnAngle", "rlnOrigin"))]
    write_star(work / "noisy.star", {"optics": optics, "particles": parts.drop(columns=drop)})
    return maps


def sgemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """The machine's single-precision GEMM rate (GFLOP/s) through torch, best of ``repeats`` n × n products."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def estep_rate_line(run_log: Path, sgemm_gflops: float) -> str:
    """The E-step summary a spa3d job wrote last in its run.log, with its fraction of the sgemm rate."""
    lines = [ln for ln in Path(run_log).read_text().splitlines() if " E-step: " in ln]
    if not lines:
        return f"{run_log}: no E-step summary"
    text = lines[-1].split(" E-step: ", 1)[1]
    rate = float(text.split(" = ", 1)[1].split(" GFLOP/s", 1)[0])
    return f"E-step: {text}; {100 * rate / sgemm_gflops:.0f}% of sgemm ({sgemm_gflops:.0f} GFLOP/s)"


def print_tail(rows: list, run_log: Path, work: Path) -> None:
    """The lines every benchmark ends with: the time ratio (first row spa3d, second RELION), spa3d's E-step rate
    against the sgemm rate, and the working directory."""
    if len(rows) == 2:
        print(f"time ratio spa3d/RELION: {rows[0][1] / rows[1][1]:.3f}")
    print(f"spa3d {estep_rate_line(run_log, sgemm_rate())}")
    print(f"\nworking directory: {work}")
