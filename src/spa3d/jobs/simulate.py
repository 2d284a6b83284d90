"""``spa3d simulate``: particles (and optionally micrographs) with known ground truth.

From one or more maps (MRC) or atomic models (PDB/mmCIF), each particle is
a projection of one species (chosen with the given fractions) in a random
orientation, shifted by a random offset, multiplied by its CTF, plus white
Gaussian noise. SNR is the variance of the noise-free CTF-modulated
particle images divided by the noise variance (both over the whole box).

Outputs in OUT (the project directory; STAR paths are relative to it):
``particles.star`` (optics + particles: image names, CTF, true poses and
origins), ``particles_truth.star`` (the same with the true rlnClassNumber),
``truth_classNNN.mrc`` (the true maps), ``Particles/particles.mrcs``; with
micrographs also ``Micrographs/micNNN.mrc``, ``micrographs_ctf.star`` and the
particles' rlnMicrographName/rlnCoordinateX/Y. On micrographs the protein is
dark (as in real data) and the particle stacks are cut from them with
contrast inverted, so particles are white on black like RELION's extracted,
inverted particles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spa3d.errors import InputError
from spa3d.fourier.ctf import CtfParams, ctf_half_plane
from spa3d.fourier.grid import irfft2_centered, phase_shift_2d
from spa3d.fourier.projector import Projector
from spa3d.geometry.euler import euler_to_matrix, matrix_to_euler, random_rotations
from spa3d.io.atomic import model_density
from spa3d.io.mrc import StackWriter, read_map, write_map
from spa3d.io.star import write_star
from spa3d.jobs.progress import Progress

log = logging.getLogger("spa3d")


@dataclass
class SimulationOptions:
    """Options of a simulation; lengths in Å unless named ``_px``."""

    n_particles: int = 1000
    box: int = 64
    pixel_size: float = 2.0
    snr: float = 0.1
    fractions: list[float] | None = None
    seed: int = 0
    ctf: bool = True
    defocus_min: float = 10000.0
    defocus_max: float = 30000.0
    astigmatism: float = 300.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    offset_sigma_px: float = 2.0
    model_resolution: float | None = None
    n_micrographs: int = 0
    micrograph_size: int = 512
    batch_size: int = 256
    star_prefix: str = ""  # prepended to file names in the STAR files (the job directory inside a project)


def load_species(paths: list[str], box: int, pixel_size: float, resolution: float | None) -> list[np.ndarray]:
    """Maps (box³) of every input: MRC maps as they are, atomic models as simulated density."""
    maps = []
    for p in paths:
        if str(p).lower().endswith((".mrc", ".map", ".mrcs")):
            vol, apix = read_map(p)
            if vol.shape != (box, box, box):
                raise InputError(p, f"map is {vol.shape[2]}x{vol.shape[1]}x{vol.shape[0]}, expected box {box}")
            if apix > 0 and abs(apix - pixel_size) > 1e-3:
                raise InputError(p, f"map pixel size {apix:.3f} Å differs from --angpix {pixel_size:.3f} Å")
            maps.append(vol)
        else:
            maps.append(model_density(p, box, pixel_size, resolution))
    return maps


def _random_ctf(n: int, o: SimulationOptions, rng: np.random.Generator) -> CtfParams:
    mean = rng.uniform(o.defocus_min, o.defocus_max, n)
    ast = rng.uniform(-o.astigmatism, o.astigmatism, n) / 2
    return CtfParams(mean + ast, mean - ast, rng.uniform(0, 180, n), np.full(n, o.voltage), np.full(n, o.cs),
                     np.full(n, o.amplitude_contrast), np.zeros(n), np.ones(n), np.zeros(n))


def _optics_table(o: SimulationOptions, image_pixel: float, box: int) -> pd.DataFrame:
    return pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
        "rlnMicrographOriginalPixelSize": [o.pixel_size], "rlnVoltage": [o.voltage],
        "rlnSphericalAberration": [o.cs], "rlnAmplitudeContrast": [o.amplitude_contrast],
        "rlnImagePixelSize": [image_pixel], "rlnImageSize": [box], "rlnImageDimensionality": [2]})


def render_particles(projectors: list[Projector], labels: np.ndarray, rotations: np.ndarray, shifts_px: np.ndarray,
                     ctf: CtfParams | None, box: int, pixel_size: float) -> np.ndarray:
    """Noise-free particle images (B, box, box): projection, CTF, then shift by ``shifts_px`` (x, y)."""
    out = np.empty((len(labels), box, box), dtype=np.float32)
    rot = torch.as_tensor(rotations, dtype=torch.float32)
    ctf_img = ctf_half_plane(ctf, box, pixel_size) if ctf is not None else None
    phase = phase_shift_2d(box, torch.as_tensor(shifts_px, dtype=torch.float64)).to(torch.complex64)
    for k, proj in enumerate(projectors):
        sel = np.nonzero(labels == k)[0]
        if len(sel) == 0:
            continue
        ft = proj.project(rot[sel])
        if ctf_img is not None:
            ft = ft * ctf_img[sel]
        ft = ft * phase[sel]
        out[sel] = irfft2_centered(ft, box).numpy()
    return out


def simulate(inputs: list[str], out_dir: str | Path, opts: SimulationOptions) -> dict:
    """Simulate a dataset (see module docstring). Returns a summary dict."""
    out = Path(out_dir)
    o = opts
    if o.n_particles < 1:
        raise InputError(None, "--n must be at least 1")
    if o.box < 8 or o.box % 2:
        raise InputError(None, f"--box {o.box}: box must be even and at least 8 pixels")
    if o.snr <= 0:
        raise InputError(None, "--snr must be positive")
    fr = np.asarray(o.fractions if o.fractions else [1.0] * len(inputs), dtype=float)
    if len(fr) != len(inputs) or (fr < 0).any() or fr.sum() <= 0:
        raise InputError(None, f"--fractions needs {len(inputs)} non-negative values")
    fr = fr / fr.sum()
    maps = load_species(inputs, o.box, o.pixel_size, o.model_resolution)
    rng = np.random.default_rng(o.seed)
    torch.manual_seed(o.seed)
    n = o.n_particles
    labels = rng.choice(len(maps), size=n, p=fr)
    mats = random_rotations(n, rng)
    rot, tilt, psi = matrix_to_euler(mats)
    mats = euler_to_matrix(rot, tilt, psi)  # exactly what the STAR file will say
    offsets = rng.normal(0.0, o.offset_sigma_px, (n, 2)) if o.offset_sigma_px > 0 else np.zeros((n, 2))
    ctf = _random_ctf(n, o, rng) if o.ctf else None
    projectors = [Projector(m) for m in maps]

    out.mkdir(parents=True, exist_ok=True)
    for k, m in enumerate(maps):
        write_map(out / f"truth_class{k + 1:03d}.mrc", m, o.pixel_size)

    # signal variance from a sample, to set the noise level
    sample = rng.choice(n, size=min(n, 200), replace=False)
    clean = render_particles(projectors, labels[sample], mats[sample], -offsets[sample],
                             ctf.subset(sample) if ctf else None, o.box, o.pixel_size)
    signal_var = float(clean.var(axis=(1, 2)).mean())
    noise_sigma = float(np.sqrt(signal_var / o.snr))

    df = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@Particles/particles.mrcs" for i in range(n)]})
    if o.n_micrographs > 0:
        coords, mic_names, mic_table = _simulate_micrographs(out, projectors, labels, mats, offsets, ctf, noise_sigma, o, rng)
        df["rlnMicrographName"] = mic_names
        df["rlnCoordinateX"] = coords[:, 0]
        df["rlnCoordinateY"] = coords[:, 1]
    else:
        mic_table = None
        df["rlnMicrographName"] = "Micrographs/none.mrc"
        _write_particle_stack(out, projectors, labels, mats, offsets, ctf, noise_sigma, o, rng)
    if ctf is not None:
        df["rlnDefocusU"], df["rlnDefocusV"], df["rlnDefocusAngle"] = ctf.defocus_u, ctf.defocus_v, ctf.defocus_angle
        df["rlnCtfBfactor"], df["rlnCtfScalefactor"], df["rlnPhaseShift"] = 0.0, 1.0, 0.0
    df["rlnOpticsGroup"] = 1
    df["rlnGroupNumber"] = 1
    df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = rot, tilt, psi
    df["rlnOriginXAngst"] = offsets[:, 0] * o.pixel_size
    df["rlnOriginYAngst"] = offsets[:, 1] * o.pixel_size
    df["rlnRandomSubset"] = (np.arange(n) % 2) + 1
    if o.star_prefix:
        pre = o.star_prefix.rstrip("/") + "/"
        df["rlnImageName"] = [f"{s.split('@')[0]}@{pre}{s.split('@')[1]}" for s in df["rlnImageName"]]
        df["rlnMicrographName"] = pre + df["rlnMicrographName"].astype(str)
        if mic_table is not None:
            mic_table["micrographs"]["rlnMicrographName"] = pre + mic_table["micrographs"]["rlnMicrographName"]
    optics = _optics_table(o, o.pixel_size, o.box)
    write_star(out / "particles.star", {"optics": optics, "particles": df})
    truth = df.copy()
    truth["rlnClassNumber"] = labels + 1
    write_star(out / "particles_truth.star", {"optics": optics, "particles": truth})
    if mic_table is not None:
        write_star(out / "micrographs_ctf.star", mic_table)
    counts = np.bincount(labels, minlength=len(maps))
    log.info(f"simulated {n} particles ({', '.join(str(c) for c in counts)} per species), box {o.box}, "
             f"{o.pixel_size} Å/px, SNR {o.snr}, noise sigma {noise_sigma:.4g}")
    return {"n": n, "counts": counts.tolist(), "noise_sigma": noise_sigma, "signal_var": signal_var}


def _write_particle_stack(out, projectors, labels, mats, offsets, ctf, noise_sigma, o, rng):
    n = len(labels)
    writer = StackWriter(out / "Particles" / "particles.mrcs", n, o.box, o.pixel_size)
    ok = False
    try:
        prog = Progress(n, label="simulate: ")
        for s in range(0, n, o.batch_size):
            sl = slice(s, min(s + o.batch_size, n))
            # the particle sits at -origin from the box centre
            imgs = render_particles(projectors, labels[sl], mats[sl], -offsets[sl],
                                    ctf.subset(sl) if ctf else None, o.box, o.pixel_size)
            imgs += rng.normal(0.0, noise_sigma, imgs.shape).astype(np.float32)
            writer.write(imgs)
            prog.update(len(imgs))
        ok = True
    finally:
        writer.close(ok)


def _simulate_micrographs(out, projectors, labels, mats, offsets, ctf, noise_sigma, o, rng):
    """Micrographs with the particles at known positions; the stacks are cut from them.

    Each micrograph has one defocus (its particles share it). Coordinates are
    integer pixels; the true centre is coordinate − origin (pixels).
    """
    n, box, size = len(labels), o.box, o.micrograph_size
    if size < 2 * box:
        raise InputError(None, f"--mic-size {size} must be at least twice the box {box}")
    m = o.n_micrographs
    mic_of = np.sort(np.arange(n) % m)
    # positions on a jittered grid, at least box/2 from the edges
    coords = np.zeros((n, 2))
    for j in range(m):
        idx = np.nonzero(mic_of == j)[0]
        per_side = int(np.ceil(np.sqrt(len(idx))))
        cell = (size - box) / per_side
        cells = rng.permutation(per_side * per_side)[: len(idx)]
        cx = box / 2 + (cells % per_side + 0.5) * cell + rng.uniform(-0.25, 0.25, len(idx)) * cell
        cy = box / 2 + (cells // per_side + 0.5) * cell + rng.uniform(-0.25, 0.25, len(idx)) * cell
        coords[idx] = np.stack([cx, cy], 1)
    coords = np.round(coords)
    if ctf is not None:  # one defocus per micrograph
        first = np.array([np.nonzero(mic_of == j)[0][0] for j in range(m)])
        for f in ("defocus_u", "defocus_v", "defocus_angle"):
            getattr(ctf, f)[:] = getattr(ctf, f)[first][mic_of]
    (out / "Micrographs").mkdir(parents=True, exist_ok=True)
    writer = StackWriter(out / "Particles" / "particles.mrcs", n, box, o.pixel_size)
    ok = False
    names = np.empty(n, dtype=object)
    try:
        for j in range(m):
            idx = np.nonzero(mic_of == j)[0]
            # true centre = coordinate - origin; render each particle at its sub-pixel offset inside a
            # box centred on its integer coordinate
            imgs = render_particles(projectors, labels[idx], mats[idx], -offsets[idx],
                                    ctf.subset(idx) if ctf else None, box, o.pixel_size)
            mic = np.zeros((size, size), dtype=np.float32)
            for k, i in enumerate(idx):
                x0, y0 = int(coords[i, 0]) - box // 2, int(coords[i, 1]) - box // 2
                mic[max(y0, 0): y0 + box, max(x0, 0): x0 + box] += imgs[k][max(-y0, 0): size - y0, max(-x0, 0): size - x0]
            mic = -mic + rng.normal(0.0, noise_sigma, mic.shape).astype(np.float32)  # protein is dark
            name = f"Micrographs/mic{j + 1:03d}.mrc"
            write_map(out / name, mic, o.pixel_size)
            parts = np.empty((len(idx), box, box), dtype=np.float32)
            for k, i in enumerate(idx):
                x0, y0 = int(coords[i, 0]) - box // 2, int(coords[i, 1]) - box // 2
                parts[k] = -mic[y0: y0 + box, x0: x0 + box]  # inverted contrast
            writer.write(parts)
            names[idx] = name
        ok = True
    finally:
        writer.close(ok)
    mics = pd.DataFrame({"rlnMicrographName": [f"Micrographs/mic{j + 1:03d}.mrc" for j in range(m)], "rlnOpticsGroup": 1})
    if ctf is not None:
        first = np.array([np.nonzero(mic_of == j)[0][0] for j in range(m)])
        mics["rlnDefocusU"] = ctf.defocus_u[first]
        mics["rlnDefocusV"] = ctf.defocus_v[first]
        mics["rlnDefocusAngle"] = ctf.defocus_angle[first]
        mics["rlnCtfAstigmatism"] = np.abs(ctf.defocus_u[first] - ctf.defocus_v[first])
        mics["rlnCtfFigureOfMerit"] = 0.1
        mics["rlnCtfMaxResolution"] = 2 * o.pixel_size
    mic_optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
        "rlnMicrographOriginalPixelSize": [o.pixel_size], "rlnVoltage": [o.voltage],
        "rlnSphericalAberration": [o.cs], "rlnAmplitudeContrast": [o.amplitude_contrast],
        "rlnMicrographPixelSize": [o.pixel_size]})
    return coords, names, {"optics": mic_optics, "micrographs": mics}


# ---- command line: ``spa3d simulate`` ----

DESCRIPTION = ("Simulate a particle dataset from maps (MRC) or atomic models (PDB/mmCIF): random poses and offsets, "
               "per-particle CTF, white noise at a given SNR. Writes particles.star, particles_truth.star, "
               "truth_classNNN.mrc and stacks into --o.")


def add_args(p) -> None:
    from spa3d.jobs.args import add_job_output

    p.add_argument("--i", nargs="+", required=True, help="maps (.mrc) or atomic models (.pdb, .cif), one per species")
    add_job_output(p, "output (project) directory")
    p.add_argument("--n", type=int, default=1000, help="number of particles (default 1000)")
    p.add_argument("--fractions", default=None, help="comma-separated fraction of each species (default equal)")
    p.add_argument("--box", type=int, default=64, help="box size in pixels (default 64)")
    p.add_argument("--angpix", type=float, default=2.0, help="pixel size in Å (default 2.0)")
    p.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (variances, default 0.1)")
    p.add_argument("--no-ctf", action="store_true", help="no CTF (default: random defocus per particle)")
    p.add_argument("--defocus-min", type=float, default=10000.0, help="smallest defocus in Å (default 10000)")
    p.add_argument("--defocus-max", type=float, default=30000.0, help="largest defocus in Å (default 30000)")
    p.add_argument("--offset-sigma", type=float, default=2.0, help="std of random origins in pixels (default 2)")
    p.add_argument("--model-resolution", type=float, default=None,
                   help="resolution in Å of the density simulated from atomic models (default 2 pixels)")
    p.add_argument("--micrographs", type=int, default=0,
                   help="also simulate this many micrographs holding the particles (default 0: none)")
    p.add_argument("--mic-size", type=int, default=512, help="micrograph size in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true")


def main(a) -> None:
    from spa3d.jobs.args import start_log

    Path(a.o).mkdir(parents=True, exist_ok=True)
    start_log(a, Path(a.o) / "simulate.log")
    opts = SimulationOptions(
        n_particles=a.n, box=a.box, pixel_size=a.angpix, snr=a.snr,
        fractions=[float(x) for x in a.fractions.split(",")] if a.fractions else None,
        seed=a.seed, ctf=not a.no_ctf, defocus_min=a.defocus_min, defocus_max=a.defocus_max,
        offset_sigma_px=a.offset_sigma, model_resolution=a.model_resolution,
        n_micrographs=a.micrographs, micrograph_size=a.mic_size,
        star_prefix=a.o if getattr(a, "project", None) else "")
    simulate(a.i, a.o, opts)
