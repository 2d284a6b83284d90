"""Pick the torch device and thread count for a job."""

from __future__ import annotations

import os

import torch

from spa3d.errors import InputError


def select_device(name: str | None = None, threads: int | None = None) -> torch.device:
    """Return the torch device for ``name`` ('cpu', 'cuda', 'cuda:N' or None = best).

    ``threads`` sets torch's intra-op CPU threads (default: all cores).
    """
    if threads:
        torch.set_num_threads(int(threads))
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "--device cuda was asked for but no CUDA GPU is available to torch")
    return dev


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device`` in bytes (CPU: available system memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
