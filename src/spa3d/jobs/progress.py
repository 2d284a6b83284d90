"""Progress lines on the terminal (and in the job's log): items/s and time left."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("spa3d")


def setup_logging(logfile=None, quiet: bool = False) -> None:
    """Log INFO to stderr (only warnings when quiet) and to ``logfile`` when given."""
    root = logging.getLogger("spa3d")
    root.setLevel(logging.INFO)
    root._spa3d_configured = True
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(message)s"))
    h.setLevel(logging.WARNING if quiet else logging.INFO)
    root.addHandler(h)
    if logfile:
        fh = logging.FileHandler(logfile)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        root.addHandler(fh)


def add_log_file(path) -> None:
    """Also write the log to ``path`` (the job's run.log), replacing an earlier log file."""
    root = logging.getLogger("spa3d")
    root.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers) \
            and not getattr(root, "_spa3d_configured", False):
        setup_logging()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    root.addHandler(fh)


class Progress:
    """Report ``done / total`` items with rate and estimated time left, at most every ``every`` s."""

    def __init__(self, total: int, what: str = "particles", label: str = "", every: float = 2.0):
        self.total, self.what, self.label, self.every = total, what, label, every
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / max(rate, 1e-9)
            log.info(f"{self.label}{self.done}/{self.total} {self.what}, {rate:,.0f} {self.what}/s, {left:,.0f} s left")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class EStepRate:
    """Arithmetic rate of the E-step: its products' floating-point operations per second of E-step wall time.

    ``add`` one E-step (flops, seconds, poses scored, particles); ``line`` is that E-step's rate and poses
    per particle, ``summary`` the totals of the run (written as the last lines of run.log, where
    benchmarks read them).
    """

    def __init__(self):
        self.flops = self.seconds = self.poses = self.particles = 0.0
        self._last = (0.0, 0.0, 0.0, 0.0)

    def add(self, flops: float, seconds: float, poses: float, particles: int) -> None:
        self._last = (flops, seconds, poses, particles)
        self.flops += flops
        self.seconds += seconds
        self.poses += poses
        self.particles += particles

    @staticmethod
    def _text(flops, seconds, poses, particles) -> str:
        return (f"E-step {flops / max(seconds, 1e-9) / 1e9:.1f} GFLOP/s, "
                f"{poses / max(particles, 1):,.0f} poses per particle")

    def line(self) -> str:
        return self._text(*self._last)

    def summary(self) -> str:
        return (f"E-step: {self.flops / 1e9:.1f} GFLOP in {self.seconds:.1f} s = "
                f"{self.flops / max(self.seconds, 1e-9) / 1e9:.1f} GFLOP/s; "
                f"{self.poses / max(self.particles, 1):,.0f} poses scored per particle and iteration")
