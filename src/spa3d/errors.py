"""Errors a user can act on.

Every problem with a user's input is raised as :class:`InputError` naming the
file and the problem; the command line prints it as one line and exits non-zero.
"""

from __future__ import annotations

import os


class InputError(Exception):
    """Bad user input: ``InputError(path, problem)`` prints as ``path: problem``."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
