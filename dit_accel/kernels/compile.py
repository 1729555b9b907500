"""Ahead-of-time compilation of every shipped Triton kernel configuration, without a GPU.

The interpreter checks the kernels' numbers on CPU; this module checks that the
very configurations the launchers pick are real GPU kernels: it compiles them
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and
reports what the compiled artefact says.

- :func:`shipped_kernel_configs` lists every configuration of every kernel family
  (block-sparse forward/backward, SLA forward/backward) that a launcher can pick.
- :func:`compile_for_target` compiles one of them for ``sm_<arch>``.
- :func:`compile_shipped` compiles many in parallel worker processes and reads each
  artefact (:mod:`dit_accel.kernels.sass`: registers, spills, ptxas advisories, SASS).

Each configuration object describes its own source through ``aot_source()``
(``(kernel, signature, constexprs, attrs)``) and has ``name``, ``kernel``,
``dtype``, ``num_warps`` and ``num_stages``.

Example::

    from dit_accel.kernels import shipped_kernel_configs, compile_for_target
    for cfg in shipped_kernel_configs(90):
        ck = compile_for_target(cfg, 90)
        print(cfg.name, ck.metadata.shared, len(ck.asm["cubin"]))
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence

from .backends import interpreting
from .block_sparse.configs import TARGET_ARCHS, shared_memory_limit
from .block_sparse.configs import shipped_configs as _block_sparse_configs
from .sla.configs import shipped_configs as _sla_configs

__all__ = ["TARGET_ARCHS", "shipped_kernel_configs", "compile_for_target", "compile_shipped", "shared_memory_limit",
           "map_in_workers"]


def shipped_kernel_configs(arch: Optional[int] = None, family: Optional[str] = None) -> list:
    """Every configuration the launchers can launch on ``sm_<arch>`` (all targets when None).

    ``family`` restricts the list to ``"block_sparse"`` or ``"sla"``. Configurations depend
    on the target (shared memory decides tiles and stages, registers the warps; sm_90 adds
    the TMA variants). For ``arch=None`` the lists of all targets are concatenated.
    """
    if family not in (None, "block_sparse", "sla"):
        raise ValueError(f"family must be None, 'block_sparse' or 'sla'; got {family!r}")
    out: list = []
    if family in (None, "block_sparse"):
        out += _block_sparse_configs(arch)
    if family in (None, "sla"):
        out += _sla_configs(arch)
    return out


def _jit_function(kernel):
    """The kernel as a JITFunction even when TRITON_INTERPRET=1 wrapped it for the interpreter."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def compile_for_target(cfg, arch: int):
    """Compile ``cfg`` for ``sm_<arch>`` without a GPU; returns triton's CompiledKernel.

    ``cfg`` is any entry of :func:`shipped_kernel_configs` (an object with ``num_warps``,
    ``num_stages`` and ``aot_source()``).

    ``result.metadata.shared`` is the shared memory (bytes) the kernel needs,
    ``result.asm["ptx"]`` / ``result.asm["cubin"]`` the generated code. Raises
    whatever triton raises when the kernel does not compile.
    """
    if interpreting():
        # Triton's code generator fails in a process whose `tl` is patched for the interpreter.
        raise RuntimeError("compile_for_target cannot run while TRITON_INTERPRET=1 is set in this process; "
                           "use compile_shipped(...), which compiles in fresh processes, or unset it.")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, attrs = cfg.aot_source()
    fn = _jit_function(kernel)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", int(arch), 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def map_in_workers(fn, jobs: Sequence, workers: int = 2) -> list:
    """``[fn(job) for job in jobs]`` in ``workers`` spawned processes with ``TRITON_INTERPRET=0``.

    Triton's code generator does not work in a process where the interpreter is active, and
    ptxas is CPU-bound, so compiles run in fresh processes; slow jobs should come first.
    """
    if not jobs:
        return []
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # inherited by the spawned workers
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=ctx) as pool:
            return list(pool.map(fn, jobs, chunksize=1))
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def compile_shipped(archs: Sequence[int] = TARGET_ARCHS, workers: int = 2,
                    configs: Optional[Dict[int, list]] = None) -> List[dict]:
    """Compile every shipped configuration for each arch in ``archs``; one dict per (config, arch).

    Each dict is :func:`dit_accel.kernels.sass.analyze`'s: ``name``, ``kernel``, ``arch``,
    ``shared`` (bytes), ``limit`` (the arch's shared memory per block), ``mma`` / ``wgmma``
    (tensor-core instructions in the PTX), ``registers``, ``stack``, ``local``,
    ``spill_stores`` / ``spill_loads``, ``warnings`` (ptxas advisories such as C7515),
    ``occupancy`` and ``error`` (None when it compiled; no SASS loops: see
    :func:`dit_accel.kernels.sass.paired`). Compiles run
    in ``workers`` spawned processes and land in triton's on-disk cache; the analyses in
    dit_accel's (``$DIT_ACCEL_CACHE``), so a warm run reads files only.
    """
    from .sass import analyze_many

    jobs = [(cfg, a) for a in archs for cfg in (configs[a] if configs else shipped_kernel_configs(a))]
    return analyze_many(jobs, workers, loops=False)


def _main(argv: Sequence[str]) -> int:
    """``python -m dit_accel.kernels.compile [ARCH ...]``: compile all, print a table, exit 1 on failure."""
    archs = [int(a) for a in argv] or list(TARGET_ARCHS)
    start = time.perf_counter()
    results = compile_shipped(archs, workers=int(os.environ.get("DIT_ACCEL_COMPILE_WORKERS", "2")))
    bad = 0
    for r in results:
        ok = r["error"] is None and r["shared"] <= r["limit"] and not r["stack"] and not r["local"]
        bad += not ok
        print(f"sm_{r['arch']} {r['name']:<44} shared={r.get('shared')!s:>7} / {r['limit']} "
              f"regs={r.get('registers')} stack={r.get('stack')} {'ok' if ok else 'FAIL ' + str(r['error'])[:200]}")
    print(f"{len(results)} configurations, {bad} failed, {time.perf_counter() - start:.1f}s wall")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
