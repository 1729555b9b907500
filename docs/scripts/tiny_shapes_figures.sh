#!/usr/bin/env bash
# Re-measure every tiny-shapes figure that uses the ground-truth metric (README, BENCHMARKS.md section 8,
# docs/tiny_shapes_bench.md, the MEASURED block of tests/models/test_tiny_shapes.py).
# Usage: bash docs/scripts/tiny_shapes_figures.sh OUTDIR   (from the repository root; about 15-30 min on 2 cores)
set -euo pipefail
out=${1:?usage: tiny_shapes_figures.sh OUTDIR}
mkdir -p "$out"
export HF_HUB_OFFLINE=1
{ date -u +%FT%TZ; uptime; git rev-parse --short HEAD; } > "$out/machine.txt"
python -m dit_accel.models.tiny_shapes --seeds 0 1 2 3 > "$out/dense_quality.txt" 2>&1
python tests/models/test_tiny_shapes.py > "$out/regression_measured.json" 2> "$out/regression_measured.err"
(cd "$out" && dit-accel generate --side-by-side > main_job.txt 2>&1)
dit-accel eval --model tiny-shapes --methods dense,tile,gna,sla,radial \
    --method-config docs/scripts/tiny_shapes_methods.yaml --seeds 0,1 --no-lpips --quiet --out "$out/eval_shapes" \
    > "$out/eval.txt" 2>&1
{ date -u +%FT%TZ; uptime; } >> "$out/machine.txt"
