"""Pictures of maps, particles and iterations (PNG, matplotlib's Agg backend; no display needed).

Maps are (z, y, x) arrays. Views along x, y and z show the map as a user sees
it in RELION's display or ChimeraX: central slices (the plane through the box
centre) and projections (sums along the axis).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mpl_toolkits.mplot3d.art3d import Poly3DCollection  # noqa: E402

AXES = ("x", "y", "z")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def slices_and_projections(vol: np.ndarray, path, title: str = "") -> Path:
    """2×3 panel: central slices and projections along x, y, z."""
    n = vol.shape[0]
    fig, axs = plt.subplots(2, 3, figsize=(7.5, 5.2))
    views = [vol[:, :, n // 2], vol[:, n // 2, :], vol[n // 2]]  # slices normal to x, y, z
    projs = [vol.sum(2), vol.sum(1), vol.sum(0)]
    for j in range(3):
        for i, (img, kind) in enumerate(((views[j], "slice"), (projs[j], "projection"))):
            ax = axs[i, j]
            ax.imshow(img, cmap="gray", origin="lower")
            ax.set_title(f"{kind} along {AXES[j]}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def iso_level(vol: np.ndarray) -> float:
    """A threshold that shows the particle: Otsu's threshold of the voxels inside the inscribed sphere."""
    from skimage.filters import threshold_otsu

    n = vol.shape[0]
    c = np.arange(n) - n // 2
    inside = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) <= (n // 2) ** 2
    v = vol[inside]
    if v.std() == 0:
        return float(v.mean())
    return float(threshold_otsu(v))


def _draw_isosurface(ax, vol: np.ndarray, level: float, colour=(0.85, 0.7, 0.35)) -> None:
    from skimage.measure import marching_cubes

    n = vol.shape[0]
    ax.set_axis_off()
    lo, hi = float(vol.min()), float(vol.max())
    if not lo < level < hi:
        return
    # about 48 cubes across the box: enough for a 4-inch figure; at box 128 a step of 2 made 500k faces that
    # took matplotlib 3 s per view
    verts, faces, normals, _ = marching_cubes(vol, level=level, step_size=max(1, int(round(n / 48))))
    verts = verts[:, ::-1]  # (z, y, x) -> (x, y, z)
    light = np.array([0.4, 0.3, 0.85])
    light /= np.linalg.norm(light)
    fn = normals[faces].mean(1)[:, ::-1]
    fn /= np.linalg.norm(fn, axis=1, keepdims=True) + 1e-12
    shade = 0.35 + 0.65 * np.clip(-(fn @ light), 0, 1)
    cols = np.clip(np.asarray(colour)[None, :] * shade[:, None], 0, 1)
    mesh = Poly3DCollection(verts[faces], facecolors=cols, edgecolor="none")
    ax.add_collection3d(mesh)
    centre = (verts.max(0) + verts.min(0)) / 2
    half = 0.55 * float((verts.max(0) - verts.min(0)).max()) + 1
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_zlim(centre[2] - half, centre[2] + half)
    ax.set_box_aspect((1, 1, 1))
    ax.view_init(elev=20, azim=-60)


def isosurface(vol: np.ndarray, path, level: float | None = None, title: str = "") -> Path:
    """Isosurface rendering (marching cubes, shaded) at ``level`` (default :func:`iso_level`)."""
    lvl = iso_level(vol) if level is None else level
    fig = plt.figure(figsize=(4, 4))
    ax = fig.add_subplot(projection="3d")
    _draw_isosurface(ax, vol, lvl)
    ax.set_title((title + "\n" if title else "") + f"threshold {lvl:.3g}", fontsize=9)
    return _save(fig, path)


def class_gallery(maps: list[np.ndarray], path, labels: list[str] | None = None) -> Path:
    """All classes side by side: isosurfaces (same view) above central z slices."""
    k = len(maps)
    fig = plt.figure(figsize=(3 * k, 6))
    for i, vol in enumerate(maps):
        ax = fig.add_subplot(2, k, i + 1, projection="3d")
        _draw_isosurface(ax, vol, iso_level(vol))
        ax.set_title(labels[i] if labels else f"class {i + 1}", fontsize=9)
        ax2 = fig.add_subplot(2, k, k + i + 1)
        ax2.imshow(vol.sum(0), cmap="gray", origin="lower")
        ax2.set_xticks([])
        ax2.set_yticks([])
        ax2.set_title("projection along z", fontsize=8)
    return _save(fig, path)


def iteration_plots(history: dict[str, np.ndarray], path) -> Path:
    """Per-iteration curves. ``history`` holds 'iteration' (N,) and any of 'fraction', 'resolution',
    'acc_rot', 'acc_trans' (N, K), 'loglik', 'changes' (N,)."""
    it = history["iteration"]
    panels = [("fraction", "class fraction"), ("resolution", "estimated resolution (Å)"),
              ("acc_rot", "rotational accuracy (°)"), ("acc_trans", "translational accuracy (Å)"),
              ("loglik", "log-likelihood"), ("changes", "particles changing class (%)")]
    panels = [p for p in panels if p[0] in history and np.size(history[p[0]])]
    cols = 3
    rows = max(1, int(np.ceil(len(panels) / cols)))
    fig, axs = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, (key, label) in zip(axs.ravel(), panels):
        y = np.asarray(history[key], dtype=float)
        if key == "resolution":
            y = np.where(y > 999, np.nan, y)  # RELION writes a huge value before a class has any resolution
        if y.ndim == 2:
            for k in range(y.shape[1]):
                ax.plot(it[: len(y)], y[:, k], marker=".", label=f"class {k + 1}")
            if y.shape[1] > 1:
                ax.legend(fontsize=7)
        else:
            ax.plot(it[: len(y)], y, marker=".")
        ax.set_xlabel("iteration")
        ax.set_title(label, fontsize=9)
    for ax in axs.ravel()[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


def orientation_distribution(rot_deg: np.ndarray, tilt_deg: np.ndarray, path, title: str = "") -> Path:
    """Histogram of viewing directions (rot, tilt) in a Mollweide projection."""
    fig = plt.figure(figsize=(6.5, 3.6))
    ax = fig.add_subplot(projection="mollweide")
    lon = np.radians(((np.asarray(rot_deg) + 180) % 360) - 180)
    lat = np.radians(90 - np.asarray(tilt_deg))
    hb = ax.hexbin(lon, lat, gridsize=30, cmap="viridis", mincnt=1)
    fig.colorbar(hb, ax=ax, shrink=0.7, label="particles")
    ax.grid(True, alpha=0.3)
    ax.set_xticklabels([])
    ax.set_title(title or "orientation distribution (rot, 90° − tilt)", fontsize=9)
    return _save(fig, path)


def fsc_plot(curves: dict[str, np.ndarray], n: int, pixel_size: float, path) -> Path:
    """FSC curves against spatial frequency (1/Å) with the 0.5 and 0.143 lines."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, c in curves.items():
        freq = np.arange(len(c)) / (n * pixel_size)
        ax.plot(freq, c, label=label)
    for t in (0.5, 0.143):
        ax.axhline(t, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(fontsize=8)
    return _save(fig, path)


def guinier_plot(x: np.ndarray, curves: dict[str, np.ndarray], path, fit: tuple[float, float] | None = None) -> Path:
    """ln(mean |F|) per shell against 1/d² (Å⁻²), with the fitted line (slope, intercept) of the B-factor."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, y in curves.items():
        ok = np.asarray(y) > -99
        ax.plot(np.asarray(x)[ok], np.asarray(y)[ok], label=label)
    if fit is not None and fit[0] != 0:
        ax.plot(x, fit[1] + fit[0] * np.asarray(x), color="grey", ls="--", lw=0.8,
                label=f"fit: B = {4 * fit[0]:.0f} Å²")
    ax.set_xlabel("1/d² (Å⁻²)")
    ax.set_ylabel("ln |F|")
    ax.legend(fontsize=8)
    return _save(fig, path)


def particle_gallery(images: np.ndarray, path, title: str = "") -> Path:
    """Up to 32 particle images tiled, 8 per row, each scaled to its own range (one montage image)."""
    k = min(len(images), 32)
    cols = min(8, max(k, 1))
    rows = max(1, int(np.ceil(k / cols)))
    n = images.shape[-1] if k else 1
    f = -(-n // 128)  # shown about 126 pixels wide: bin larger images f × f (matplotlib then draws 10× faster)
    if f > 1:
        m = n // f
        images = np.asarray(images[:k], dtype=np.float64)[:, :m * f, :m * f].reshape(k, m, f, m, f).mean(axis=(2, 4))
        n = m
    gap = max(1, n // 32)
    tile = np.ones((rows * (n + gap) - gap, cols * (n + gap) - gap))
    for i in range(k):
        im = np.asarray(images[i], dtype=np.float64)[::-1]  # origin at the bottom, as the map views
        lo, hi = im.min(), im.max()
        r, c = divmod(i, cols)
        tile[r * (n + gap):r * (n + gap) + n, c * (n + gap):c * (n + gap) + n] = (im - lo) / (hi - lo if hi > lo else 1)
    fig, ax = plt.subplots(figsize=(1.4 * cols, 1.4 * rows))
    ax.imshow(tile, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
