#!/bin/bash
# The vendor block-sparse kernels (FA4, cuDNN's block-sparse attention) for a GPU machine with no package index, in
# parts small enough to carry. Their wheels take 108 MiB (nvidia-cutlass-dsl-libs-cu13 alone 88 MiB), and one device
# call carries 64 MiB with the checkout (19 MiB): no call holds them whole. A machine kept warm between calls keeps
# what earlier calls carried, so the wheels travel as one tar cut into parts, a part a call, and are put back
# together and installed there by the last call. Run from the repository root:
#
#     bash docs/scripts/gpu_vendor.sh pack       # here: download, tar, cut into .vendor/1, .vendor/2, ... (ignored)
#     bash docs/scripts/gpu_vendor.sh install    # there, after the last part came: join, check, install, import
#
# The calls, one after the other on the still-warm machine (it goes back after 30 s idle): the usual first call of
# docs/scripts/gpu_offline_run.sh (carry .whl), then one call per part with carry [".vendor/N"] and a command that
# only lists it (`ls .vendor/*`), and in the last part's call `bash docs/scripts/gpu_vendor.sh install` and then
# `STEPS="vendor_selftest bench_vendor" bash docs/scripts/gpu_offline_run.sh` (their self-checks, then the bench
# times each installed vendor kernel beside auto). `pack` prints the plan. PART_MIB (default 40) sets the part
# size; WHEELS_FROM a folder of the wheels already downloaded (tests); VENDOR_DIR the parts' folder (default
# .vendor); PIP_ARGS more pip arguments (tests).
set -eu
V=${VENDOR_DIR:-.vendor}
case "${1:-}" in
pack)
    W=$(mktemp -d)
    if [ -n "${WHEELS_FROM:-}" ]; then
        cp "$WHEELS_FROM"/*.whl "$W"/
    else  # everything FA4 and cuDNN's block-sparse attention import, for Python 3.12 on x86-64 Linux
        WHEELS="$W" bash "$(dirname "$0")/gpu_wheels.sh" \
            flash-attn-4==4.0.0b36 quack-kernels==0.6.5 nvidia-cudnn-frontend==1.32.0 apache-tvm-ffi==0.1.15.post2 \
            torch-c-dlpack-ext==0.1.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
            nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1
    fi
    rm -rf "$V" && mkdir -p "$V"
    tar -C "$W" -cf "$V/vendor.tar" .
    sum=$(sha256sum "$V/vendor.tar" | cut -d' ' -f1)
    split -b "${PART_MIB:-40}m" -d -a 2 "$V/vendor.tar" "$V/part-"
    rm -f "$V/vendor.tar" && rm -rf "$W"
    n=0
    for part in "$V"/part-*; do
        n=$((n + 1)); mkdir -p "$V/$n"; mv "$part" "$V/$n/"; echo "$sum" >"$V/$n/vendor.sha256"
    done
    case "$V" in /*) ;; *) grep -qx "/$V/" .git/info/exclude 2>/dev/null || echo "/$V/" >>.git/info/exclude ;; esac
    echo "$n parts in $V/1 .. $V/$n ($(du -sm "$V" | cut -f1) MiB); carry one a call, on one warm machine:"
    for i in $(seq 1 "$n"); do echo "  call: carry [\"$V/$i\"]"; done
    echo "  in the last: bash docs/scripts/gpu_vendor.sh install &&" \
        "STEPS='vendor_selftest bench_vendor' bash docs/scripts/gpu_offline_run.sh"
    ;;
install)
    want=$(cat "$V"/*/vendor.sha256 2>/dev/null | sort -u)
    [ -n "$want" ] || { echo "no parts under $V: carry them first (gpu_vendor.sh pack prints the calls)" >&2; exit 2; }
    [ "$(echo "$want" | wc -l)" -eq 1 ] || { echo "parts of two different packs under $V: pack again" >&2; exit 2; }
    T=$(mktemp -d)
    for f in "$V"/*/part-*; do echo "$(basename "$f") $f"; done | sort | cut -d' ' -f2- | xargs cat >"$T/vendor.tar"
    got=$(sha256sum "$T/vendor.tar" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        echo "the joined parts do not make the pack ($(ls "$V"/*/part-* | wc -l) found): a part is missing or cut" >&2
        exit 3
    fi
    mkdir -p "$T/whl" && tar -C "$T/whl" -xf "$T/vendor.tar"
    python3 -m pip install -q --no-index --no-deps ${PIP_ARGS:-} "$T"/whl/*.whl
    echo "installed: $(cd "$T/whl" && ls *.whl | tr '\n' ' ')"
    for mod in cudnn flash_attn.cute; do  # what dit_accel's fa4 and cudnn backends import
        if out=$(python3 -c "import $mod" 2>&1); then echo "$mod: imports"
        else echo "$mod: $(echo "$out" | tail -1)"; fi
    done
    rm -rf "$T"
    ;;
*)
    echo "usage: bash docs/scripts/gpu_vendor.sh pack|install" >&2; exit 2 ;;
esac
