#!/bin/bash
# The GPU checks of ../shared/gpu_truth_run.sh on a machine with no package index (an air-gapped GPU node):
# installs this checkout over the machine's own torch and triton, with the missing Python packages from a folder
# of wheels, then runs every step under its own time limit, most needed first, so a short lease (one command of
# at most 600 s) still brings back each log. Run from the repository root:
#
#     WHEELS=.whl BUDGET=540 bash docs/scripts/gpu_offline_run.sh
#     DRY_RUN=1 bash docs/scripts/gpu_offline_run.sh          # prints each step and its limit, runs nothing
#
# WHEELS: wheels for what the machine lacks, made here with docs/scripts/gpu_wheels.sh (diffusers and its pure-
# Python needs; the vendor kernels' wheels, too large for one call, travel in parts: docs/scripts/gpu_vendor.sh).
# BUDGET: seconds for the whole run (each step gets at most its limit and what is left; a step with no time left
# says `rc=skip`). STEPS: the steps to run (default, in this order): install selftest generate wan_step
# host_profile bench_gpu pytest_gpu sla_parts info; the probes lengths_probe bwd_probe ws_probe (their answers held
# on three runs, BENCHMARKS 10), gather_probe (not run yet) and the vendor steps run only when named. For a short
# follow-up lease, narrower steps: SELFTEST_VARIANTS (names, space-separated; default every variant),
# SELFTEST_BUDGET (default 180), BENCH_SHAPES, BENCH_METHODS, BENCH_DENSITIES, BENCH_BUDGET (defaults below).
# One 600 s command does not hold every step: on the H200 (2026-11-28, cf9d9eb) install took 7 s, selftest 138,
# generate 33, wan_step 57, host_profile 33, bench_gpu 126, the three probes 37, pytest_gpu 119 and sla_parts 63. A
# 15-minute lease (the first start costs about 35 s of it) fits two calls: BUDGET=545 for the default order (up to
# bench_gpu; pytest_gpu takes what is left), then at once on the still-warm machine (it goes back after 30 s idle;
# its installs kept) STEPS="install pytest_gpu gather_probe glue info" BUDGET=280 (glue: GLUE_BASELINE=.vendor/base
# carried, `git archive a37e52e dit_accel | tar -x -C .vendor/base`), or the vendor route. The device tool empties
# its $OUT before each call: give this script OUT=/tmp/gpu_out and copy (or tar) that folder into the tool's $OUT at
# the end of each call.
# Logs: $OUT/all.log and $OUT/summary.txt (default ./gpu_out); the self-check verdicts in $OUT/selftest.json
# ("N of M checked" in the log), each generate's sidecar as $OUT/gen_*.json, the Wan 2.1 1.3B step in
# $OUT/wan_step.json, the host profiles in $OUT/host_profile.json, the bench report in $OUT/gpu_report/, the length
# tiles' timing in $OUT/lengths_probe.json, the raster-reading forward's in $OUT/gather_probe.json, the backward's in
# $OUT/bwd_probe.json, the ws forward's rows in $OUT/ws_probe.json, SLA's parts in $OUT/sla_run.json, the glue's
# calls in $OUT/glue.json. The vendor kernels (FA4, cuDNN) travel in parts: docs/scripts/gpu_vendor.sh says how; its
# steps vendor_selftest and bench_vendor run only when named in STEPS.
set -u
O=${OUT:-$PWD/gpu_out}; W=${WHEELS:-.whl}; mkdir -p "$O/gpu_report"
T0=$(date +%s); END=$((T0 + ${BUDGET:-540}))
STEPS=" ${STEPS:-install selftest generate wan_step host_profile bench_gpu pytest_gpu sla_parts info} "
export DIT_ACCEL_CACHE=${DIT_ACCEL_CACHE:-/tmp/dit_accel_cache} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
L=$O/all.log
step() {  # step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left), log it, one summary line
    local name=$1 limit=$2 left; shift 2
    case "$STEPS" in *" $name "*) ;; *) return ;; esac
    left=$((END - $(date +%s) - 15)); [ "$left" -lt "$limit" ] && limit=$left
    if [ -n "${DRY_RUN:-}" ]; then echo "$name (limit ${limit}s): $*" | tee -a "$O/summary.txt"; return; fi
    if [ "$limit" -lt 5 ]; then echo "rc=skip $name (no time left)" | tee -a "$O/summary.txt"; return; fi
    echo "=== $name (limit ${limit}s) $*" >>"$L"
    local s=$(date +%s); timeout "$limit" "$@" >>"$L" 2>&1; local rc=$?
    echo "rc=$rc $name $(( $(date +%s) - s ))s" | tee -a "$L" "$O/summary.txt"
}
[ -n "${DRY_RUN:-}" ] || { nvidia-smi; git rev-parse HEAD 2>/dev/null; which python3; } >>"$L" 2>&1
# No index, no dependencies: the machine's own torch and triton stay.
step install 90 python3 -m pip install -q --no-index --no-deps --no-build-isolation "$W"/*.whl -e .
# If the editable install failed, the package still runs from the checkout.
if [ -z "${DRY_RUN:-}" ] && ! command -v dit-accel >/dev/null; then
    mkdir -p /tmp/dit_bin && printf '#!/bin/sh\nexec python3 -m dit_accel "$@"\n' >/tmp/dit_bin/dit-accel
    chmod +x /tmp/dit_bin/dit-accel; export PATH=/tmp/dit_bin:$PATH PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ -n "${DRY_RUN:-}" ] || python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__,
diffusers.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" 2>&1 \
    | tee -a "$L" "$O/summary.txt"
# The acceptance checks: every kernel variant against its fp32 twin, 8 at a time (the compiles run side by side);
# its own --budget ends it with its JSON and "N of M checked" before the step's limit would (96 checks took 138 s on
# the H200 at cf9d9eb; the raster paths', SLA's backward glue's and VSA's gated backward's checks have joined since,
# about 114 in all, so 180).
SB=${SELFTEST_BUDGET:-180}; SV=""; for v in ${SELFTEST_VARIANTS:-}; do SV="$SV --variant $v"; done
step selftest $((SB + 30)) sh -c "dit-accel selftest --device cuda --json --budget $SB$SV > '$O/selftest.json'"
# The README's main job (fp32, its dense run beside it: the sidecar's compare_dense), then the figure users see.
step generate 90 dit-accel generate --device cuda --out /tmp/gen_fp32.mp4
cp /tmp/gen_fp32.mp4.json "$O/gen_fp32.json" 2>/dev/null
step wan_step 120 python3 docs/scripts/wan_step_gpu.py --out "$O/wan_step.json" --sidecar "$O/gen_fp32.json"
# Where the host time of the main job's self-attention calls (plan and dense) and of VSA's fine branch goes.
step host_profile 60 python3 docs/scripts/host_profile.py --out "$O/host_profile.json"
# Timings at the production shapes, the vendor kernels (FA4, cuDNN, NATTEN) beside auto where installed.
BB=${BENCH_BUDGET:-130}
step bench_gpu $((BB + 20)) dit-accel bench gpu --no-pytest --budget "$BB" --methods "${BENCH_METHODS:-tile,tile-fit,gna,sla-topk,vsa}" \
    --densities "${BENCH_DENSITIES:-0.05,0.1}" --shapes "${BENCH_SHAPES:-14B 480p,14B 720p,1.3B,FastWan}" --out "$O/gpu_report"
# Length tiles by count (the bias product) against the same tiles by bit mask: agreement and milliseconds.
step lengths_probe 60 python3 docs/scripts/lengths_probe.py --out "$O/lengths_probe.json"
# Tile's, GNA's and VSA's inference calls and a Tile training call with the kernels reading raster order (no
# gathers) against the gathering path (the TMA kernels on sm_90): agreement and milliseconds, SDPA beside them.
step gather_probe 180 sh -c "cd docs/scripts && python3 gather_probe.py --out '$O/gather_probe.json'"
# The one-pass backward (5 products) in two sm_90 d128 tiles for 64-token blocks against the two-pass backward
# that ships there: agreement and milliseconds.
step bwd_probe 90 sh -c "cd docs/scripts && python3 bwd_probe.py --out '$O/bwd_probe.json'"
# Where the (opt-in) warp-specialized forward goes wrong: tile shapes, pipeline depths, dense and sparse layouts, and
# the kernel's designs (docs/scripts/ws_designs.py: item loop pipelined or not, persistent or one item a program).
step ws_probe 150 python3 docs/scripts/ws_probe.py --time --out "$O/ws_probe.json"
# The calls around which eval.traffic models the operators' bytes (Tile, VSA and SLA training at Wan 1.3B 480p),
# beside the same calls of an older package where GLUE_BASELINE names its folder (carried: git archive, untarred).
step glue 120 python3 docs/scripts/glue_gpu.py --warmup 2 --repeats 5 --out "$O/glue.json" ${GLUE_BASELINE:+--baseline "$GLUE_BASELINE"}
# The vendor kernels, where docs/scripts/gpu_vendor.sh install put them in (named in STEPS, not in the default order):
# their self-checks, then each timed beside auto.
VV="--variant block_sparse.fa4.fwd --variant block_sparse.fa4.bwd"
VV="$VV --variant block_sparse.cudnn.fwd --variant block_sparse.cudnn.bwd"
step vendor_selftest 120 sh -c "dit-accel selftest --device cuda --json --budget 90 $VV > '$O/vendor_selftest.json'"
step bench_vendor 150 dit-accel bench gpu --no-pytest --budget 120 --methods tile,vsa --densities 0.1 \
    --shapes "1.3B,FastWan" --out "$O/gpu_report_vendor"
step pytest_gpu 240 python3 -m pytest -m gpu -o addopts= -p no:cacheprovider -q -rfE --timeout 120 --durations=15 tests
step sla_parts 120 env OUT="$O" PYTHONPATH=. python3 docs/scripts/sla_gpu_parts.py run --configs --bwd-configs --profile
step info 30 dit-accel info
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$O/summary.txt"
