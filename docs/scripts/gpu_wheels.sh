#!/bin/bash
# The wheels docs/scripts/gpu_offline_run.sh installs on a GPU machine with no package index, downloaded here into
# .whl/ (ignored by git: add `/.whl/` to .git/info/exclude) for Python 3.12 on x86-64 Linux. Run from the
# repository root:  bash docs/scripts/gpu_wheels.sh  [VENDOR=1 to try the vendor kernels' wheels too]
#
# What the lent GPU image lacks (its torch 2.11 + cu130, triton 3.6, cuDNN 9 for CUDA 13 and cuda-bindings are
# there): diffusers and the pure-Python packages it and `dit-accel generate` need. The whole carry (the checkout
# plus .whl/) must stay under 64 MiB a call: imageio-ffmpeg 0.5.1 (27 MB; 0.8.1 is 68 MB) is the largest.
#
# The vendor block-sparse kernels cannot be carried (checked 2026-11-27): FA4 (flash-attn-4 4.0.0b36, 0.5 MB) and
# cuDNN's block-sparse attention (nvidia-cudnn-frontend 1.32.0, 11.6 MB: `cudnn.block_sparse_attention` imports
# `cutlass`) are both CuTe-DSL kernels that need nvidia-cutlass-dsl, whose CUDA 13 library wheel
# (nvidia-cutlass-dsl-libs-cu13 4.8.1) is 92 MB, a 193 MB shared library that still takes 77 MB compressed with
# zstd -15: over the 64 MiB limit on its own. NATTEN has no wheel on PyPI (a source release that builds its CUDA
# kernels on install: no nvcc build fits a 15-minute lease). `dit-accel bench gpu` times each one that is
# installed beside auto (`[fa4 forced]`, ...) and notes why each other one is not.
set -eu
D=${WHEELS:-.whl}; mkdir -p "$D"
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
        --platform any -d "$D" "$@"
}
get diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4 importlib-metadata==10.2.0 imageio-ffmpeg==0.5.1
if [ -n "${VENDOR:-}" ]; then  # everything FA4 and cuDNN's block-sparse attention import (see above: too large)
    get flash-attn-4==4.0.0b36 quack-kernels==0.6.5 nvidia-cudnn-frontend==1.32.0 apache-tvm-ffi==0.1.15.post2 \
        torch-c-dlpack-ext==0.1.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
        nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1
fi
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
wheels=$(du -cb "$D"/*.whl | tail -1 | cut -f1)
echo "checkout $((tree / 1048576)) MiB + wheels $((wheels / 1048576)) MiB = $(((tree + wheels) / 1048576)) MiB (limit 64)"
[ $((tree + wheels)) -le $((64 * 1048576)) ] || { echo "too large to carry: drop wheels from $D" >&2; exit 1; }
