#!/bin/bash
# The wheels docs/scripts/gpu_offline_run.sh installs on a GPU machine with no package index, downloaded here into
# .whl/ (ignored by git: add `/.whl/` to .git/info/exclude) for Python 3.12 on x86-64 Linux. Run from the
# repository root:  bash docs/scripts/gpu_wheels.sh   (or with NAME==VERSION arguments: those wheels alone, no
# carry check, as docs/scripts/gpu_vendor.sh downloads the vendor kernels')
#
# What the lent GPU image lacks (its torch 2.11 + cu130, triton 3.6, cuDNN 9 for CUDA 13 and cuda-bindings are
# there): diffusers and the pure-Python packages it and `dit-accel generate` need. The whole carry (the checkout
# plus .whl/) must stay under 64 MiB a call: imageio-ffmpeg 0.5.1 (27 MB; 0.8.1 is 68 MB) is the largest.
#
# The vendor block-sparse kernels' wheels (FA4 and cuDNN's block-sparse attention, CuTe-DSL kernels: 108 MiB with
# nvidia-cutlass-dsl-libs-cu13's 88) do not fit one call: docs/scripts/gpu_vendor.sh carries them in parts over
# several calls to one warm machine. NATTEN has no wheel on PyPI (a source release that builds its CUDA kernels on
# install: no nvcc build fits a 15-minute lease). `dit-accel bench gpu` times each vendor kernel that is installed
# beside auto (`[fa4 forced]`, ...) and notes why each other one is not.
set -eu
D=${WHEELS:-.whl}; mkdir -p "$D"
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
        --platform any -d "$D" "$@"
}
if [ $# -gt 0 ]; then get "$@"; exit 0; fi
get diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4 importlib-metadata==10.2.0 imageio-ffmpeg==0.5.1
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
wheels=$(du -cb "$D"/*.whl | tail -1 | cut -f1)
echo "checkout $((tree / 1048576)) MiB + wheels $((wheels / 1048576)) MiB = $(((tree + wheels) / 1048576)) MiB (limit 64)"
[ $((tree + wheels)) -le $((64 * 1048576)) ] || { echo "too large to carry: drop wheels from $D" >&2; exit 1; }
