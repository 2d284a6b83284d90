"""Resuming iterative jobs (class3d, initial-model) with ``--continue``.

Every iteration a job writes records *all* of the run's options in its
run_itNNN_optimiser.star (block ``optimiser_spa3d_options``: one row per
option, its value as JSON), beside RELION's ``optimiser_general``.
``--continue run_itNNN_optimiser.star`` (or ``--continue JOBDIR``: the last
complete iteration there) restores them, so the resumed job is the same job:

- an option not given again takes the recorded value (never the command
  line's default);
- an option given again with the same value changes nothing;
- an option given with another value (``--iter 30`` to run longer,
  ``--healpix-order 3`` to search finer, as RELION allows) is applied, and
  the log says so in one line;
- a change that cannot work (the number of classes, the particles) is an
  :class:`InputError`.

Where the job runs (``device``, ``dask_scheduler``) is not part of the run:
it is never restored, so a run started on a GPU can be resumed on a CPU.

An iteration's files appear together: they are written under temporary
names in a hidden staging directory and renamed into place at the end, the
optimiser.star last, so a run_itNNN_optimiser.star is only ever there when
everything of iteration NNN is (:class:`IterationFiles`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

from spa3d.errors import InputError

log = logging.getLogger("spa3d")

OPTIONS_BLOCK = "optimiser_spa3d_options"
#: where a job runs, not what it computes: not restored by --continue
NOT_RESTORED = frozenset({"device", "dask_scheduler", "dry_run", "estimate"})


def flat_options(o) -> dict:
    """The fields of an options dataclass as {name: value}, nested dataclasses as 'outer.inner' keys."""
    out = {}
    for f in dataclasses.fields(o):
        v = getattr(o, f.name)
        if dataclasses.is_dataclass(v):
            out.update({f"{f.name}.{k}": x for k, x in flat_options(v).items()})
        else:
            out[f.name] = v
    return out


def _set_flat(o, key: str, value):
    """A copy of ``o`` with the (possibly dotted) field ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    if rest:
        return dataclasses.replace(o, **{head: _set_flat(getattr(o, head), rest, value)})
    return dataclasses.replace(o, **{head: value})


def _token(value) -> str:
    """A value as one whitespace-free STAR token: compact JSON, spaces inside strings escaped."""
    return json.dumps(value, separators=(",", ":")).replace(" ", "\\u0020")


def append_options_block(path: str | os.PathLike, o, extra: dict | None = None) -> None:
    """Append to a STAR file the block that records a run's options (and ``extra`` facts, e.g. the input file).

    One row per option: its name and its value as JSON (exact: floats keep all their digits).
    """
    items = {**flat_options(o), **(extra or {})}
    rows = "\n".join(f"{k}\t{_token(v)}" for k, v in items.items())
    with open(path, "a") as fh:
        fh.write(f"\n\ndata_{OPTIONS_BLOCK}\n\nloop_\n_spa3dOption #1\n_spa3dValue #2\n{rows}\n\n")


def read_recorded(optimiser: str | os.PathLike) -> dict:
    """{option: value} recorded in an optimiser.star (empty when it was written before options were recorded)."""
    try:
        lines = Path(optimiser).read_text().splitlines()
    except OSError as exc:
        raise InputError(optimiser, f"cannot read ({exc.strerror})") from None
    out, inside, in_loop = {}, False, False
    for ln in lines:
        t = ln.strip()
        if t.startswith("data_"):
            if inside:
                break
            inside = t == f"data_{OPTIONS_BLOCK}"
            continue
        if not inside or not t or t.startswith("#") or t == "loop_":
            continue
        if t.startswith("_"):
            in_loop = True
            continue
        if in_loop:
            key, _, value = t.partition("\t") if "\t" in t else t.partition(" ")
            try:
                out[key.strip()] = json.loads(value.strip())
            except json.JSONDecodeError:
                raise InputError(optimiser, f"unreadable value of option {key.strip()} in {OPTIONS_BLOCK}") from None
    return out


def restore_options(o, given: set[str] | None, recorded: dict, fixed: set[str], source: str | os.PathLike):
    """The options of a resumed run: ``recorded`` ones, except those in ``given`` (taken from ``o``).

    ``given`` names the options the user gave again (dotted names for nested
    options); None means every option of ``o`` was given (a call from Python
    that spells out the whole run). A given option in ``fixed`` whose value
    differs from the recorded one is an error; any other difference is
    applied and logged.
    """
    current = flat_options(o)
    given = set(current) if given is None else set(given)
    out = o
    for key, now in current.items():
        if key not in recorded or key in NOT_RESTORED:
            continue
        was = recorded[key]
        if key in given and now is None:  # None means "not set" (e.g. the batch size: from free memory)
            given = given - {key}
        if key in given:
            if _same(now, was):
                continue
            if key in fixed:
                raise InputError(source, f"--continue cannot change {key} ({was} in the run, {now} given)")
            log.info(f"--continue: {key} changed from {was} to {now}")
        else:
            out = _set_flat(out, key, tuple(was) if isinstance(now, tuple) else was)
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return list(a or []) == list(b or [])
    return a == b


