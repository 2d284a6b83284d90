"""``spa3d report JOBDIR``: a self-contained report.html (images embedded) and PNGs in JOBDIR/report/.

What a job directory holds decides what the report shows:

- iterative jobs (run_itNNN_model.star: initial model, 3D classification):
  per-iteration plots (class fractions, resolution, rotational and
  translational accuracy, log-likelihood, particles changing class), the
  final maps (slices and projections along x, y, z, an isosurface), a class
  gallery, the orientation distribution of the last iteration, and FSC
  curves against a ground truth when one is given;
- other maps in the directory (e.g. _alignD2 / _symD2 maps, reconstructions):
  slices, projections and an isosurface;
- refinements (run_itNNN_half1_model.star: refine3d): the half maps' FSC
  (gold standard), the resolution per iteration and the orientations;
- post-processing (postprocess.star): the unmasked, masked,
  phase-randomised and corrected FSC curves and the Guinier plot;
- particle jobs (particles.star: select, extract, simulate): counts, optics,
  and a gallery of the first particles;
- every report with maps: interactive 3D views of up to four of them (NGL
  Viewer, vendored in report/vendor/ and copied beside the page so that it
  works offline): isosurface with a threshold slider, rotate and zoom.
"""

from __future__ import annotations

import base64
import html
import logging
import re
from pathlib import Path

import numpy as np

from spa3d.io.mrc import read_map
from spa3d.io.star import read_star

log = logging.getLogger("spa3d")

_IT = re.compile(r"run_it(\d+)_model\.star$")


def _iterations(job: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in job.glob("run_it*_model.star") if (m := _IT.search(p.name)))


def _history(job: Path, its: list[int]) -> dict:
    h: dict[str, list] = {"iteration": [], "fraction": [], "resolution": [], "acc_rot": [], "acc_trans": [],
                          "loglik": [], "changes": []}
    prev = None
    for it in its:
        m = read_star(job / f"run_it{it:03d}_model.star")
        cls = m.get("model_classes")
        if cls is None:
            continue
        h["iteration"].append(it)
        for key, col in (("fraction", "rlnClassDistribution"), ("resolution", "rlnEstimatedResolution"),
                         ("acc_rot", "rlnAccuracyRotations"), ("acc_trans", "rlnAccuracyTranslationsAngst")):
            if col in cls:
                h[key].append(cls[col].astype(float).to_numpy())
        gen = m.get("model_general")
        if gen is not None and "rlnLogLikelihood" in gen:
            h["loglik"].append(float(gen["rlnLogLikelihood"].iloc[0]))
        cur = _class_numbers(job, it) if len(cls) > 1 else None
        if cur is not None:
            if prev is not None:
                h["changes"].append(_changed_percent(prev, cur))
            prev = cur
    out = {"iteration": np.asarray(h["iteration"])}
    for key in ("fraction", "resolution", "acc_rot", "acc_trans"):
        if h[key] and len({len(x) for x in h[key]}) == 1:
            out[key] = np.stack(h[key])
    if h["loglik"] and any(v != 0 for v in h["loglik"]):
        out["loglik"] = np.asarray(h["loglik"])
    if h["changes"]:
        out["changes"] = np.asarray([np.nan] + h["changes"])
    return out


def _class_numbers(job: Path, it: int):
    """Iteration ``it``'s class of every particle: from spa3d's run_itNNN_state.npz (the particles in the run's
    order; reading it is fast where a data.star of 50,000 particles takes seconds), else by image name from the
    data.star (a RELION job); None when neither holds classes."""
    state = job / f"run_it{it:03d}_state.npz"
    if state.exists():
        with np.load(state) as z:
            if "classes" in z.files:
                return z["classes"].astype(int)
    return _by_name(job, it)


def _changed_percent(prev, cur) -> float:
    """Percentage of particles whose class changed between two iterations' :func:`_class_numbers`."""
    if isinstance(prev, np.ndarray) and isinstance(cur, np.ndarray) and len(prev) == len(cur):
        return 100.0 * float(np.mean(prev != cur))
    if isinstance(prev, dict) and isinstance(cur, dict):
        common = [k for k in cur if k in prev]
        return 100.0 * float(np.mean([cur[k] != prev[k] for k in common])) if common else 0.0
    return float("nan")


def _by_name(job: Path, it: int) -> dict | None:
    data = job / f"run_it{it:03d}_data.star"
    if not data.exists():
        return None
    p = read_star(data).get("particles")
    if p is None or "rlnClassNumber" not in p:
        return None
    return dict(zip(p["rlnImageName"], p["rlnClassNumber"].astype(int)))


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


