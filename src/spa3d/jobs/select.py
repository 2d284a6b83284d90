"""``spa3d select``: keep the particles of chosen 3D classes (RELION's Select job).

Input is a classification's ``run_itNNN_model.star``; the particles come from
the matching ``run_itNNN_data.star`` (same directory, same iteration). The
output ``particles.star`` holds the selected particles with every column kept
and the optics table unchanged.

Classes are chosen by number (``--classes 3,4``) or ranked (``--best N``).
The ranking uses measures a user looks at:

- estimated resolution of the class (Å, smaller is better): a class that
  many particles agree on reaches higher resolution;
- rotational accuracy (degrees, smaller is better): particles of a real,
  rigid species align sharply;
- class fraction (larger is better): the species a dataset was collected
  for is rarely a small minority, while junk classes that align well by
  chance usually are small;
- a class with fewer than ``min_fraction`` of the particles (default 2 %) is
  ranked last, whatever its other measures: too few particles to trust.

The score is the mean of a class's ranks in the three measures (1 = best);
ties go to the larger class. The table also shows connectedness (the share
of the thresholded density in its largest connected piece) for the user to
judge broken maps; it is not scored, because compact junk is as connected
as an intact particle.

``--recenter`` moves each particle's origin so that its class map's centre of
mass (positive density, pixels from the box centre) comes to the centre of
the box: with A the particle's Euler matrix and c the centre of mass (x, y, z),
the new origin is ``origin − (A·c)_xy`` (Å = pixels × the particles' pixel
size). This is the sign RELION 3.1 uses for ``relion_preprocess --recenter
--recenter_x/y/z``: in a particle image a reference point c projects to
−origin + (A·c)_xy from the box centre.

``--regroup N`` merges the particles' groups (rlnGroupNumber), ordered by
their refined scale (model_groups' rlnGroupScaleCorrection), into about N
groups of similar size, as RELION's Select does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from spa3d.errors import InputError
from spa3d.geometry.euler import euler_to_matrix
from spa3d.io.mrc import read_map
from spa3d.io.star import ParticleTable, read_particles_star, read_star
from spa3d.maps.transform import centre_of_mass

log = logging.getLogger("spa3d")


@dataclass
class SelectOptions:
    """classes: class numbers (1-based) to keep; best: keep the N best-ranked classes instead;
    recenter: move origins by the class's centre of mass; regroup: merge groups into about N (0 = keep)."""

    classes: list[int] | None = None
    best: int | None = None
    recenter: bool = False
    regroup: int = 0
    min_fraction: float = 0.02


def data_star_for_model(model_star: str | Path) -> Path:
    """``run_it025_model.star`` -> ``run_it025_data.star`` (beside it)."""
    p = Path(model_star)
    if not p.name.endswith("_model.star"):
        raise InputError(p, "expected a classification's run_itNNN_model.star")
    return p.with_name(p.name[: -len("_model.star")] + "_data.star")


def _resolve(path: str, beside: Path) -> Path:
    """A path from a STAR file: as written (relative to the project directory), else beside the STAR file."""
    p = Path(path)
    if p.exists():
        return p
    q = beside.parent / p.name
    if q.exists():
        return q
    raise InputError(beside, f"class map {path} not found")


def connectedness(vol: np.ndarray, pixel_size: float, diameter: float | None = None) -> float:
    """Share of the thresholded density (above mean + 2·SD inside the particle sphere) in its largest piece (0–1)."""
    n = vol.shape[0]
    c = np.arange(n) - n // 2
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    radius = n / 2 if diameter is None else min(n / 2, diameter / 2 / pixel_size)
    inside = r2 <= radius ** 2
    v = vol[inside]
    if not np.isfinite(v).all() or v.std() == 0:
        return 0.0
    mask = (vol > v.mean() + 2 * v.std()) & inside
    labels, k = ndimage.label(mask)
    if k == 0:
        return 0.0
    sizes = ndimage.sum_labels(np.clip(vol, 0, None), labels, index=np.arange(1, k + 1))
    return float(sizes.max() / sizes.sum()) if sizes.sum() > 0 else 0.0


