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

Realistic data (the options of :class:`SimulationOptions` after
``micrograph_size``): noise coloured with a spectrum measured from a real
micrograph (its radially averaged power, averaged over 512² tiles, in 1/Å,
so any pixel size can use it); junk (random aggregates of Gaussian blobs of
the particle's size) and empty picks (noise only), whose true class in
``particles_truth.star`` is S + 1 and S + 2 for S species; on micrographs,
neighbouring particles reach into each other's boxes when they are dense;
per micrograph (per particle without micrographs) an intensity scale, an
error of the defocus written to particles.star (the truth file has the
true defocus) and an ice thickness that raises the noise and attenuates the
signal. The truth file also holds each particle's true scale
(rlnSpa3dTrueScale) and noise SD (rlnSpa3dNoiseSigma).
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
    # realism (see module docstring): a measured noise spectrum, junk, empty picks, per-micrograph variation
    noise_spectrum: str | None = None  # a real micrograph (MRC) or a text file of (1/Å, power) rows; None: white
    junk_fraction: float = 0.0
    empty_fraction: float = 0.0
    scale_sd: float = 0.0  # per-micrograph (or per-particle without micrographs) intensity scale, log-normal SD
    defocus_error: float = 0.0  # Å, SD of the error of the defocus written to the STAR file (the truth keeps it)
    ice_sd: float = 0.0  # relative SD of the ice thickness: noise variance ∝ thickness, signal × exp(−(t − 1)/2)
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


@dataclass
class NoiseSpectrum:
    """Radially averaged noise power against spatial frequency (1/Å), normalised to mean 1 over its range."""

    freq: np.ndarray  # 1/Å, increasing
    power: np.ndarray

    def filter(self, shape: tuple[int, int], pixel_size: float) -> np.ndarray:
        """Amplitude filter (shape[0], shape[1]//2+1) for white noise of an image at ``pixel_size`` Å: the
        square root of the power at each frequency (the last measured value beyond), scaled so that the
        noise's variance is kept."""
        fy = np.fft.fftfreq(shape[0])[:, None] / pixel_size
        fx = np.fft.rfftfreq(shape[1])[None, :] / pixel_size
        f = np.sqrt(fx**2 + fy**2)
        pw = np.interp(f, self.freq, self.power)
        # the variance of real noise is the mean power over the full plane: the half plane's columns, weighted
        w = np.full(pw.shape, 2.0)
        w[:, 0] = 1.0
        if shape[1] % 2 == 0:
            w[:, -1] = 1.0
        return np.sqrt(pw / ((pw * w).sum() / w.sum())).astype(np.float32)


def measure_noise_spectrum(path: str | Path, tile: int = 512) -> NoiseSpectrum:
    """The noise spectrum of a real micrograph (MRC), or read from a text file of (1/Å, power) rows.

    A micrograph's power is averaged over non-overlapping tiles (each less its
    mean, Hann-windowed) and over rings; the pixel size comes from its header.
    """
    p = Path(path)
    if p.suffix.lower() not in (".mrc", ".mrcs", ".map"):
        try:
            rows = np.loadtxt(p, ndmin=2)
        except ValueError as e:
            raise InputError(p, f"not a noise spectrum (two columns: 1/Å, power): {e}") from None
        if rows.shape[1] < 2 or len(rows) < 2 or (rows[:, 1] < 0).any():
            raise InputError(p, "a noise spectrum needs two columns (1/Å, power ≥ 0) and at least two rows")
        order = np.argsort(rows[:, 0])
        freq, power = rows[order, 0], rows[order, 1]
    else:
        img, apix = read_map(p)
        img = np.asarray(img, dtype=np.float64)
        if img.ndim == 3:
            img = img[0]
        if apix <= 0:
            raise InputError(p, "the micrograph's header has no pixel size")
        t = min(tile, img.shape[0], img.shape[1])
        if t < 32:
            raise InputError(p, f"micrograph of {img.shape[1]}x{img.shape[0]} pixels is too small for a spectrum")
        win = np.outer(np.hanning(t), np.hanning(t))
        acc = np.zeros((t, t // 2 + 1))
        count = 0
        for y in range(0, img.shape[0] - t + 1, t):
            for x in range(0, img.shape[1] - t + 1, t):
                a = img[y:y + t, x:x + t]
                acc += np.abs(np.fft.rfft2((a - a.mean()) * win)) ** 2
                count += 1
        acc /= count
        fy = np.fft.fftfreq(t)[:, None]
        fx = np.fft.rfftfreq(t)[None, :]
        ring = np.round(np.sqrt(fx**2 + fy**2) * t).astype(int)
        nr = t // 2 + 1
        keep = ring < nr
        power = np.bincount(ring[keep], acc[keep], nr) / np.maximum(np.bincount(ring[keep], minlength=nr), 1)
        freq = np.arange(nr) / (t * apix)
        power[0] = power[1]  # the mean was removed: the DC ring holds no noise information
    if not np.all(np.isfinite(power)) or power.max() <= 0:
        raise InputError(p, "the noise spectrum has no positive power")
    return NoiseSpectrum(freq, power / power.mean())


def make_noise(shape: tuple[int, ...], sigma, spectrum: NoiseSpectrum | None, pixel_size: float,
               rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise images (..., ny, nx) of SD ``sigma`` (scalar or per image), white or with ``spectrum``."""
    white = rng.normal(0.0, 1.0, shape).astype(np.float32)
    if spectrum is not None:
        filt = torch.as_tensor(spectrum.filter(shape[-2:], pixel_size))
        white = torch.fft.irfftn(torch.fft.rfftn(torch.as_tensor(white), dim=(-2, -1)) * filt, s=shape[-2:],
                                 dim=(-2, -1)).numpy()
    sig = np.asarray(sigma, dtype=np.float32)
    return white * (sig.reshape(sig.shape + (1, 1)) if sig.ndim else sig)


def junk_maps(n_maps: int, box: int, pixel_size: float, diameter: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Random aggregates: each a map of 10–40 Gaussian blobs (radius 3–8 Å) inside a sphere of ``diameter`` Å."""
    c = (np.arange(box) - box // 2) * pixel_size
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    out = []
    for _ in range(n_maps):
        vol = np.zeros((box, box, box), dtype=np.float32)
        for _ in range(int(rng.integers(10, 41))):
            d = rng.normal(size=3)
            centre = d / np.linalg.norm(d) * rng.uniform(0, diameter / 2 - 8) ** 1.0
            r = rng.uniform(3.0, 8.0)
            vol += np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * r * r))
        out.append(vol)
    return out


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
    out = np.zeros((len(labels), box, box), dtype=np.float32)  # labels that match no projector: empty
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
    for name in ("junk_fraction", "empty_fraction", "scale_sd", "defocus_error", "ice_sd"):
        if getattr(o, name) < 0:
            raise InputError(None, f"--{name.replace('_', '-')} must not be negative")
    spectrum = measure_noise_spectrum(o.noise_spectrum) if o.noise_spectrum else None
    maps = load_species(inputs, o.box, o.pixel_size, o.model_resolution)
    n_species = len(maps)
    rng = np.random.default_rng(o.seed)
    torch.manual_seed(o.seed)
    n = o.n_particles
    n_junk, n_empty = int(round(o.junk_fraction * n)), int(round(o.empty_fraction * n))
    if n_junk + n_empty >= n:
        raise InputError(None, "--junk-fraction and --empty-fraction leave no particles")
    # true class - 1 of every pick: a species, junk (n_species) or empty (n_species + 1)
    kind = np.concatenate([rng.choice(n_species, size=n - n_junk - n_empty, p=fr),
                           np.full(n_junk, n_species), np.full(n_empty, n_species + 1)])
    if n_junk + n_empty:
        kind = rng.permutation(kind)
    labels = kind.copy()  # what is rendered: a projector index, -1 for nothing
    if n_junk:
        maps = maps + junk_maps(4, o.box, o.pixel_size, 0.6 * o.box * o.pixel_size, rng)
        labels[kind == n_species] = n_species + rng.integers(0, 4, n_junk)
    labels[kind == n_species + 1] = -1
    mats = random_rotations(n, rng)
    rot, tilt, psi = matrix_to_euler(mats)
    mats = euler_to_matrix(rot, tilt, psi)  # exactly what the STAR file will say
    offsets = rng.normal(0.0, o.offset_sigma_px, (n, 2)) if o.offset_sigma_px > 0 else np.zeros((n, 2))
    ctf = _random_ctf(n, o, rng) if o.ctf else None
    projectors = [Projector(m) for m in maps]

    out.mkdir(parents=True, exist_ok=True)
    for k, m in enumerate(maps[:n_species]):
        write_map(out / f"truth_class{k + 1:03d}.mrc", m, o.pixel_size)

    # signal variance from a sample of the species' particles, to set the noise level
    real = np.nonzero(kind < n_species)[0]
    sample = rng.choice(real, size=min(len(real), 200), replace=False)
    clean = render_particles(projectors, labels[sample], mats[sample], -offsets[sample],
                             ctf.subset(sample) if ctf else None, o.box, o.pixel_size)
    signal_var = float(clean.var(axis=(1, 2)).mean())
    noise_sigma = float(np.sqrt(signal_var / o.snr))
    # per micrograph (per particle without micrographs): intensity scale, ice thickness, defocus error
    unit = np.sort(np.arange(n) % o.n_micrographs) if o.n_micrographs > 0 else np.arange(n)
    n_units = int(unit.max()) + 1
    thick = np.clip(1.0 + rng.normal(0.0, o.ice_sd, n_units), 0.2, None) if o.ice_sd > 0 else np.ones(n_units)
    scale = np.exp(rng.normal(0.0, o.scale_sd, n_units)) if o.scale_sd > 0 else np.ones(n_units)
    amp = (scale * np.exp(-(thick - 1.0) / 2))[unit]
    noise_sd = (noise_sigma * np.sqrt(thick))[unit]
    dz_err = rng.normal(0.0, o.defocus_error, n_units)[unit] if o.defocus_error > 0 else np.zeros(n)
    realism = (amp, noise_sd, spectrum)

    df = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@Particles/particles.mrcs" for i in range(n)]})
    if o.n_micrographs > 0:
        coords, mic_names, mic_table = _simulate_micrographs(out, projectors, labels, mats, offsets, ctf, realism, o,
                                                             rng)
        df["rlnMicrographName"] = mic_names
        df["rlnCoordinateX"] = coords[:, 0]
        df["rlnCoordinateY"] = coords[:, 1]
    else:
        mic_table = None
        df["rlnMicrographName"] = "Micrographs/none.mrc"
        _write_particle_stack(out, projectors, labels, mats, offsets, ctf, realism, o, rng)
    if ctf is not None:
        # the defocus as a CTF estimate would give it: the truth plus the estimation error
        df["rlnDefocusU"], df["rlnDefocusV"] = ctf.defocus_u + dz_err, ctf.defocus_v + dz_err
        df["rlnDefocusAngle"] = ctf.defocus_angle
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
    truth["rlnClassNumber"] = kind + 1
    if ctf is not None:
        truth["rlnDefocusU"], truth["rlnDefocusV"] = ctf.defocus_u, ctf.defocus_v
    truth["rlnSpa3dTrueScale"] = amp
    truth["rlnSpa3dNoiseSigma"] = noise_sd
    write_star(out / "particles_truth.star", {"optics": optics, "particles": truth})
    if mic_table is not None:
        write_star(out / "micrographs_ctf.star", mic_table)
    counts = np.bincount(kind, minlength=n_species)[:n_species]
    extra = (f", {n_junk} junk" if n_junk else "") + (f", {n_empty} empty" if n_empty else "")
    log.info(f"simulated {n} particles ({', '.join(str(c) for c in counts)} per species{extra}), box {o.box}, "
             f"{o.pixel_size} Å/px, SNR {o.snr}, noise sigma {noise_sigma:.4g}"
             + (f", noise spectrum of {o.noise_spectrum}" if spectrum is not None else ""))
    return {"n": n, "counts": counts.tolist(), "noise_sigma": noise_sigma, "signal_var": signal_var,
            "n_junk": n_junk, "n_empty": n_empty}


def _write_particle_stack(out, projectors, labels, mats, offsets, ctf, realism, o, rng):
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
            amp, noise_sd, spectrum = realism
            imgs *= amp[sl, None, None].astype(np.float32)
            imgs += make_noise(imgs.shape, noise_sd[sl], spectrum, o.pixel_size, rng)
            writer.write(imgs)
            prog.update(len(imgs))
        ok = True
    finally:
        writer.close(ok)


def _simulate_micrographs(out, projectors, labels, mats, offsets, ctf, realism, o, rng):
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
            amp, noise_sd, spectrum = realism
            imgs *= amp[idx, None, None].astype(np.float32)
            mic = np.zeros((size, size), dtype=np.float32)
            for k, i in enumerate(idx):
                x0, y0 = int(coords[i, 0]) - box // 2, int(coords[i, 1]) - box // 2
                mic[max(y0, 0): y0 + box, max(x0, 0): x0 + box] += imgs[k][max(-y0, 0): size - y0, max(-x0, 0): size - x0]
            mic = -mic + make_noise(mic.shape, noise_sd[idx[0]], spectrum, o.pixel_size, rng)  # protein is dark
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
    p.add_argument("--noise-spectrum", default=None,
                   help="colour the noise with the power spectrum of a real micrograph (MRC), or of a text file of "
                        "(1/Å, power) rows (default: white noise)")
    p.add_argument("--junk-fraction", type=float, default=0.0,
                   help="fraction of picks that are junk: random aggregates, true class S+1 (default 0)")
    p.add_argument("--empty-fraction", type=float, default=0.0,
                   help="fraction of picks with no particle, true class S+2 (default 0)")
    p.add_argument("--scale-sd", type=float, default=0.0,
                   help="log-normal SD of an intensity scale per micrograph (per particle without micrographs)")
    p.add_argument("--defocus-error", type=float, default=0.0,
                   help="SD in Å of the error of the defocus written to particles.star, per micrograph (default 0)")
    p.add_argument("--ice-sd", type=float, default=0.0,
                   help="relative SD of the ice thickness per micrograph: more noise, weaker signal (default 0)")
    p.add_argument("--realistic", action="store_true",
                   help="shorthand for --junk-fraction 0.1 --empty-fraction 0.05 --scale-sd 0.1 --defocus-error 200 "
                        "--ice-sd 0.15 (values given explicitly win); add --noise-spectrum for coloured noise")
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
        star_prefix=a.o if getattr(a, "project", None) else "", noise_spectrum=a.noise_spectrum,
        **realism_options(a))
    simulate(a.i, a.o, opts)


REALISTIC = {"junk_fraction": 0.1, "empty_fraction": 0.05, "scale_sd": 0.1, "defocus_error": 200.0, "ice_sd": 0.15}


def realism_options(a) -> dict:
    """The realism options given on the command line, with --realistic's values for those not given."""
    given = {k: getattr(a, k) for k in REALISTIC}
    if a.realistic:
        return {k: (v if v else REALISTIC[k]) for k, v in given.items()}
    return given