_STYLE = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;color:#222}
figure{display:inline-block;margin:0.5em;vertical-align:top}figcaption{font-size:0.85em;color:#555}
img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:0.9em}
pre{background:#f4f4f4;padding:0.5em;white-space:pre-wrap}"""

# Counts the images the browser has decoded, so a headless browser (and a reader) can see that all loaded.
_STATUS_SCRIPT = """<p id="spa3d-image-status"></p><script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var el = document.getElementById('spa3d-image-status');
  el.textContent = ok + ' of ' + imgs.length + ' images loaded';
  el.setAttribute('data-loaded', ok); el.setAttribute('data-total', imgs.length);
});
</script>"""


_VIEWER_STATUS = """<p id="spa3d-viewer-status"></p><script>
window.spa3dViewers = {ready: 0, total: 0, errors: []};
function spa3dViewerDone(ok, msg) {
  var v = window.spa3dViewers, el = document.getElementById('spa3d-viewer-status');
  if (ok) { v.ready += 1; } else { v.errors.push(msg); }
  el.setAttribute('data-ready', v.ready); el.setAttribute('data-total', v.total);
  el.setAttribute('data-errors', v.errors.length);
  el.textContent = v.ready + ' of ' + v.total + ' 3D views ready' + (v.errors.length ? ' (' + v.errors.join('; ') + ')' : '');
}
</script>"""

#: maps larger than this are Fourier-cropped for the 3D view (the view is for looking, not measuring)
VIEWER_MAX_BOX = 96


def _viewer(vol: np.ndarray, pixel_size: float, label: str, index: int, out: Path) -> str:
    """An interactive 3D view (NGL: isosurface, threshold slider, rotate and zoom) of a map, embedded as MRC."""
    import json

    import mrcfile

    from spa3d.report.figures import iso_level

    v = np.asarray(vol, dtype=np.float32)
    if v.shape[0] > VIEWER_MAX_BOX:
        from spa3d.maps.transform import fourier_resample

        pixel_size = pixel_size * v.shape[0] / VIEWER_MAX_BOX
        v = fourier_resample(v, VIEWER_MAX_BOX)
    tmp = out / f".viewer_{index}.mrc"
    with mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(v)
        m.voxel_size = pixel_size
    data = base64.b64encode(tmp.read_bytes()).decode()
    tmp.unlink()
    level = float(iso_level(v))
    lo, hi = float(np.percentile(v, 50)), float(v.max())
    vid = f"spa3d-view-{index}"
    return f"""<figure><div id="{vid}" style="width:460px;height:380px;border:1px solid #ccc"></div>
<figcaption>{html.escape(label)}: 3D view (drag to rotate, scroll to zoom); threshold
<input type="range" id="{vid}-level" min="{lo:.6g}" max="{hi:.6g}" step="{(hi - lo) / 200:.6g}" value="{level:.6g}">
<span id="{vid}-value">{level:.4g}</span></figcaption></figure>
<script>(function () {{
  window.spa3dViewers.total += 1;
  try {{
    var stage = new NGL.Stage({json.dumps(vid)}, {{backgroundColor: 'white'}});
    var bytes = Uint8Array.from(atob({json.dumps(data)}), function (c) {{ return c.charCodeAt(0); }});
    stage.loadFile(new Blob([bytes]), {{ext: 'mrc', name: {json.dumps(label)}}}).then(function (comp) {{
      var surf = comp.addRepresentation('surface', {{isolevelType: 'value', isolevel: {level:.6g}, color: '#d9b35a',
                                                     useWorker: false}});
      comp.autoView();
      var slider = document.getElementById({json.dumps(vid + "-level")});
      slider.addEventListener('input', function () {{
        surf.setParameters({{isolevel: parseFloat(slider.value)}});
        document.getElementById({json.dumps(vid + "-value")}).textContent = parseFloat(slider.value).toPrecision(4);
      }});
      spa3dViewerDone(true);
    }}).catch(function (e) {{ spa3dViewerDone(false, String(e)); }});
  }} catch (e) {{ spa3dViewerDone(false, String(e)); }}
}})();</script>"""


def _viewer_section(maps: list[tuple[np.ndarray, float, str]], out: Path) -> str:
    """The 3D views of up to 4 maps (label, pixel size), with NGL copied beside the report (report/ngl.js)."""
    import shutil

    if not maps:
        return ""
    shutil.copyfile(Path(__file__).parent / "vendor" / "ngl.js", out / "ngl.js")
    views = "".join(_viewer(v, apix, label, i, out) for i, (v, apix, label) in enumerate(maps[:4]))
    return (f"<h2>3D views</h2><script src='{out.name}/ngl.js'></script>{_VIEWER_STATUS}{views}")


def _table(df) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{rows}</table>"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)


def _refinement_sections(job: Path, out: Path, fg) -> list[str]:
    """A refinement's (refine3d) gold-standard FSC of the half maps and orientations of the last iteration."""
    its = sorted(int(m.group(1)) for p in job.glob("run_it*_half1_model.star")
                 if (m := re.search(r"run_it(\d+)_half1_model\.star$", p.name)))
    if not its:
        return []
    parts = []
    model_path = job / "run_model.star" if (job / "run_model.star").exists() else \
        job / f"run_it{its[-1]:03d}_half1_model.star"
    m = read_star(model_path)
    gen = m["model_general"]
    n, apix = int(gen["rlnOriginalImageSize"].iloc[0]), float(gen["rlnPixelSize"].iloc[0])
    final = (job / "run_model.star").exists()
    res = [float(read_star(job / f"run_it{i:03d}_half1_model.star")["model_classes"]["rlnEstimatedResolution"].iloc[0])
           for i in its]
    parts.append("<h2>Refinement</h2><p>" + (f"converged after {its[-1]} iterations: final resolution "
                 f"{float(gen['rlnCurrentResolution'].iloc[0]):.2f} Å (half maps' FSC 0.143, unmasked)" if final else
                 f"{its[-1]} iterations, not converged") + ". Half maps' FSC 0.143 per iteration: "
                 + ", ".join(f"{r:.1f}" for r in res) + " Å.</p>")
    fsc_curve = m["model_class_1"]["rlnGoldStandardFsc"].astype(float).to_numpy()
    parts.append(_img(fg.fsc_plot({"half maps (gold standard)": fsc_curve}, n, apix, out / "fsc_halves.png"),
                      f"FSC of the half maps ({model_path.name})"))
    data = job / "run_data.star" if final else job / f"run_it{its[-1]:03d}_data.star"
    p = read_star(data).get("particles")
    if p is not None and {"rlnAngleRot", "rlnAngleTilt"} <= set(p.columns):
        parts.append(_img(fg.orientation_distribution(p["rlnAngleRot"].astype(float), p["rlnAngleTilt"].astype(float),
                                                      out / "orientations.png"),
                          f"viewing directions of {len(p)} particles ({data.name})"))
    return parts


def _postprocess_sections(job: Path, out: Path, fg) -> list[str]:
    """A post-processing job's FSC curves (unmasked, masked, phase-randomised, corrected) and Guinier plot."""
    star = job / "postprocess.star"
    if not star.exists():
        return []
    pp = read_star(star)
    gen, table, gui = pp["general"], pp["fsc"], pp["guinier"]
    n = 2 * (len(table) - 1)
    apix = n and float(table["rlnAngstromResolution"].iloc[1]) / n
    names = {"rlnFourierShellCorrelationUnmaskedMaps": "unmasked", "rlnFourierShellCorrelationMaskedMaps": "masked",
             "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": "phase-randomised, masked",
             "rlnFourierShellCorrelationCorrected": "corrected"}
    curves = {label: table[col].astype(float).to_numpy() for col, label in names.items() if col in table}
    slope = float(gen["rlnFittedSlopeGuinierPlot"].iloc[0]) if "rlnFittedSlopeGuinierPlot" in gen else 0.0
    icpt = float(gen["rlnFittedInterceptGuinierPlot"].iloc[0]) if "rlnFittedInterceptGuinierPlot" in gen else 0.0
    g = {"original": gui["rlnLogAmplitudesOriginal"], "FSC-weighted": gui["rlnLogAmplitudesWeighted"],
         "sharpened": gui["rlnLogAmplitudesSharpened"]}
    return ["<h2>Post-processing</h2>"
            f"<p>final resolution {float(gen['rlnFinalResolution'].iloc[0]):.2f} Å (corrected FSC 0.143), "
            f"B-factor {float(gen['rlnBfactorUsedForSharpening'].iloc[0]):.1f} Å².</p>",
            _img(fg.fsc_plot(curves, n, apix, out / "fsc_postprocess.png"), "FSC of the half maps"),
            _img(fg.guinier_plot(gui["rlnResolutionSquared"].astype(float).to_numpy(),
                                 {k: v.astype(float).to_numpy() for k, v in g.items()}, out / "guinier.png",
                                 (slope, icpt)), "Guinier plot")]


def make_report(job_dir: str | Path, truth: str | Path | None = None) -> Path:
    """Write ``job_dir/report.html`` and ``job_dir/report/*.png``; returns the HTML path."""
    from spa3d.report import figures as fg

    job = Path(job_dir)
    out = job / "report"
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>spa3d report: {html.escape(str(job))}</h1>"]
    note = job / "note.txt"
    if note.exists():
        parts.append(f"<h2>Command</h2><pre>{html.escape(note.read_text())}</pre>")
    truth_map = read_map(truth)[0] if truth else None

    its = _iterations(job)
    shown_maps: set[str] = set()
    viewable: list = []  # (map, pixel size, name) for the 3D views
    if its:
        last = its[-1]
        hist = _history(job, its)
        if len(hist["iteration"]):
            parts.append("<h2>Iterations</h2>" + _img(fg.iteration_plots(hist, out / "iterations.png"),
                                                       f"per-iteration statistics, iterations {its[0]}–{last}"))
        maps, labels = [], []
        for p in sorted(job.glob(f"run_it{last:03d}_class*.mrc")):
            if re.search(r"_class\d+\.mrc$", p.name):
                vol, apix_map = read_map(p)
                maps.append(vol)
                labels.append(p.stem)
                shown_maps.add(p.name)
                viewable.append((vol, apix_map, p.name))
        if maps:
            model = read_star(job / f"run_it{last:03d}_model.star").get("model_classes")
            if model is not None:
                parts.append(f"<h2>Classes of iteration {last}</h2>" + _table(model.drop(
                    columns=[c for c in model.columns if c == "rlnReferenceImage"])))
            if len(maps) > 1:
                parts.append(_img(fg.class_gallery(maps, out / "class_gallery.png", labels), "class gallery"))
            for vol, label in zip(maps, labels):
                parts.append(f"<h3>{html.escape(label)}</h3>")
                parts.append(_img(fg.slices_and_projections(vol, out / f"{label}_views.png", label),
                                  f"{label}: central slices and projections"))
                parts.append(_img(fg.isosurface(vol, out / f"{label}_iso.png", title=label), f"{label}: isosurface"))
        data = job / f"run_it{last:03d}_data.star"
        if data.exists():
            p = read_star(data).get("particles")
            if p is not None and {"rlnAngleRot", "rlnAngleTilt"} <= set(p.columns):
                parts.append("<h2>Orientations</h2>" + _img(fg.orientation_distribution(
                    p["rlnAngleRot"].astype(float), p["rlnAngleTilt"].astype(float), out / "orientations.png"),
                    f"viewing directions of {len(p)} particles, iteration {last}"))
        if truth_map is not None and maps:
            from spa3d.fourier.filters import fsc
            from spa3d.maps.align import superpose

            curves = {}
            apix = read_map(truth)[1]
            for vol, label in zip(maps, labels):
                aligned, _ = superpose(vol, truth_map)
                curves[label] = fsc(aligned, truth_map)
            parts.append("<h2>FSC against the ground truth</h2>" + _img(
                fg.fsc_plot(curves, truth_map.shape[0], apix, out / "fsc.png"), "FSC of each class against the truth"))

    parts += _refinement_sections(job, out, fg)
    parts += _postprocess_sections(job, out, fg)
    others = [p for p in sorted(job.glob("*.mrc")) if p.name not in shown_maps and not _IT.search(p.name)
              and not re.match(r"run_it\d+_", p.name)]
    if others:
        parts.append("<h2>Maps</h2>")
        for p in others:
            vol, apix_map = read_map(p)
            viewable.append((vol, apix_map, p.name))
            parts.append(_img(fg.slices_and_projections(vol, out / f"{p.stem}_views.png", p.name),
                              f"{p.name}: central slices and projections"))
            parts.append(_img(fg.isosurface(vol, out / f"{p.stem}_iso.png", title=p.name), f"{p.name}: isosurface"))

    # the job's main maps first: refined / post-processed maps before masks and half maps
    viewable.sort(key=lambda m: ("mask" in m[2], "half" in m[2]))
    parts.append(_viewer_section(viewable, out))

    star = job / "particles.star"
    if star.exists():
        from spa3d.io.particles import ParticleSet

        try:
            ps = ParticleSet(star)
            parts.append(f"<h2>Particles</h2><p>{len(ps)} particles, box {ps.box} px, {ps.pixel_size:.4g} Å/px.</p>")
            parts.append(_table(ps.table.optics))
            imgs = ps.read(np.arange(min(len(ps), 32)))
            parts.append(_img(fg.particle_gallery(imgs, out / "particles.png"), f"the first {len(imgs)} particles"))
            if "rlnClassNumber" in ps.table.particles:
                counts = ps.table.particles["rlnClassNumber"].astype(int).value_counts().sort_index()
                parts.append("<p>particles per class: " + ", ".join(f"{k}: {v}" for k, v in counts.items()) + "</p>")
        except Exception as exc:  # a report must not fail because images moved
            parts.append(f"<p>particles.star could not be shown: {html.escape(str(exc))}</p>")

    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>spa3d {html.escape(job.name)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}{_STATUS_SCRIPT}</body></html>")
    from spa3d.io.atomic_write import atomic_path

    dest = job / "report.html"
    with atomic_path(dest) as tmp:
        tmp.write_text(page)
    log.info(f"report: {dest}")
    return dest
