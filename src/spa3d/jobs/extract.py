"""``spa3d extract``: re-extract particles from their micrographs (RELION's Extract job, re-extraction).

What RELION 3.1.3's ``relion_preprocess --reextract_data_star`` does, and so
what this does (read from its source and checked against it in the tests):

Coordinates and origins (all in the micrograph's pixels unless said):

- default: the box is cut at the stored rlnCoordinateX/Y; rlnCoordinateX/Y
  and rlnOriginX/YAngst stay as they are (origins are in Å, so they stay
  valid at the new pixel size);
- ``--reset-offsets``: rlnOriginX/YAngst are set to 0;
- ``--recenter``: the refined shift moves into the coordinates. With the
  origin o = rlnOriginXAngst / particle pixel size (particle pixels), and
  optionally a reference point c (``--recenter-x/y/z``, pixels of the
  reference) projected into the particle, o ← o − (A·c)_xy; then
  o is converted to micrograph pixels, the coordinate becomes
  coordinate − round(o) and the origin keeps the remainder
  (o − round(o)) × micrograph pixel size, in Å.

The box: x0 = int(rlnCoordinateX) − box/2 (int truncates, as RELION's cast
does), the same for y. Pixels beyond the micrograph take the value of the
nearest edge pixel; a box wholly outside the micrograph is an error. Particles
whose box crosses an edge are kept and counted.

Per image, in RELION's order: Fourier rescaling to ``--rescale`` pixels
(cropping the transform; the mean is kept), then normalisation (dust removal
when asked, a least-squares plane fitted to the background and subtracted,
then (x − mean) / SD of the background, the background being the pixels
farther than R from the box centre), then contrast inversion.
R = int(bg_diameter / 2 × rescale / box) in pixels of the rescaled box, where
``--bg-diameter`` is the GUI's "diameter background circle" in pixels before
rescaling (default 75 % of the box).

Outputs: one stack per micrograph, ``OUT/<micrograph path after its job
directory>.mrcs`` (e.g. Extract/job020/Micrographs/mic001.mrcs), and
``OUT/particles.star`` with the particles in micrograph order, every input
column kept, rlnImageName and rlnMicrographName updated, and the optics
table's rlnImagePixelSize (micrograph pixel size × box / rescale) and
rlnImageSize (rescale) set. Particles whose micrograph is not in the
micrograph STAR file are left out with a warning (RELION does the same).
Nothing is written until every input has been checked; a failure part-way
removes the stacks this run wrote.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.fft

from spa3d.errors import InputError
from spa3d.geometry.euler import euler_to_matrix
from spa3d.io.mrc import read_header, read_images, write_stack
from spa3d.io.star import ParticleTable, read_particles_star, read_star
from spa3d.jobs.progress import Progress

log = logging.getLogger("spa3d")


@dataclass
class ExtractOptions:
    """Re-extraction options. box, rescale: pixels; bg_diameter: pixels before rescaling (−1: 75 % of box);
    white/black_dust: SDs (−1: off); recenter_xyz: pixels of the reference; angpix: micrograph pixel size in Å
    (None: from the micrograph STAR file)."""

    box: int = 360
    rescale: int | None = None
    invert: bool = False
    norm: bool = False
    bg_diameter: float = -1.0
    white_dust: float = -1.0
    black_dust: float = -1.0
    ramp: bool = True
    reset_offsets: bool = False
    recenter: bool = False
    recenter_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ref_angpix: float = -1.0
    angpix: float | None = None
    seed: int = 0
    threads: int | None = None  # micrographs processed at once (default: all cores)


def _after_job_dir(name: str) -> str:
    """RELION's decomposePipelineFileName: the part of a path after ``.../jobNNN/`` (the whole path if none)."""
    m = re.search(r"job\d\d\d/", name)
    return name[m.end():] if m else name


def _check_options(o: ExtractOptions) -> None:
    if o.box < 2 or o.box % 2:
        raise InputError(None, f"--box {o.box}: the box must be an even number of pixels")
    if o.rescale is not None:
        if o.rescale < 2 or o.rescale % 2:
            raise InputError(None, f"--rescale {o.rescale}: the rescaled box must be an even number of pixels")
        if o.rescale > o.box:
            raise InputError(None, f"--rescale {o.rescale} is larger than --box {o.box} (only down-scaling is supported)")
    if o.reset_offsets and o.recenter:
        raise InputError(None, "--reset-offsets and --recenter exclude each other (as in RELION)")