def class_table(model_star: str | Path, particles: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per class: fraction, particle count, resolution (Å), accuracies, connectedness, map path."""
    model_star = Path(model_star)
    blocks = read_star(model_star)
    if "model_classes" not in blocks:
        raise InputError(model_star, "no data_model_classes block (is this a run_itNNN_model.star?)")
    cls = blocks["model_classes"].reset_index(drop=True)
    general = blocks.get("model_general")
    apix = float(general["rlnPixelSize"].iloc[0]) if general is not None and "rlnPixelSize" in general else 1.0
    rows = []
    for k, row in cls.iterrows():
        number = k + 1
        path = _resolve(str(row["rlnReferenceImage"]), model_star)
        vol, map_apix = read_map(path)
        rows.append({
            "class": number,
            "particles": int((particles["rlnClassNumber"].astype(int) == number).sum()) if particles is not None else -1,
            "fraction": float(row.get("rlnClassDistribution", np.nan)),
            "resolution_A": float(row.get("rlnEstimatedResolution", np.nan)),
            "accuracy_rot_deg": float(row.get("rlnAccuracyRotations", np.nan)),
            "accuracy_trans_A": float(row.get("rlnAccuracyTranslationsAngst", np.nan)),
            "connectedness": connectedness(vol, map_apix if map_apix > 0 else apix),
            "map": str(path),
        })
    return pd.DataFrame(rows)


def rank_classes(table: pd.DataFrame, min_fraction: float = 0.02) -> pd.DataFrame:
    """Add ``score`` (mean rank, 1 = best), ``rank`` and ``reason`` columns; rows sorted best first."""
    t = table.copy()
    ok = (t["fraction"] >= min_fraction) & np.isfinite(t["resolution_A"])
    big = 1e9
    res = t["resolution_A"].where(ok & (t["resolution_A"] > 0), big)
    acc = t["accuracy_rot_deg"].where(ok & np.isfinite(t["accuracy_rot_deg"]), big)
    frac = t["fraction"].where(ok, -1.0)
    r_res = res.rank(method="min")
    r_acc = acc.rank(method="min")
    r_frac = (-frac).rank(method="min")
    t["score"] = (r_res + r_acc + r_frac) / 3 + np.where(ok, 0, len(t))
    reasons = []
    for i in t.index:
        if not ok[i]:
            reasons.append(f"only {100 * t.at[i, 'fraction']:.1f}% of the particles" if np.isfinite(t.at[i, "fraction"])
                           else "no resolution estimate")
            continue
        parts = []
        for name, r, worst in (("resolution", r_res, r_res.max()), ("rotational accuracy", r_acc, r_acc.max()),
                               ("class fraction", r_frac, r_frac.max())):
            if r[i] == 1:
                parts.append(f"best {name}")
            elif r[i] == worst and worst > 1:
                parts.append(f"worst {name}")
        if t.at[i, "connectedness"] < 0.7:
            parts.append(f"density in pieces (connectedness {t.at[i, 'connectedness']:.2f})")
        reasons.append(", ".join(parts) if parts else "middle of the field")
    t["reason"] = reasons
    t = t.sort_values(["score", "fraction"], ascending=[True, False]).reset_index(drop=True)
    t["rank"] = np.arange(1, len(t) + 1)
    return t


def format_ranking(t: pd.DataFrame) -> str:
    lines = [" rank class particles fraction resolution(Å) acc.rot(°) acc.trans(Å) connected score  why"]
    for _, r in t.iterrows():
        lines.append(f"{r['rank']:5d} {r['class']:5d} {r['particles']:9d} {r['fraction']:8.3f} {r['resolution_A']:13.2f} "
                     f"{r['accuracy_rot_deg']:10.2f} {r['accuracy_trans_A']:12.2f} {r['connectedness']:9.2f} "
                     f"{r['score']:5.2f}  {r['reason']}")
    return "\n".join(lines)


def recenter_origins(particles: pd.DataFrame, com_xyz_px: dict[int, np.ndarray], pixel_size: np.ndarray) -> pd.DataFrame:
    """New rlnOriginX/YAngst: origin − (A·c)_xy × pixel size, with c the particle's class centre of mass (pixels)."""
    p = particles.copy()
    cls = p["rlnClassNumber"].astype(int).to_numpy()
    c = np.stack([com_xyz_px[k] for k in cls])
    a = euler_to_matrix(*(p[f"rlnAngle{n}"].astype(float).to_numpy() for n in ("Rot", "Tilt", "Psi")))
    proj = np.einsum("nij,nj->ni", a, c)
    for j, ax in enumerate("XY"):
        col = f"rlnOrigin{ax}Angst"
        old = p[col].astype(float).to_numpy() if col in p else np.zeros(len(p))
        p[col] = old - proj[:, j] * pixel_size
    return p


def regroup(particles: pd.DataFrame, groups: pd.DataFrame | None, n_groups: int, path) -> pd.DataFrame:
    """Merge rlnGroupNumber into about ``n_groups`` groups of similar size, ordered by refined scale."""
    p = particles.copy()
    if "rlnGroupNumber" not in p:
        p["rlnGroupNumber"] = 1
    g = p["rlnGroupNumber"].astype(int)
    counts = g.value_counts()
    if len(p) // n_groups < 10:
        raise InputError(path, f"--regroup {n_groups}: each group needs at least 10 particles ({len(p)} selected)")
    scale = {}
    if groups is not None and "rlnGroupScaleCorrection" in groups:
        scale = dict(zip(groups["rlnGroupNumber"].astype(int), groups["rlnGroupScaleCorrection"].astype(float)))
    order = sorted(counts.index, key=lambda k: (scale.get(k, 1.0), k))
    target = len(p) / n_groups
    new, filled, cur = {}, 0, 1
    for k in order:
        new[k] = cur
        filled += counts[k]
        if filled >= target * cur and cur < n_groups:
            cur += 1
    p["rlnGroupNumber"] = g.map(new).astype(int)
    p["rlnGroupName"] = [f"group_{k:03d}" for k in p["rlnGroupNumber"]]
    return p


def run_select(model_star: str | Path, out_dir: str | Path, opts: SelectOptions) -> dict:
    """Write ``out_dir/particles.star`` with the particles of the chosen classes. Returns a summary."""
    model_star = Path(model_star)
    if not model_star.exists():
        raise InputError(model_star, "file not found")
    data_star = data_star_for_model(model_star)
    if not data_star.exists():
        raise InputError(data_star, f"the data.star of {model_star.name} is missing")
    table: ParticleTable = read_particles_star(data_star)
    p = table.particles
    if "rlnClassNumber" not in p:
        raise InputError(data_star, "no rlnClassNumber column (not a classification's data.star)")
    classes = class_table(model_star, p)
    k_cls = len(classes)
    ranking = rank_classes(classes, opts.min_fraction)
    print(format_ranking(ranking))
    if opts.best is not None:
        if opts.classes:
            raise InputError(None, "give either --classes or --best, not both")
        if not 1 <= opts.best <= k_cls:
            raise InputError(model_star, f"--best {opts.best}: the model has {k_cls} classes")
        chosen = ranking["class"].iloc[: opts.best].astype(int).tolist()
    elif opts.classes:
        bad = [c for c in opts.classes if not 1 <= c <= k_cls]
        if bad:
            raise InputError(model_star, f"--classes {','.join(map(str, bad))}: the model has classes 1..{k_cls}")
        chosen = sorted(set(opts.classes))
    else:
        raise InputError(None, "choose classes with --classes 1,3 or --best N")
    keep = p["rlnClassNumber"].astype(int).isin(chosen).to_numpy()
    sel = p[keep].reset_index(drop=True)
    if len(sel) == 0:
        raise InputError(data_star, f"no particles in class(es) {','.join(map(str, chosen))}")
    shifts = {}
    if opts.recenter:
        for c in chosen:
            vol, _ = read_map(classes.loc[classes["class"] == c, "map"].iloc[0])
            shifts[c] = centre_of_mass(vol)
        apix = ParticleTable(table.optics, sel).per_particle("rlnImagePixelSize").astype(float)
        sel = recenter_origins(sel, shifts, apix)
    if opts.regroup:
        groups = read_star(model_star).get("model_groups")
        sel = regroup(sel, groups, opts.regroup, model_star)
    out = Path(out_dir)
    ParticleTable(table.optics, sel, extra_blocks={}).write(out / "particles.star")
    msg = f"selected {len(sel)} of {len(p)} particles from class(es) {','.join(map(str, chosen))}"
    if shifts:
        msg += "; re-centred by " + ", ".join(f"class {c}: ({s[0]:.2f}, {s[1]:.2f}, {s[2]:.2f}) px" for c, s in shifts.items())
    log.info(msg)
    print(msg + f" -> {out / 'particles.star'}")
    return {"classes": chosen, "n_selected": int(len(sel)), "ranking": ranking, "com_px": shifts}


def parse_classes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise InputError(None, f"--classes {text}: expected class numbers such as 1,3") from None


# ---- command line: ``spa3d select`` ----

DESCRIPTION = ("Write SELDIR/particles.star with the particles of the chosen classes of a classification (read from "
               "the run_itNNN_data.star beside the model.star). Prints a ranking of the classes with the reasons.")


def add_args(p) -> None:
    from spa3d.jobs.args import add_job_output

    p.add_argument("--i", required=True, help="a classification's run_itNNN_model.star")
    add_job_output(p, "job directory (writes particles.star)")
    p.add_argument("--classes", default=None, help="class numbers to keep, e.g. 3,4")
    p.add_argument("--best", type=int, default=None, help="keep the N best-ranked classes")
    p.add_argument("--recenter", action="store_true",
                   help="move each particle's origin so its class's centre of mass is at the box centre")
    p.add_argument("--regroup", type=int, default=0, help="merge groups into about N groups (default 0: keep)")
    p.add_argument("--min-fraction", type=float, default=0.02,
                   help="classes with a smaller share of the particles rank last (default 0.02)")
    p.add_argument("--quiet", action="store_true")


def main(a) -> None:
    from spa3d.jobs.args import start_log

    Path(a.o).mkdir(parents=True, exist_ok=True)
    start_log(a, Path(a.o) / "run.log")
    run_select(a.i, a.o, SelectOptions(classes=parse_classes(a.classes), best=a.best, recenter=a.recenter,
                                       regroup=a.regroup, min_fraction=a.min_fraction))
