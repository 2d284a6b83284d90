"""RELION project directories: ``<Type>/jobNNN/``, note.txt, default_pipeline.star.

With ``--project DIR`` a job runs inside the project directory (as RELION's
programs do: paths in STAR files and on the command line are relative to it)
and writes into the next free ``<Type>/jobNNN/``. The pipeline record
``default_pipeline.star`` is RELION 3.1's (read by its GUI and by
``relion_pipeliner``):

- data_pipeline_general: rlnPipeLineJobCounter (the next job number);
- data_pipeline_processes: rlnPipeLineProcessName ("Class3D/job002/"),
  rlnPipeLineProcessAlias ("None"), rlnPipeLineProcessType (RELION's
  process numbers: Import 0, Extract 5, Select 7, Class3D 9, Refine3D 10,
  MaskCreate 12, PostProcess 15, InitialModel 18, External 99) and rlnPipeLineProcessStatus (running 0,
  finished 2, failed 3);
- data_pipeline_nodes: rlnPipeLineNodeName, rlnPipeLineNodeType (RELION's
  node numbers: micrographs 1, particles 3, 3D reference 6, mask 7,
  model 8, half map 10, final map 11, post-process 14);
- data_pipeline_input_edges (node → process) and
  data_pipeline_output_edges (process → node).

A job directory gets note.txt (the command, as RELION writes it) and, at the
end, RELION_JOB_EXIT_SUCCESS or RELION_JOB_EXIT_FAILURE, which RELION's GUI
and relion_pipeliner use to tell how a job ended. A job that stops on bad
input (one clear error line) leaves no job directory and no pipeline entry.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

from spa3d.errors import InputError
from spa3d.io.atomic_write import atomic_path

PROCESS_TYPES = {"Import": 0, "Extract": 5, "Select": 7, "Class3D": 9, "Refine3D": 10, "MaskCreate": 12,
                 "PostProcess": 15, "InitialModel": 18, "External": 99}
NODE_MICS, NODE_PARTICLES, NODE_3DREF, NODE_MASK, NODE_MODEL, NODE_HALFMAP, NODE_FINALMAP, NODE_POST = (
    1, 3, 6, 7, 8, 10, 11, 14)
RUNNING, FINISHED, FAILED = 0, 2, 3
PIPELINE = "default_pipeline.star"


class Pipeline:
    """The pipeline record of a project directory (read, changed, written back atomically)."""

    _INT_COLUMNS = ("rlnPipeLineProcessType", "rlnPipeLineProcessStatus", "rlnPipeLineNodeType")

    def __init__(self, project: str | Path):
        self.project = Path(project)
        self.counter = 1
        self.processes = pd.DataFrame(columns=["rlnPipeLineProcessName", "rlnPipeLineProcessAlias",
                                               "rlnPipeLineProcessType", "rlnPipeLineProcessStatus"])
        self.nodes = pd.DataFrame(columns=["rlnPipeLineNodeName", "rlnPipeLineNodeType"])
        self.inputs = pd.DataFrame(columns=["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"])
        self.outputs = pd.DataFrame(columns=["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"])
        path = self.project / PIPELINE
        if path.exists():
            self._read(path)

    def _read(self, path: Path) -> None:
        from spa3d.io.star import read_star

        b = read_star(path)
        gen = b.get("pipeline_general")
        if gen is not None and "rlnPipeLineJobCounter" in gen:
            self.counter = int(gen["rlnPipeLineJobCounter"].iloc[0])
        for attr, name in (("processes", "pipeline_processes"), ("nodes", "pipeline_nodes"),
                           ("inputs", "pipeline_input_edges"), ("outputs", "pipeline_output_edges")):
            if name in b:
                df = b[name].reset_index(drop=True).astype(object)
                for col in df.columns:
                    df[col] = [int(v) for v in df[col]] if col in self._INT_COLUMNS else [str(v) for v in df[col]]
                setattr(self, attr, df)

    def write(self) -> None:
        blocks = {"pipeline_general": {"rlnPipeLineJobCounter": int(self.counter)},
                  "pipeline_processes": self.processes}
        for name, df in (("pipeline_nodes", self.nodes), ("pipeline_input_edges", self.inputs),
                         ("pipeline_output_edges", self.outputs)):
            if len(df):
                blocks[name] = df
        path = self.project / PIPELINE
        import starfile

        with atomic_path(path) as tmp:
            starfile.write(blocks, tmp)
            lines = [ln for ln in tmp.read_text().splitlines() if not ln.startswith("# Created by the starfile")]
            tmp.write_text("\n# version 30001\n" + "\n".join(lines) + "\n")

    def next_job_number(self) -> int:
        used = [int(m.group(1)) for n in self.processes["rlnPipeLineProcessName"]
                if (m := re.search(r"job(\d+)/?$", str(n)))]
        return max([self.counter, *(u + 1 for u in used)])

    def add_process(self, name: str, ptype: int, status: int = RUNNING) -> None:
        self.processes = pd.concat([self.processes, pd.DataFrame([{
            "rlnPipeLineProcessName": name, "rlnPipeLineProcessAlias": "None",
            "rlnPipeLineProcessType": ptype, "rlnPipeLineProcessStatus": status}])], ignore_index=True)

    def remove_process(self, name: str) -> None:
        self.processes = self.processes[self.processes["rlnPipeLineProcessName"] != name].reset_index(drop=True)

    def set_status(self, name: str, status: int) -> None:
        p = self.processes.astype(object)
        p.loc[p["rlnPipeLineProcessName"] == name, "rlnPipeLineProcessStatus"] = int(status)
        self.processes = p

    def add_node(self, name: str, ntype: int) -> None:
        if name not in set(self.nodes["rlnPipeLineNodeName"]):
            self.nodes = pd.concat([self.nodes, pd.DataFrame([{"rlnPipeLineNodeName": name,
                                                               "rlnPipeLineNodeType": ntype}])], ignore_index=True)

    def add_edges(self, process: str, inputs: list[tuple[str, int]], outputs: list[tuple[str, int]]) -> None:
        have_in = set(zip(self.inputs["rlnPipeLineEdgeFromNode"], self.inputs["rlnPipeLineEdgeProcess"]))
        have_out = set(zip(self.outputs["rlnPipeLineEdgeProcess"], self.outputs["rlnPipeLineEdgeToNode"]))
        inputs = [(n, t) for n, t in inputs if (n, process) not in have_in]
        outputs = [(n, t) for n, t in outputs if (process, n) not in have_out]
        for name, ntype in inputs:
            self.add_node(name, ntype)
            self.inputs = pd.concat([self.inputs, pd.DataFrame([{"rlnPipeLineEdgeFromNode": name,
                                                                 "rlnPipeLineEdgeProcess": process}])], ignore_index=True)
        for name, ntype in outputs:
            self.add_node(name, ntype)
            self.outputs = pd.concat([self.outputs, pd.DataFrame([{"rlnPipeLineEdgeProcess": process,
                                                                   "rlnPipeLineEdgeToNode": name}])], ignore_index=True)


def _relative(path: str | Path, project: Path) -> str:
    """A path as the pipeline names it: relative to the project directory."""
    p = Path(path)
    if p.is_absolute():
        with contextlib.suppress(ValueError):
            return p.resolve().relative_to(project.resolve()).as_posix()
        return p.as_posix()
    return p.as_posix()


@contextlib.contextmanager
def project_job(project: str | Path, job_type: str, command: list[str] | None = None,
                continue_job: str | Path | None = None):
    """Run a job in the next ``<job_type>/jobNNN/`` of ``project`` (working directory = project).

    Yields a :class:`JobRecord`; the job fills ``record.inputs`` / ``record.outputs``
    with (path, node type) pairs. On success the pipeline marks the job
    finished with its edges; on a crash, failed; on bad input
    (:class:`InputError`) the job directory and its pipeline entry are removed.
    With ``continue_job`` (a job directory of the project, relative to it or
    absolute) the job runs again in that directory, as RELION's "Continue":
    it is marked running, note.txt gets the new command, and bad input leaves
    the directory and its former status as they were.
    """
    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    if continue_job is not None and Path(continue_job).is_absolute():
        continue_job = _relative(continue_job, project)
    os.chdir(project)
    try:
        pipe = Pipeline(".")
        cmd = command if command is not None else ["spa3d", *sys.argv[1:]]
        note = (f" ++++ Executing new job on {time.strftime('%a %b %d %H:%M:%S %Y')}\n"
                f" ++++ with the following command(s): \n{shlex.join(cmd)}\n ++++ \n")
        if continue_job is not None:
            job_dir = Path(continue_job)
            name = job_dir.as_posix().rstrip("/") + "/"
            known = pipe.processes["rlnPipeLineProcessName"].astype(str)
            if not job_dir.is_dir() or name not in set(known):
                raise InputError(continue_job, f"--continue: not a job of the project {project}")
            before = int(pipe.processes.loc[known == name, "rlnPipeLineProcessStatus"].iloc[0])
            for marker in ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE"):
                with contextlib.suppress(FileNotFoundError):
                    (job_dir / marker).unlink()
            with open(job_dir / "note.txt", "a") as fh:
                fh.write(note)
            pipe.set_status(name, RUNNING)
            pipe.write()
        else:
            number = pipe.next_job_number()
            name = f"{job_type}/job{number:03d}/"
            job_dir = Path(name)
            job_dir.mkdir(parents=True, exist_ok=False)
            (job_dir / "note.txt").write_text(note)
            pipe.counter = number + 1
            pipe.add_process(name, PROCESS_TYPES.get(job_type, PROCESS_TYPES["External"]))
            pipe.write()
        record = JobRecord(job_dir, project)
        try:
            yield record
        except InputError:
            pipe = Pipeline(".")
            if continue_job is not None:
                pipe.set_status(name, before)
                pipe.write()
                raise
            import shutil

            shutil.rmtree(job_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                job_dir.parent.rmdir()
            pipe.remove_process(name)
            pipe.write()
            raise
        except BaseException:
            (job_dir / "RELION_JOB_EXIT_FAILURE").touch()
            pipe = Pipeline(".")
            pipe.set_status(name, FAILED)
            pipe.write()
            raise
        pipe = Pipeline(".")
        pipe.add_edges(name, [(_relative(p, Path.cwd()), t) for p, t in record.inputs if p],
                       [(_relative(p, Path.cwd()), t) for p, t in record.outputs])
        pipe.set_status(name, FINISHED)
        pipe.write()
        (job_dir / "RELION_JOB_EXIT_SUCCESS").touch()
    finally:
        os.chdir(cwd)


class JobRecord:
    """What a job tells the pipeline: its directory (relative to the project), inputs and outputs."""

    def __init__(self, job_dir: Path, project: Path):
        self.job_dir = job_dir
        self.project = project
        self.inputs: list[tuple[str, int]] = []
        self.outputs: list[tuple[str, int]] = []


def job_nodes(job: str, args, job_dir: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(inputs, outputs) of a finished job, for the pipeline's edges."""
    job_dir = Path(job_dir)
    if job == "simulate":
        outs = [(str(job_dir / "particles.star"), NODE_PARTICLES)]
        if (job_dir / "micrographs_ctf.star").exists():
            outs.append((str(job_dir / "micrographs_ctf.star"), NODE_MICS))
        return [], outs
    if job == "initial-model":
        return [(args.i, NODE_PARTICLES)], iterative_outputs(job_dir)
    if job == "class3d":
        return [(args.i, NODE_PARTICLES), (args.ref, NODE_3DREF)], iterative_outputs(job_dir)
    if job == "refine3d":
        outs = [(str(job_dir / f), t) for f, t in (("run_data.star", NODE_PARTICLES), ("run_model.star", NODE_MODEL),
                                                     ("run_class001.mrc", NODE_3DREF),
                                                     ("run_half1_class001_unfil.mrc", NODE_HALFMAP))
                if (job_dir / f).exists()]
        return [(args.i, NODE_PARTICLES), (args.ref, NODE_3DREF)], outs
    if job == "mask":
        return [(args.i, NODE_3DREF)], [(str(job_dir / "mask.mrc"), NODE_MASK)]
    if job == "postprocess":
        ins = [(args.i, NODE_HALFMAP)] + ([(args.mask, NODE_MASK)] if args.mask else [])
        outs = [(str(job_dir / "postprocess.mrc"), NODE_FINALMAP), (str(job_dir / "postprocess.star"), NODE_POST)]
        if args.mask:
            outs.append((str(job_dir / "postprocess_masked.mrc"), NODE_FINALMAP))
        return ins, outs
    if job == "select":
        return [(args.i, NODE_MODEL)], [(str(job_dir / "particles.star"), NODE_PARTICLES)]
    if job == "extract":
        return [(args.mics, NODE_MICS), (args.reextract, NODE_PARTICLES)], [(str(job_dir / "particles.star"), NODE_PARTICLES)]
    return [], []


def iterative_outputs(job_dir: Path) -> list[tuple[str, int]]:
    """Output nodes of an iterative job (initial model, class3d): the last iteration's data, model and maps."""
    its = sorted(int(m.group(1)) for p in job_dir.glob("run_it*_model.star")
                 if (m := re.search(r"run_it(\d+)_model\.star$", p.name)))
    if not its:
        return []
    last = its[-1]
    out = [(str(job_dir / f"run_it{last:03d}_data.star"), NODE_PARTICLES),
           (str(job_dir / f"run_it{last:03d}_model.star"), NODE_MODEL)]
    out += [(str(p), NODE_3DREF) for p in sorted(job_dir.glob(f"run_it{last:03d}_class*.mrc"))]
    return out
