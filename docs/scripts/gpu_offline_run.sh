#!/bin/bash
# The GPU checks of ../shared/gpu_truth_run.sh on a machine with no package index (an air-gapped GPU node):
# installs this checkout over the machine's own torch and triton, with the missing pure-Python dependencies
# from a folder of wheels, then runs every check under its own time limit, so a short lease still brings back
# each log. Run from the repository root:
#
#     WHEELS=.whl BUDGET=540 bash docs/scripts/gpu_offline_run.sh
#
# WHEELS: wheels for what the machine lacks (made elsewhere with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux2014_x86_64 -d .whl diffusers ftfy wcwidth importlib-metadata
# imageio-ffmpeg`); BUDGET: seconds for the whole run (each step gets at most its limit and what is left).
# Logs: $OUT/all.log and $OUT/summary.txt (default ./gpu_out); the bench report in $OUT/gpu_report/, the self-check
# verdicts in $OUT/selftest.json, each generate's sidecar as $OUT/gen_*.json, SLA's parts in $OUT/sla_run.json.
set -u
O=${OUT:-$PWD/gpu_out}; W=${WHEELS:-.whl}; mkdir -p "$O/gpu_report"
T0=$(date +%s); END=$((T0 + ${BUDGET:-540}))
export DIT_ACCEL_CACHE=${DIT_ACCEL_CACHE:-/tmp/dit_accel_cache} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
L=$O/all.log
step() {  # step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left), log it, one summary line
    local name=$1 limit=$2 left; shift 2
    left=$((END - $(date +%s) - 15)); [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then echo "rc=skip $name (no time left)" | tee -a "$O/summary.txt"; return; fi
    echo "=== $name (limit ${limit}s) $*" >>"$L"
    local s=$(date +%s); timeout "$limit" "$@" >>"$L" 2>&1; local rc=$?
    echo "rc=$rc $name $(( $(date +%s) - s ))s" | tee -a "$L" "$O/summary.txt"
}
{ nvidia-smi; git rev-parse HEAD 2>/dev/null; which python3; } >>"$L" 2>&1
step install 120 python3 -m pip install -q --no-index --no-deps --no-build-isolation "$W"/*.whl -e .
python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__,
torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" 2>&1 | tee -a "$L" "$O/summary.txt"
step generate 100 dit-accel generate --device cuda --out /tmp/gen_fp32.mp4
cp /tmp/gen_fp32.mp4.json "$O/gen_fp32.json" 2>/dev/null
step generate_bf16 60 dit-accel generate --device cuda --dtype bfloat16 --out /tmp/gen_bf16.mp4
cp /tmp/gen_bf16.mp4.json "$O/gen_bf16.json" 2>/dev/null
step selftest 360 sh -c "dit-accel selftest --device cuda --json > '$O/selftest.json'"
step fp32_probe 60 python3 -c "
import torch
from dit_accel.kernels import selfcheck as c
for v, d in [('block_sparse.triton.fwd', 32), ('block_sparse.triton.fwd', 128), ('block_sparse.triton.bwd', 128),
             ('dense.triton.fwd', 128)]:
    e = c.verdict(v, 'cuda', torch.float32, {'head_dim': d, 'block_q': 64, 'block_k': 64}, fresh=True)
    print(v, d, e['ok'], e['error'], e['tolerance'])"
step pytest_gpu 300 python3 -m pytest -m gpu -o addopts= -p no:cacheprovider -q -rfE --timeout 120 --durations=15 tests
step bench_gpu 300 dit-accel bench gpu --no-pytest --budget 280 --out "$O/gpu_report"
step sla_parts 150 env OUT="$O" PYTHONPATH=. python3 docs/scripts/sla_gpu_parts.py run --configs --bwd-configs --profile
step info 30 dit-accel info
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$O/summary.txt"
