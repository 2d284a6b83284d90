"""Project directories (<Type>/jobNNN/, note.txt, default_pipeline.star read by RELION) and job reports in Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from spa3d.cli.main import main
from spa3d.data import default_structure
from spa3d.io.star import read_star
from conftest import IN_CI


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Import/job001 (simulate) and Extract/job002 (extract), run with --project."""
    d = tmp_path_factory.mktemp("project") / "P"
    assert main(["simulate", "--project", str(d), "--i", default_structure(), "--n", "40", "--micrographs", "2",
                 "--mic-size", "256", "--quiet"]) == 0
    assert main(["extract", "--project", str(d), "--mics", "Import/job001/micrographs_ctf.star",
                 "--reextract", "Import/job001/particles.star", "--box", "96", "--rescale", "64", "--norm",
                 "--invert", "--quiet"]) == 0
    return d


def test_jobs_write_relion_job_directories(project):
    d = project
    for job in ("Import/job001", "Extract/job002"):
        assert (d / job / "note.txt").exists() and (d / job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert "spa3d extract --project" in (d / "Extract/job002/note.txt").read_text()
    b = read_star(d / "default_pipeline.star")
    procs = b["pipeline_processes"]
    assert list(procs["rlnPipeLineProcessName"]) == ["Import/job001/", "Extract/job002/"]
    assert list(procs["rlnPipeLineProcessType"].astype(int)) == [0, 5]
    assert list(procs["rlnPipeLineProcessStatus"].astype(int)) == [2, 2]
    edges = b["pipeline_input_edges"]
    assert set(edges["rlnPipeLineEdgeFromNode"]) == {"Import/job001/micrographs_ctf.star", "Import/job001/particles.star"}
    # the extracted particles name stacks relative to the project directory
    parts = read_star(d / "Extract/job002/particles.star")["particles"]
    assert parts["rlnImageName"].iloc[0].split("@")[1].startswith("Extract/job002/")


def test_bad_input_leaves_no_job_behind(project, capsys):
    d = project
    before = (d / "default_pipeline.star").read_text()
    assert main(["extract", "--project", str(d), "--mics", "Import/job001/micrographs_ctf.star",
                 "--reextract", "Import/job001/particles.star", "--box", "1000", "--quiet"]) == 2
    assert "larger than the micrograph" in capsys.readouterr().err
    assert not (d / "Extract" / "job003").exists()
    after = read_star(d / "default_pipeline.star")["pipeline_processes"]
    assert "Extract/job003/" not in set(after["rlnPipeLineProcessName"])
    assert before.count("job00") == (d / "default_pipeline.star").read_text().count("job00")


def test_relion_pipeliner_reads_the_pipeline(project, relion, tmp_path):
    """relion_pipeliner --check_job_completion reads our pipeline, finds the job's RELION_JOB_EXIT_SUCCESS, marks it
    finished, touches its output nodes (warning if one is missing) and writes the pipeline back with everything kept."""
    d = tmp_path / "P"
    shutil.copytree(project, d)
    ours = read_star(d / "default_pipeline.star")
    text = (d / "default_pipeline.star").read_text().replace("Extract/job002/\tNone\t5\t2", "Extract/job002/\tNone\t5\t0")
    (d / "default_pipeline.star").write_text(text)
    res = relion("relion_pipeliner", "--check_job_completion", cwd=d)
    assert "does not exist" not in res.stderr + res.stdout
    theirs = read_star(d / "default_pipeline.star")
    assert list(theirs["pipeline_processes"]["rlnPipeLineProcessStatus"].astype(int)) == [2, 2]
    for block in ("pipeline_processes", "pipeline_nodes", "pipeline_input_edges", "pipeline_output_edges"):
        a = ours[block].astype(str).values.tolist()
        b = theirs[block].astype(str).values.tolist()
        assert a == b, block
    assert (d / ".Nodes" / "3" / "Extract" / "job002" / "particles.star").exists()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    msg = "chromium not found (apt-get install -y chromium)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def test_report_renders_in_headless_chromium(project):
    d = project / "Extract" / "job002"
    page = d / "report.html"
    assert page.exists()
    pngs = list((d / "report").glob("*.png"))
    assert pngs
    for p in pngs:
        from matplotlib.image import imread

        img = imread(p)
        assert img.shape[0] > 50 and img.shape[1] > 50 and float(np.std(img[..., :3])) > 0.01, p.name
    exe = _chromium()
    res = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(project)})
    dom = res.stdout
    import re

    m = re.search(r'id="spa3d-image-status" data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert m, "the page's load script did not run"
    loaded, total = int(m.group(1)), int(m.group(2))
    assert total >= 1 and loaded == total, f"{loaded} of {total} images loaded"
