#!/usr/bin/env bash
# The benchmarks that have a GPU side, on a GPU machine without network, in one command that ends within a time
# budget: installs the wheels from .whl/ (made by benchmarks/gpu_wheels.sh) beside the machine's own torch, runs
# the tests that use the GPU (CUDA writes bit-identical to the CPU's, fp16 and model CPU offload, training through
# accelerate on CUDA), then each benchmark under what is left of the budget (the most telling first), and gathers
# the tables, the JSON and the log. A step that fails or runs out of time is logged and the next one runs.
# Usage: bash benchmarks/gpu.sh [budget in seconds, default 540] [folder for summary.md, log.txt, results.tar.gz,
#        default $OUT, else benchmarks/results/gpu]
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
results=benchmarks/results/gpu
out=${2:-${OUT:-$results}}
start=$SECONDS
mkdir -p "$out" "$results"

run() {  # benchmark name, then its flags
    local left=$((budget - (SECONDS - start)))
    if [ "$left" -lt 30 ]; then
        echo "== $1: not run, the budget is spent"
        return
    fi
    echo "== $1 ${*:2} (at most ${left} s)"
    timeout "$left" python3 -m "benchmarks.$1" --device cuda --out "$results" "${@:2}" || echo "== $1: failed or out of time (exit $?)"
}

{
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/shira-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/shira-site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    python3 -c "import torch, diffusers, peft, open_clip, numba; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'numba', numba.__version__)" || exit 1
    echo "== GPU tests (at most 150 s)"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_loaders.py::test_cuda_writes_are_bit_identical_to_the_cpu \
        tests/test_loaders.py::test_cuda_fp16_and_model_cpu_offload tests/test_training.py || echo "== GPU tests: failed or out of time (exit $?)"
    run switch --repeats 9
    run exactness
    run overhead --repeats 30
    run eval --vit_h
    run training --rounds 1
    run compile
    echo "== done in $((SECONDS - start)) s"
} 2>&1 | tee "$out/log.txt"
cat "$results"/*.md > "$out/summary.md" 2>/dev/null
[ "$out" = "$results" ] || tar czf "$out/results.tar.gz" -C benchmarks/results gpu
