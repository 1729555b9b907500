"""Ahead-of-time compilation of every shipped Triton kernel configuration, without a GPU.

The interpreter checks the kernels' numbers on CPU; this module checks that the
very configurations the launchers pick are real GPU kernels: it compiles them
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and
reports what the compiled artefact says.

- :func:`shipped_kernel_configs` lists every configuration of every kernel family
  (block-sparse forward/backward, SLA forward/backward) that a launcher can pick.
- :func:`compile_for_target` compiles one of them for ``sm_<arch>``.
- :func:`dit_accel.kernels.sass.compile_shipped` compiles many in parallel worker processes
  and reads each artefact (registers, spills, ptxas advisories, SASS).

Each configuration object describes its own source through :func:`aot_source`
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
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Optional, Sequence

from .._util import env_set, is_int
from .backends import interpreting
from .block_sparse.configs import TARGET_ARCHS, KernelConfig, shared_memory_limit
from .block_sparse.configs import shipped_configs as _block_sparse_configs
from .dense.configs import DenseConfig
from .sla.configs import SLAKernelConfig
from .sla.configs import shipped_configs as _sla_configs

__all__ = ["TARGET_ARCHS", "shipped_kernel_configs", "compile_for_target", "aot_source", "shared_memory_limit",
           "map_in_workers"]


def shipped_kernel_configs(arch: Optional[int] = None, family: Optional[str] = None) -> list:
    """Every configuration the launchers can launch on ``sm_<arch>`` (all targets when None).

    ``family`` restricts the list to ``"block_sparse"`` or ``"sla"``. Configurations depend
    on the target (shared memory decides tiles and stages, registers the warps; sm_90 adds
    the TMA variants). For ``arch=None`` the lists of all targets are concatenated.
    """
    if family not in (None, "block_sparse", "sla"):
        raise ValueError(f"family must be None, 'block_sparse' or 'sla'; got {family!r}")
    if arch is not None and (not is_int(arch) or arch < 80):  # (8.9 listed sm_80's configurations, silently)
        raise ValueError(f"arch={arch!r} is invalid: expected an int compute capability of 80 or more (the kernels "
                         f"need sm_80), major * 10 + minor, such as {', '.join(map(str, TARGET_ARCHS))}; or None")
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


def aot_source(cfg):
    """``(kernel, signature, constexprs, attrs)`` of a shipped configuration: its family's kernel table
    handed to the configuration, which knows its argument types and constants."""
    if isinstance(cfg, SLAKernelConfig):
        from .sla.triton import KERNELS
    elif isinstance(cfg, KernelConfig):
        from .block_sparse.triton import KERNELS
    elif isinstance(cfg, DenseConfig):
        from .dense.triton import KERNELS
    else:
        raise TypeError(f"not a shipped kernel configuration: {cfg!r}")
    return cfg.aot_source(KERNELS)


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
                           "use dit_accel.kernels.sass.compile_shipped(...), which compiles in fresh processes, or "
                           "unset it.")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, attrs = aot_source(cfg)
    fn = _jit_function(kernel)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", int(arch), 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def map_in_workers(fn, jobs: Sequence, workers: int = 2, progress: Optional[str] = None) -> list:
    """``[fn(job) for job in jobs]`` in ``workers`` spawned processes with ``TRITON_INTERPRET=0``.

    Triton's code generator does not work in a process where the interpreter is active, and
    ptxas is CPU-bound, so compiles run in fresh processes; slow jobs should come first.
    ``progress``: a label for a progress bar on stderr (a cold compile of every config takes minutes).
    """
    if not jobs:
        return []
    with env_set("TRITON_INTERPRET", "0"):  # inherited by the spawned workers
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=ctx) as pool:
            results = pool.map(fn, jobs, chunksize=1)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(jobs), desc=progress, unit="kernel", file=sys.stderr)
            return list(results)
