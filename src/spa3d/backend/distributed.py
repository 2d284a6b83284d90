"""Multi-worker execution with Dask (``--workers N`` or ``--dask-scheduler tcp://HOST:PORT``).

An iteration's E-step is a map over chunks of particles and its M-step a sum
of fixed-size accumulators: chunks go to Dask workers, each streams its
particles from disk and returns its accumulators, and the job adds them up in
chunk order. Nothing is started unless asked for: the default stays in
process.

``--workers N`` starts a local cluster of N worker processes with one thread
each (torch's threads inside a worker are set to ``threads`` per worker, 1 by
default). ``--dask-scheduler`` connects to a running scheduler, e.g. one made
by dask-jobqueue's SLURMCluster or PBSCluster; every worker must be able to
import spa3d and read the particle stacks at the same paths.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger("spa3d")

#: peak resident memory (KiB) of the busiest worker of the last cluster closed (for benchmarks)
last_worker_peak_kib = 0


def _peak_rss_kib() -> int:
    """Peak resident memory of this process since it started (VmHWM; getrusage's maxrss would include the
    parent's peak, which Linux carries over fork and exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class DaskCluster:
    """A dask.distributed client with the chunking policy of spa3d's jobs."""

    def __init__(self, workers: int = 0, scheduler: str | None = None, threads_per_worker: int = 1):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:  # pragma: no cover - dask is a declared dependency of the test/dask extras
            from spa3d.errors import InputError

            raise InputError(None, "--workers / --dask-scheduler need dask[distributed] (pip install 'spa3d[dask]')") from None
        self._local = None
        if scheduler:
            self.client = Client(scheduler)
        else:
            self._local = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.WARNING)
            self.client = Client(self._local)
        self.threads = int(threads_per_worker)
        n = len(self.client.scheduler_info().get("workers", {}))
        self.n_workers = max(1, n)
        self.n_chunks = self.n_workers
        log.info(f"dask: {self.n_workers} worker(s) at {self.client.scheduler.address}")

    def map(self, fn, tasks: list) -> list:
        """``[fn(t) for t in tasks]`` on the workers, results in task order."""
        futures = [self.client.submit(fn, t, pure=False) for t in tasks]
        return self.client.gather(futures)

    def close(self) -> None:
        global last_worker_peak_kib
        try:
            peaks = self.client.run(_peak_rss_kib)
            last_worker_peak_kib = max(peaks.values()) if peaks else 0
            log.info(f"dask: peak memory per worker {last_worker_peak_kib / 1024:.0f} MiB")
        except Exception:  # pragma: no cover - a remote cluster may refuse client.run
            pass
        self.client.close()
        if self._local is not None:
            self._local.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def cluster_for(o):
    """The Dask cluster a job's options ask for (``o.workers`` local processes or ``o.dask_scheduler``), closed at
    the end; None (run in this process) when they ask for none."""
    cluster = DaskCluster(o.workers, o.dask_scheduler, o.threads or 1) if (o.workers or o.dask_scheduler) else None
    try:
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