def bg_radius_px(o: ExtractOptions) -> int:
    """RELION GUI's background radius in pixels of the output box."""
    out = o.rescale or o.box
    diameter = 0.75 * o.box if o.bg_diameter is None or o.bg_diameter < 0 else o.bg_diameter
    return int(diameter / 2 * out / o.box)


def new_positions(p: pd.DataFrame, particle_apix: np.ndarray, mic_apix: np.ndarray, o: ExtractOptions):
    """(coord_x, coord_y, origin_x_A, origin_y_A) after RELION's reset / recenter rules (see module docstring)."""
    cx = p["rlnCoordinateX"].astype(float).to_numpy().copy()
    cy = p["rlnCoordinateY"].astype(float).to_numpy().copy()
    has_origin = "rlnOriginXAngst" in p and "rlnOriginYAngst" in p
    ox = p["rlnOriginXAngst"].astype(float).to_numpy().copy() if has_origin else np.zeros(len(p))
    oy = p["rlnOriginYAngst"].astype(float).to_numpy().copy() if has_origin else np.zeros(len(p))
    if o.reset_offsets:
        return cx, cy, np.zeros(len(p)), np.zeros(len(p))
    rescale = particle_apix / mic_apix
    if not (o.recenter or np.any(np.abs(rescale - 1) > 1e-6)):
        return cx, cy, ox, oy
    if o.recenter and not has_origin:
        raise InputError(None, "--recenter needs rlnOriginXAngst/YAngst in the particle STAR file")
    x, y = ox / particle_apix, oy / particle_apix  # particle pixels
    if o.recenter and any(abs(v) > 0 for v in o.recenter_xyz):
        c = np.asarray(o.recenter_xyz, dtype=float)
        if o.ref_angpix > 0:
            c = c[None, :] * (o.ref_angpix / particle_apix)[:, None]
        else:
            c = np.broadcast_to(c, (len(p), 3))
        a = euler_to_matrix(*(p[f"rlnAngle{n}"].astype(float).to_numpy() for n in ("Rot", "Tilt", "Psi")))
        proj = np.einsum("nij,nj->ni", a, c)
        x, y = x - proj[:, 0], y - proj[:, 1]
    x, y = x * rescale, y * rescale  # micrograph pixels
    if o.recenter:
        # RELION's ROUND: half away from zero
        rx, ry = np.sign(x) * np.floor(np.abs(x) + 0.5), np.sign(y) * np.floor(np.abs(y) + 0.5)
        cx, cy = cx - rx, cy - ry
        x, y = x - rx, y - ry
    return cx, cy, x * mic_apix, y * mic_apix


