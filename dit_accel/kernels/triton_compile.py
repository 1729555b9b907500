"""Ahead-of-time compilation of the shipped Triton kernel configurations.

The interpreter checks the kernels' numbers on CPU; this module checks that the
very configurations the launchers pick are real GPU kernels: it compiles them
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (no
GPU needed) and reports their shared memory next to the part's limit.

- :func:`shipped_kernel_configs` lists every :class:`KernelConfig` that
  :func:`~dit_accel.kernels.triton_attention.select_config` can return for a
  given arch (all dtypes, padded head dims 16..256, layout blocks 16..256).
- :func:`compile_for_target` compiles one of them for ``sm_<arch>``.

Example::

    from dit_accel.kernels.triton_compile import shipped_kernel_configs, compile_for_target
    for cfg in shipped_kernel_configs(90):
        ck = compile_for_target(cfg, 90)
        print(cfg.name, ck.metadata.shared)
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .triton_attention import (
    GPU_LAYOUT_BLOCKS,
    KERNELS,
    SUPPORTED_DTYPES,
    KernelConfig,
    select_config,
    shared_memory_limit,
)

__all__ = ["TARGET_ARCHS", "LAYOUT_BLOCKS", "BLOCK_DS", "shipped_kernel_configs", "compile_for_target",
           "compile_shipped", "shared_memory_limit"]

TARGET_ARCHS = (80, 89, 90)
LAYOUT_BLOCKS = GPU_LAYOUT_BLOCKS  # block_q / block_k values the launchers accept on a GPU
BLOCK_DS = (64, 128, 256)  # padded head dims (head dim <= 256)

_PTR_DTYPE = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_TENSOR_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_ARGS = {"LSE", "DELTA"}
_I32_PTR_ARGS = {"KV_COUNTS", "KV_INDICES", "KV_MASK_IDS", "Q_COUNTS", "Q_INDICES", "Q_MASK_IDS"}
_FLOAT_ARGS = {"qk_scale", "sm_scale"}
# The JIT specialises integer arguments equal to 1 into constants: the head-dim
# strides of contiguous-last-dim tensors are 1 in every launch we make.
_UNIT_STRIDES = {"sqd", "skd", "svd", "sod", "sdd"}
# Arguments that are multiples of 16 in typical launches (pointers, token strides,
# head dims 64/80/96/128): the JIT would give them the same divisibility hint.
_DIV16 = {"sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "son",
          "sdb", "sdh", "sdn", "head_dim"}


def shipped_kernel_configs(arch: int | None = None) -> List[KernelConfig]:
    """Every configuration the launchers can launch on ``sm_<arch>`` (all archs when None).

    Covers each kernel (forward, backward preprocess, dK/dV, dQ), each dtype (fp16,
    bf16, fp32), each padded head dim and each layout block size; duplicates removed.
    """
    archs = TARGET_ARCHS if arch is None else (arch,)
    seen: Dict[Tuple, KernelConfig] = {}
    for a in archs:
        for kernel in ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"):
            for dtype in SUPPORTED_DTYPES:
                for bd in BLOCK_DS:
                    for bq in LAYOUT_BLOCKS:
                        for bk in LAYOUT_BLOCKS:
                            cfg = select_config(kernel, dtype, bd, bq, bk, a)
                            seen.setdefault(cfg, cfg)
    return list(seen)


def _jit_function(kernel):
    """The kernel as a JITFunction even when TRITON_INTERPRET=1 wrapped it for the interpreter."""
    import triton
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn)


def _signature(fn, cfg: KernelConfig):
    constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_D": cfg.block_d}
    if "BLOCK_N" in fn.arg_names:
        constexprs["BLOCK_N"] = cfg.block_n
    if "DOT_PRECISION" in fn.arg_names:
        constexprs["DOT_PRECISION"] = cfg.dot_precision
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in _UNIT_STRIDES:
            constexprs[name] = 1
            signature[name] = "constexpr"
            continue
        if name in _TENSOR_ARGS:
            signature[name] = _PTR_DTYPE[cfg.dtype]
        elif name in _FP32_ARGS:
            signature[name] = "*fp32"
        elif name in _I32_PTR_ARGS:
            signature[name] = "*i32"
        elif name == "MASK_TABLE":
            signature[name] = "*u8"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name in _DIV16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_for_target(cfg: KernelConfig, arch: int):
    """Compile ``cfg`` for ``sm_<arch>`` without a GPU; returns triton's CompiledKernel.

    ``cfg`` is a :class:`KernelConfig` or any config with ``name``, ``kernel``, ``dtype``,
    ``num_warps``, ``num_stages`` and an ``aot_source()`` method returning ``(kernel,
    signature, constexprs, attrs)`` (``sla_triton.SLAKernelConfig``); :func:`compile_shipped`
    compiles those too.

    ``result.metadata.shared`` is the shared memory (bytes) the kernel needs,
    ``result.asm["ptx"]`` / ``result.asm["cubin"]`` the generated code. Raises
    whatever triton raises when the kernel does not compile.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Triton's code generator fails in a process whose `tl` is patched for the interpreter.
        raise RuntimeError("compile_for_target cannot run while TRITON_INTERPRET=1 is set in this process; "
                           "use compile_shipped(...), which compiles in fresh processes, or unset it.")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if hasattr(cfg, "aot_source"):  # configs of other kernel modules (SLA) describe their own source
        kernel, signature, constexprs, attrs = cfg.aot_source()
        fn = _jit_function(kernel)
    else:
        fn = _jit_function(KERNELS[cfg.kernel])
        signature, constexprs, attrs = _signature(fn, cfg)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", int(arch), 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _compile_summary(job: Tuple[KernelConfig, int]) -> dict:
    import resource

    cfg, arch = job
    start = time.perf_counter()
    cpu0 = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    out = {"name": cfg.name, "kernel": cfg.kernel, "arch": arch, "shared": None, "limit": shared_memory_limit(arch),
           "mma": None, "wgmma": None, "error": None}
    try:
        ck = compile_for_target(cfg, arch)
        out["shared"] = int(ck.metadata.shared)
        ptx = ck.asm["ptx"]
        out["mma"] = "mma" in ptx  # mma.sync (sm_80/89) or wgmma (sm_90): tensor cores
        out["wgmma"] = "wgmma" in ptx
    except Exception as exc:  # reported, not raised: the caller lists every failure
        out["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    out["seconds"] = time.perf_counter() - start
    # CPU time including ptxas (a child process): what the compile costs on an idle machine.
    out["cpu_seconds"] = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - cpu0
    return out


def compile_shipped(archs: Sequence[int] = TARGET_ARCHS, workers: int = 2,
                    configs: Optional[Dict[int, List[KernelConfig]]] = None) -> List[dict]:
    """Compile every shipped configuration for each arch in ``archs``; one dict per (config, arch).

    Each dict has ``name``, ``kernel``, ``arch``, ``shared`` (bytes), ``limit`` (the
    arch's shared memory per block), ``mma`` (tensor-core instructions in the PTX),
    ``wgmma`` (Hopper warpgroup MMA), ``error`` (None when it compiled), ``seconds``
    and ``cpu_seconds`` (including ptxas). Compiles run in ``workers``
    spawned processes with ``TRITON_INTERPRET=0`` (triton's code generator does not
    work in a process where the interpreter is active) and use triton's on-disk cache.
    """
    jobs = [(cfg, a) for a in archs for cfg in (configs[a] if configs else shipped_kernel_configs(a))]
    # Slow compiles first so the pool ends together.
    jobs.sort(key=lambda j: (j[0].dtype != torch.float32, j[0].kernel == "bwd_preprocess"))
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # inherited by the spawned workers
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
            return list(pool.map(_compile_summary, jobs, chunksize=1))
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _main(argv: Sequence[str]) -> int:
    """``python -m dit_accel.kernels.triton_compile [ARCH ...]``: compile all, print a table, exit 1 on failure."""
    archs = [int(a) for a in argv] or list(TARGET_ARCHS)
    start = time.perf_counter()
    results = compile_shipped(archs, workers=int(os.environ.get("DIT_ACCEL_COMPILE_WORKERS", "2")))
    bad = 0
    for r in results:
        ok = r["error"] is None and r["shared"] <= r["limit"]
        bad += not ok
        print(f"sm_{r['arch']} {r['name']:<40} shared={r['shared']!s:>7} / {r['limit']} "
              f"mma={r['mma']} {r['seconds']:.1f}s cpu={r['cpu_seconds']:.1f}s "
              f"{'ok' if ok else 'FAIL ' + str(r['error'])[:200]}")
    cpu = sum(r["cpu_seconds"] for r in results)
    print(f"{len(results)} compiles, {bad} failed, {time.perf_counter() - start:.1f}s wall, {cpu:.1f}s cpu")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
