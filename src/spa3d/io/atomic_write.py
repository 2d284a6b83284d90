"""Write outputs under a temporary name and rename them into place.

A job that fails half-way never leaves a half-written output: the final name
appears only once the file is complete (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The temporary file keeps the suffix of ``path`` (libraries such as mrcfile
    and starfile look at it). On an exception the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create directory ``path`` if needed and check that files can be written there (before hours of work).

    Raises :class:`spa3d.errors.InputError` naming the directory and the reason.
    """
    from spa3d.errors import InputError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".spa3d_probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(path, f"cannot write in this directory ({exc.strerror or exc})") from None
    return path
