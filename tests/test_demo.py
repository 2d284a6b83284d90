"""The README's first command: the demo runs every step end to end (quick schedule, 600 particles)."""

from __future__ import annotations

from spa3d.jobs.demo import run_demo


def test_quick_demo_runs_every_step(tmp_path):
    """Import → initial model → class3d → select → extract → refine3d → mask → postprocess → fit, each in its
    RELION job directory with a report; the refinement's reported resolution is honest against the truth."""
    res = run_demo(tmp_path / "demo", n_particles=600, seed=0, quick=True)
    project = tmp_path / "demo"
    for job in ("Import/job001", "InitialModel/job002", "Class3D/job003", "Select/job004", "Extract/job005",
                "Refine3D/job006", "MaskCreate/job007", "PostProcess/job008"):
        assert (project / job / "report.html").exists(), job
    assert (project / "PostProcess/job008/postprocess.star").exists()
    assert res["purity"] > 0.8
    assert res["refine3d_fsc05"] < 20.0  # Å, the refined map against the truth
    # the half maps' FSC 0.143 stands for the map's FSC 0.5 against the truth: not more than 20 % finer
    assert res["refine3d_reported"] >= 0.8 * res["refine3d_fsc05"], (res["refine3d_reported"], res["refine3d_fsc05"])
    assert res["postprocess_resolution"] < 20.0 and res["bfactor"] < 0
    assert res["hand"] in ("correct", "mirrored") and res["fit_correlation"] > 0.8
