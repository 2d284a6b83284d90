#!/usr/bin/env bash
# Set up spa3d in ./.venv on a machine with Python 3.11 (and apt for RELION).
#
#   bash scripts/setup.sh            # package + test tools
#   bash scripts/setup.sh --relion   # also RELION 3.1 and Chromium (Debian packages): the tests' oracle
#                                    # and the browser the report test opens report.html in
#
# On a machine without an NVIDIA GPU the CPU build of torch 2.13.0 is
# installed (never the CUDA wheels); with one, the CUDA build. Set
# SPA3D_TORCH_INDEX to a package index URL to take torch from there.
set -euo pipefail
cd "$(dirname "$0")/.."

want_relion=0
for a in "$@"; do [ "$a" = "--relion" ] && want_relion=1; done

if [ "$want_relion" = 1 ]; then
    need=()
    command -v relion_project >/dev/null 2>&1 || need+=(relion)
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    if [ ${#need[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi

PY=python3.11
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    index=()
    [ -n "${SPA3D_TORCH_INDEX:-}" ] && index=(--index-url "$SPA3D_TORCH_INDEX")
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        $PIP install -q "${index[@]}" "torch==2.13.0"          # CUDA build
    else
        # the CPU build: a local +cpu wheel when one is offered, else the CPU index given above
        $PIP install -q "${index[@]}" "torch==2.13.0+cpu" 2>/dev/null || $PIP install -q "${index[@]}" "torch==2.13.0"
    fi
fi
$PIP install -q -e ".[test]"
.venv/bin/python -c "import spa3d, torch; from spa3d.kernels import have_compiled_kernels as k; \
print(f'spa3d {spa3d.__version__} ready (torch {torch.__version__}, compiled kernels: {k()})')"
