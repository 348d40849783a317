#!/usr/bin/env bash
# Wheels for running the benchmarks on a GPU machine that has Python 3.12 and torch but no network: the packages
# such a machine lacks, at the versions this checkout is tested with, downloaded here into .whl/ (git-ignored).
# Usage: bash benchmarks/gpu_wheels.sh [python with this project installed, default .venv/bin/python]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest .whl \
    "diffusers==$(version diffusers)" "peft==$(version peft)" "open_clip_torch==$(version open_clip_torch)" \
    "ftfy==$(version ftfy)" "wcwidth==$(version wcwidth)"
ls -l .whl