def cut_boxes(mic: np.ndarray, cx: np.ndarray, cy: np.ndarray, box: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (B, box, box) centred on int(cx), int(cy); pixels beyond the edge repeat the edge. Also: crosses-edge flags."""
    ny, nx = mic.shape
    xpos, ypos = np.trunc(cx).astype(np.int64), np.trunc(cy).astype(np.int64)
    x0, y0 = xpos - box // 2, ypos - box // 2
    crosses = (x0 < 0) | (x0 + box > nx) | (y0 < 0) | (y0 + box > ny)
    out = np.empty((len(xpos), box, box), dtype=mic.dtype)
    for i in np.flatnonzero(~crosses):  # inside: plain slices
        out[i] = mic[y0[i]:y0[i] + box, x0[i]:x0[i] + box]
    if crosses.any():
        off = np.arange(box)
        xs = np.clip(x0[crosses, None] + off[None, :], 0, nx - 1)
        ys = np.clip(y0[crosses, None] + off[None, :], 0, ny - 1)
        out[crosses] = mic[ys[:, :, None], xs[:, None, :]]
    return out, crosses


def fourier_rescale(images: np.ndarray, size: int, workers: int = 1, chunk: int = 8) -> np.ndarray:
    """Crop the 2D Fourier transform of (B, n, n) images to ``size`` (keeps the mean; RELION's resizeMap).

    Transforms in single precision (RELION uses double; the images then differ from RELION's by about 1e-6
    of their SD, and the transforms take half the time); returns float32. ``workers``: threads of the
    transforms (extraction runs one micrograph per thread, so 1 there); ``chunk``: images transformed at once.
    """
    n = images.shape[-1]
    if size == n:
        return images.astype(np.float32, copy=False)
    h = size // 2
    rows = np.r_[0:h + 1, n - h + 1:n]  # frequencies 0 .. size/2 and −(size/2 − 1) .. −1, as RELION's window
    out = np.empty((len(images), size, size), np.float32)
    for i in range(0, len(images), chunk):  # a few images at a time stay in cache: 1.6× faster than all at once
        # the transform along x, then along y for the kept columns only
        ft = scipy.fft.rfft(images[i:i + chunk].astype(np.float32, copy=False), axis=-1, workers=workers)
        ft = scipy.fft.fft(ft[..., : h + 1], axis=-2, workers=workers, overwrite_x=True)
        out[i:i + chunk] = scipy.fft.irfft2(ft[:, rows], s=(size, size), workers=workers, overwrite_x=True)
    out *= np.float32((size * size) / (n * n))
    return out


@functools.lru_cache(maxsize=8)
def _background(n: int, bg_radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For a box of n pixels: the background pixels' flat indices (farther than bg_radius from the centre), the
    plane basis (x, y, 1) at the background pixels (3, N_bg; x, y from the box centre), its pseudo-inverse
    (N_bg, 3; for least-squares plane fits) and the basis at every pixel in single precision (3, n²)."""
    c = np.arange(n) - n // 2
    jj, ii = np.meshgrid(c, c)
    bgi = np.flatnonzero((ii ** 2 + jj ** 2) > bg_radius ** 2)
    basis = np.stack([jj.ravel(), ii.ravel(), np.ones(n * n)]).astype(np.float64)
    bg = basis[:, bgi]
    gram = bg @ bg.T  # integers: exact
    return bgi, bg, bg.T @ np.linalg.inv(gram), basis.astype(np.float32)


def normalise(images: np.ndarray, bg_radius: int, ramp: bool = True, white_dust: float = -1.0,
              black_dust: float = -1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """RELION's normalise: dust removal, background plane subtraction, (x − mean) / SD of the background.

    The plane is the least-squares fit a·x + b·y + c to the background pixels (x, y from the box centre),
    for all images at once from the normal equations. The background statistics and the plane
    are computed in double precision, the plane and the scale applied in single; returns float32.
    """
    n = images.shape[-1]
    if 2 * bg_radius > n:
        raise InputError(None, f"background diameter {2 * bg_radius} px is larger than the box {n}")
    b = images.shape[0]
    bgi, bg_basis, pinv, basis32 = _background(n, bg_radius)
    x = images.reshape(b, -1)
    if white_dust > 0 or black_dust > 0:
        rng = rng or np.random.default_rng(0)
        x = x.astype(np.float64)
        bg = x[:, bgi]
        sd, avg = bg.std(axis=1), bg.mean(axis=1)
        for thresh, sign in ((white_dust, 1.0), (black_dust, -1.0)):
            if thresh > 0:
                hit = sign * (x - avg[:, None]) > thresh * sd[:, None]
                noise = rng.normal(0, 1, x.shape) * sd[:, None] + avg[:, None]
                x = np.where(hit, noise, x)
    vals = x[:, bgi].astype(np.float64)  # (B, N_bg)
    if ramp:
        coef = vals @ pinv  # (B, 3): least squares
        vals -= coef @ bg_basis
    else:
        coef = np.zeros((b, 3))
    sd, avg = vals.std(axis=1), vals.mean(axis=1)
    good = sd >= 1e-10
    if not good.all():
        log.warning(f"{int((~good).sum())} image(s) with a flat background were not normalised")
    coef[:, 2] += np.where(good, avg, 0.0)  # the plane and the mean together: x − offset
    scale = np.where(good, 1.0 / np.where(good, sd, 1.0), 1.0)
    # (x − plane) · scale in single precision, as x · scale − plane · scale
    out = np.array(x, dtype=np.float32)
    out *= scale.astype(np.float32)[:, None]
    out -= (coef * scale[:, None]).astype(np.float32) @ basis32
    return out.reshape(images.shape)


def _micrograph_table(path: Path, o: ExtractOptions):
    blocks = read_star(path)
    mics = blocks.get("micrographs")
    if mics is None:
        # RELION 3.0 single table
        mics = next(iter(blocks.values()))
    if "rlnMicrographName" not in mics:
        raise InputError(path, "no rlnMicrographName column (is this a micrographs STAR file?)")
    mics = mics.reset_index(drop=True)
    optics = blocks.get("optics")
    if o.angpix is not None:
        apix = np.full(len(mics), float(o.angpix))
    elif optics is not None and "rlnMicrographPixelSize" in optics:
        lookup = dict(zip(optics["rlnOpticsGroup"].astype(int), optics["rlnMicrographPixelSize"].astype(float)))
        groups = mics["rlnOpticsGroup"].astype(int) if "rlnOpticsGroup" in mics else pd.Series(np.ones(len(mics), int))
        try:
            apix = np.array([lookup[g] for g in groups])
        except KeyError as exc:
            raise InputError(path, f"optics group {exc.args[0]} is not in data_optics") from None
    else:
        raise InputError(path, "no rlnMicrographPixelSize in data_optics; give --angpix")
    return mics, apix


def run_extract(mics_star: str | Path, particles_star: str | Path, out_dir: str | Path, o: ExtractOptions) -> dict:
    """Re-extract the particles of ``particles_star`` from the micrographs of ``mics_star`` into ``out_dir``."""
    _check_options(o)
    mics_star, out = Path(mics_star), Path(out_dir)
    mics, mic_apix = _micrograph_table(mics_star, o)
    table = read_particles_star(particles_star)
    p = table.particles
    for col in ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"):
        if col not in p:
            raise InputError(particles_star, f"missing column {col} (needed to re-extract)")
    if o.recenter and any(abs(v) > 0 for v in o.recenter_xyz):
        for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
            if col not in p:
                raise InputError(particles_star, f"missing column {col} (needed for --recenter-x/y/z)")
    out_size = o.rescale or o.box
    bg_r = bg_radius_px(o)
    if o.norm and (bg_r < 1 or 2 * bg_r > out_size):
        raise InputError(None, f"--bg-diameter gives a background radius of {bg_r} px in a {out_size} px box")

    # match particles to micrographs: exact name, else the part after the job directory (RELION's rule)
    mic_names = mics["rlnMicrographName"].astype(str).tolist()
    exact = {n: k for k, n in enumerate(mic_names)}
    post = {_after_job_dir(n): k for k, n in enumerate(mic_names)}
    mic_of = np.array([exact.get(n, post.get(_after_job_dir(n), -1)) for n in p["rlnMicrographName"].astype(str)])
    missing = mic_of < 0
    if missing.all():
        raise InputError(particles_star, f"none of its micrographs is in {mics_star}")
    if missing.any():
        names = sorted(set(p.loc[missing, "rlnMicrographName"].astype(str)))
        log.warning(f"warning: {int(missing.sum())} particle(s) on {len(names)} micrograph(s) not in {mics_star} "
                    f"are left out (e.g. {names[0]})")

    particle_apix = table.per_particle("rlnImagePixelSize").astype(float)
    pm_apix = np.where(mic_of >= 0, mic_apix[np.maximum(mic_of, 0)], np.nan)
    cx, cy, ox, oy = new_positions(p, particle_apix, np.where(missing, 1.0, pm_apix), o)

    # check every micrograph before writing anything
    used = [k for k in range(len(mics)) if (mic_of == k).any()]
    headers = {}
    for k in used:
        path = Path(mic_names[k])
        if not path.exists() and not path.is_absolute() and (mics_star.parent / path).exists():
            path = mics_star.parent / path  # STAR file used from outside its project directory
        if not path.exists():
            raise InputError(path, f"micrograph not found (named in {mics_star})")
        h = read_header(path)
        if len(h.shape) != 3 or h.shape[0] != 1:
            raise InputError(path, f"expected one 2D micrograph, found {h.shape[0]} sections")
        ny, nx = h.shape[1:]
        if o.box > min(nx, ny):
            raise InputError(path, f"--box {o.box} is larger than the micrograph ({nx}x{ny})")
        idx = np.nonzero(mic_of == k)[0]
        xpos, ypos = np.trunc(cx[idx]), np.trunc(cy[idx])
        outside = (xpos + o.box // 2 - 1 < 0) | (xpos - o.box // 2 >= nx) | (ypos + o.box // 2 - 1 < 0) | (ypos - o.box // 2 >= ny)
        if outside.any():
            i = idx[np.nonzero(outside)[0][0]]
            raise InputError(path, f"particle {i + 1} at ({cx[i]:.0f}, {cy[i]:.0f}) lies wholly outside the micrograph")
        headers[k] = h

    out_apix = mic_apix * o.box / out_size
    order, image_names, written = [], [], []
    n_edge = 0
    prog = Progress(int((~missing).sum()), label="extract: ")

    def extract_micrograph(j, k):
        """Read micrograph k, cut, rescale, normalise and invert its boxes, write its stack (one thread each)."""
        mic = read_images(headers[k], np.array([0]))[0].astype(np.float32, copy=False)
        if not np.isfinite(mic).all():
            raise InputError(mic_names[k], "micrograph contains NaN or infinite values")
        idx = np.nonzero(mic_of == k)[0]
        imgs = np.empty((len(idx), out_size, out_size), np.float32)
        crosses = np.zeros(len(idx), bool)
        for c in range(0, len(idx), 8):  # cut and rescale 8 boxes at a time: they stay in cache
            boxes, crosses[c:c + 8] = cut_boxes(mic, cx[idx[c:c + 8]], cy[idx[c:c + 8]], o.box)
            imgs[c:c + 8] = fourier_rescale(boxes, out_size)
        del mic
        if o.norm:  # dust noise drawn from the micrograph's own stream: the same whatever the thread order
            imgs = normalise(imgs, bg_r, o.ramp, o.white_dust, o.black_dust, np.random.default_rng([o.seed, j]))
        if o.invert:
            np.negative(imgs, out=imgs)
        stack = out / Path(_after_job_dir(mic_names[k])).with_suffix(".mrcs")
        write_stack(stack, imgs, out_apix[k])
        written.append(stack)  # a failure anywhere removes every stack written (after all threads stop)
        return idx, stack, int(crosses.sum())

    # one micrograph per thread (the transforms and array operations release the GIL), two in flight per thread
    threads = o.threads or max(1, len(os.sched_getaffinity(0)))
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        pending = {}
        for j in range(len(used)):
            while len(pending) < 2 * threads and j + len(pending) < len(used):
                m = j + len(pending)
                pending[m] = pool.submit(extract_micrograph, m, used[m])
            idx, stack, crossing = pending.pop(j).result()
            n_edge += crossing
            order.extend(idx.tolist())
            image_names.extend(f"{i + 1:06d}@{stack.as_posix()}" for i in range(len(idx)))
            prog.update(len(idx))
        order = np.asarray(order)
        res = p.iloc[order].copy().reset_index(drop=True)
        res["rlnImageName"] = image_names
        res["rlnMicrographName"] = [mic_names[k] for k in mic_of[order]]
        res["rlnCoordinateX"], res["rlnCoordinateY"] = cx[order], cy[order]
        if "rlnOriginXAngst" in p or o.reset_offsets or o.recenter:
            res["rlnOriginXAngst"], res["rlnOriginYAngst"] = ox[order], oy[order]
        optics = table.optics.copy()
        for g in optics["rlnOpticsGroup"].astype(int):
            members = order[p["rlnOpticsGroup"].astype(int).to_numpy()[order] == g]
            if len(members):
                sel = optics["rlnOpticsGroup"].astype(int) == g
                optics.loc[sel, "rlnImagePixelSize"] = float(out_apix[mic_of[members[0]]])
                optics.loc[sel, "rlnImageSize"] = out_size
                optics.loc[sel, "rlnImageDimensionality"] = 2
        ParticleTable(optics, res).write(out / "particles.star")
        pool.shutdown()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for f in list(written):
            f.unlink(missing_ok=True)
        raise
    summary = {"n": len(order), "n_left_out": int(missing.sum()), "n_crossing_edge": n_edge,
               "pixel_size": float(out_apix[used[0]]), "box": out_size}
    log.info(f"extracted {len(order)} particles from {len(used)} micrographs into {out}: box {o.box} px"
             + (f" rescaled to {out_size} px" if out_size != o.box else "")
             + f", {summary['pixel_size']:.4f} Å/px; {n_edge} box(es) crossed a micrograph edge (edge pixels repeated)"
             + (f"; {summary['n_left_out']} left out (micrograph not listed)" if summary["n_left_out"] else ""))
    return summary


# ---- command line: ``spa3d extract`` ----

DESCRIPTION = ("Cut the particles of a STAR file again from their micrographs, in a new box, optionally rescaled, "
               "normalised and contrast-inverted; writes one stack per micrograph and EXTDIR/particles.star with the "
               "new optics.")


def add_args(p) -> None:
    from spa3d.jobs.args import add_job_output

    p.add_argument("--mics", required=True, help="micrographs STAR file (micrographs_ctf.star)")
    p.add_argument("--reextract", required=True,
                   help="particle STAR file to re-extract (e.g. Select/job019/particles.star)")
    add_job_output(p, "job directory")
    p.add_argument("--box", type=int, default=360, help="box size in pixels of the micrograph (even; default 360)")
    p.add_argument("--rescale", type=int, default=None, help="rescale the box to this many pixels (even; default: no)")
    p.add_argument("--invert", action="store_true", help="invert contrast (dark protein becomes white)")
    p.add_argument("--norm", action="store_true", help="normalise with the background outside the circle")
    p.add_argument("--bg-diameter", type=float, default=-1.0,
                   help="diameter of the background circle in pixels before rescaling (default 75%% of the box)")
    p.add_argument("--no-ramp", action="store_true", help="subtract only the background mean, not a fitted plane")
    p.add_argument("--white-dust", type=float, default=-1.0, help="remove white dust above S SDs (-1: off)")
    p.add_argument("--black-dust", type=float, default=-1.0, help="remove black dust below S SDs (-1: off)")
    p.add_argument("--reset-offsets", action="store_true", help="set rlnOriginX/YAngst to zero")
    p.add_argument("--recenter", action="store_true", help="move the refined offsets into the coordinates")
    p.add_argument("--recenter-x", type=float, default=0.0, help="re-centre on this x (pixels of the reference)")
    p.add_argument("--recenter-y", type=float, default=0.0, help="re-centre on this y (pixels of the reference)")
    p.add_argument("--recenter-z", type=float, default=0.0, help="re-centre on this z (pixels of the reference)")
    p.add_argument("--ref-angpix", type=float, default=-1.0,
                   help="pixel size of the reference for --recenter-x/y/z in Å (default: the particles')")
    p.add_argument("--angpix", type=float, default=None,
                   help="micrograph pixel size in Å (default: rlnMicrographPixelSize of the micrograph STAR file)")
    p.add_argument("--seed", type=int, default=0, help="random seed of dust replacement (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="micrographs processed at once, one per thread (default: all cores)")
    p.add_argument("--quiet", action="store_true")


def main(a) -> None:
    from spa3d.jobs.args import start_log

    o = ExtractOptions(box=a.box, rescale=a.rescale, invert=a.invert, norm=a.norm, bg_diameter=a.bg_diameter,
                       white_dust=a.white_dust, black_dust=a.black_dust, ramp=not a.no_ramp,
                       reset_offsets=a.reset_offsets, recenter=a.recenter,
                       recenter_xyz=(a.recenter_x, a.recenter_y, a.recenter_z), ref_angpix=a.ref_angpix,
                       angpix=a.angpix, seed=a.seed, threads=a.threads)
    _check_options(o)  # before creating the job directory
    Path(a.o).mkdir(parents=True, exist_ok=True)
    start_log(a, Path(a.o) / "run.log")
    run_extract(a.mics, a.reextract, a.o, o)