_OPTIMISER = re.compile(r"run_it(\d+)_optimiser\.star$")


def last_complete_iteration(job_dir: str | os.PathLike) -> Path:
    """The optimiser.star of the last iteration of ``job_dir`` whose files are all there."""
    job = Path(job_dir)
    if not job.is_dir():
        raise InputError(job, "--continue: no such job directory")
    found = sorted(((int(m.group(1)), p) for p in job.glob("run_it*_optimiser.star") if (m := _OPTIMISER.search(p.name))),
                   reverse=True)
    for _, path in found:
        state = state_file(path)
        if state is None or state.exists():
            return path
    raise InputError(job, "--continue: the job directory holds no complete iteration (run_itNNN_optimiser.star)")


def state_file(optimiser: str | os.PathLike) -> Path | None:
    """The spa3d state file an optimiser.star names (class3d's, refine3d's or the SGD's), or None."""
    from spa3d.io.star import read_star

    gen = read_star(optimiser).get("optimiser_general")
    if gen is None:
        return None
    for label in ("rlnClass3dStateFile", "rlnRefine3dStateFile", "rlnSgdStateFile"):
        if label in gen:
            p = Path(str(gen[label].iloc[0]))
            # the state file sits beside the optimiser.star (the job directory may have been moved)
            return Path(optimiser).parent / p.name
    return None


def resolve_continue(path: str | os.PathLike) -> Path:
    """``--continue`` names an optimiser.star or a job directory (then its last complete iteration)."""
    p = Path(path)
    if p.is_dir():
        found = last_complete_iteration(p)
        log.info(f"--continue: {p} resumes from {found.name}")
        return found
    if not p.exists():
        raise InputError(p, "--continue: file not found")
    return p


class IterationFiles:
    """Stage one iteration's outputs and put them in place together, the optimiser.star last.

    ``files.path(final)`` gives the temporary path to write ``final`` to;
    ``files.commit()`` renames them all into place. Until then nothing of the
    iteration is visible under its final names; a crash leaves only the hidden
    staging directory, which the next run removes.
    """

    def __init__(self, job_dir: str | os.PathLike, iteration: int):
        self.job = Path(job_dir)
        self.stage = self.job / f".staging_it{iteration:03d}"
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage.mkdir(parents=True)
        self._files: list[tuple[Path, Path]] = []

    def path(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        tmp = self.stage / final.name
        self._files.append((tmp, final))
        return tmp

    def commit(self) -> None:
        last = [f for f in self._files if f[1].name.endswith("_optimiser.star")]
        for tmp, final in [f for f in self._files if f not in last] + last:
            os.replace(tmp, final)
        shutil.rmtree(self.stage, ignore_errors=True)

    def __enter__(self) -> "IterationFiles":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            shutil.rmtree(self.stage, ignore_errors=True)


def remove_stale_staging(job_dir: str | os.PathLike) -> None:
    """Remove staging directories a killed run left behind."""
    for p in Path(job_dir).glob(".staging_it*"):
        shutil.rmtree(p, ignore_errors=True)


def prepare_continue(o, continue_from: str | os.PathLike, job_dir: str | os.PathLike, star: str | None,
                     given: set[str] | None, fixed: set[str]):
    """What a resumed job starts from: (the optimiser.star, the run's options, its input STAR file or None).

    Opens the job's run.log first, so that the changes of options are logged
    there; ``star`` (the particles given again, if any) must be the run's.
    """
    from spa3d.jobs.progress import add_log_file

    Path(job_dir).mkdir(parents=True, exist_ok=True)
    add_log_file(Path(job_dir) / "run.log")
    optimiser = resolve_continue(continue_from)
    recorded = read_recorded(optimiser)
    o = restore_options(o, given, recorded, fixed, optimiser)
    first = recorded.get("input_star")
    if star and first and Path(star).resolve() != Path(first):
        raise InputError(star, f"--continue: the run's particles are {first}; they cannot change")
    return str(optimiser), o, first


def start_job(job_dir: str | os.PathLike, o):
    """Open an iterative job's directory: writable, run.log (not for a dry run), no stale staging; the torch device
    the options ask for. Returns (job directory, device)."""
    from spa3d.backend.device import select_device
    from spa3d.io.atomic_write import ensure_writable_dir
    from spa3d.jobs.progress import add_log_file

    job = Path(job_dir)
    if not o.dry_run:
        ensure_writable_dir(job)
        add_log_file(job / "run.log")
    device = select_device(o.device, o.threads)
    remove_stale_staging(job)
    return job, device


def load_continued(continue_from: str | os.PathLike, load_state, input_label: str):
    """What ``--continue`` resumes: (state read by ``load_state`` from the file the optimiser.star names, the
    particle STAR file the run was given, read from the optimiser.star's ``input_label``)."""
    from spa3d.io.star import read_star

    opt = read_star(continue_from)
    gen = opt["optimiser_general"] if "optimiser_general" in opt else opt[next(iter(opt))]
    sfile = state_file(continue_from)
    if sfile is None or not sfile.exists():
        raise InputError(continue_from, f"state file {sfile} not found")
    return load_state(sfile), str(gen[input_label].iloc[0])
