"""Where a class3d run's time goes on a GPU: cProfile of the host side and torch.profiler of the device side.

Simulates ``--n`` particles of 1TII (box ``--box``), then runs ``spa3d
class3d`` (K=4, T=4, 7.5°, offsets 5/1, 50 Å, CTF, zero mask) in this
process twice: under cProfile (the spa3d functions by cumulative time; time
waiting for the GPU shows in the function that synchronises), then under
torch.profiler (the operators by device and host time).

    python benchmarks/gpu_profile.py [--device cuda] [--n 2000] [--box 128] [--iter 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--iter", type=int, default=3)
    ap.add_argument("--workdir", default="gpu_profile_work")
    a = ap.parse_args()

    import torch

    from spa3d.cli.main import main as spa3d
    from spa3d.data import default_structure

    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    apix = 1.5 * 128 / a.box
    spa3d(["simulate", "--i", default_structure(), "--n", str(a.n), "--box", str(a.box), "--angpix", f"{apix:.3f}",
           "--snr", "0.05", "--seed", "1", "--o", str(work / "Sim"), "--quiet"])
    args = ["class3d", "--i", str(work / "Sim/particles.star"), "--ref", str(work / "Sim/truth_class001.mrc"),
            "--K", "4", "--tau2-fudge", "4", "--iter", str(a.iter), "--angular-sampling", "7.5", "--offset-range", "5",
            "--offset-step", "1", "--ini-high", "50", "--ctf", "--zero-mask", "--firstiter-cc", "--particle-diameter",
            "150", "--seed", "1", "--device", a.device, "--quiet"]

    def job(tag: str) -> list[str]:
        out = work / f"Class3D_{tag}"
        shutil.rmtree(out, ignore_errors=True)
        return [*args, "--o", str(out)]

    spa3d(job("warm"))  # CUDA initialisation, kernels' first compilation
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    spa3d(job("cprofile"))
    prof.disable()
    print(f"cProfile run: {time.perf_counter() - t:.1f} s")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats("spa3d", 45)
    print(s.getvalue()[-9000:])

    acts = [torch.profiler.ProfilerActivity.CPU]
    if a.device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as p:
        spa3d(job("torch"))
    ka = p.key_averages()
    for key in ("self_cuda_time_total", "self_device_time_total", "self_cpu_time_total"):
        try:
            print(f"--- by {key}")
            print(ka.table(sort_by=key, row_limit=25, max_name_column_width=60))
        except Exception as exc:  # the key's name differs between torch versions
            print(f"({key}: {exc})")


if __name__ == "__main__":
    main()
