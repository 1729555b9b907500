"""Host cost of one eager attention call, with the kernel launch stubbed (issue 27 item 2).

On a GPU the block-sparse call at 5% density is short enough (0.6-2 ms) that the Python between
``block_sparse_attention`` and the kernel launch shows in the time. This measures that path on
the CPU: the Triton backend is chosen through its interpreter (``TRITON_INTERPRET=1``), and the
Triton kernel objects are replaced by a stub whose launch does nothing, so what is timed is the
argument checks, backend choice, custom-op dispatch and launcher preparation, nothing else.
Each stage is timed alone:

- ``api``: ``block_sparse_attention(q, k, v, layout, backend="triton")`` under ``no_grad``;
- ``api_lse``: the same with ``return_lse=True`` (what the pipelines' plans call);
- ``api_grad``: the same on inputs that require grad (autograd recording, no backward);
- ``custom_op``: the ``dit_accel::block_sparse_fwd`` op called directly (dispatcher + launcher);
- ``launcher``: ``triton_forward`` alone (configuration, tile plan lookup, allocation, launch);
- ``sla``: ``sla_attention(q, k, v, SLA(topk=...), backend="triton")`` without projection, whose
  classification runs real (small) torch ops on the CPU, as their launches would on a GPU;
- ``sla_proj``: the same with a (non-zero) ``nn.Linear`` projection: the linear branch, its global
  sums and the projection's GEMM too.

Run it in its own process (``TRITON_INTERPRET`` must be set before triton is imported)::

    python -m dit_accel.eval.host_path [--calls 400] [--repeats 9] [--json out.json]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Dict, Iterator

__all__ = ["stub_launches", "measure_host_path", "main"]


class _StubKernel:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


@contextlib.contextmanager
def stub_launches() -> Iterator[None]:
    """Replace the block-sparse and SLA Triton kernels with :class:`_StubKernel` while inside."""
    from ..kernels.block_sparse import triton as bs
    from ..kernels.sla import triton as sla

    saved_bs = {name: getattr(bs, name) for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")}
    saved_sla = dict(sla.KERNELS)
    try:
        for name in saved_bs:
            setattr(bs, name, _StubKernel())
        for name in saved_sla:
            sla.KERNELS[name] = _StubKernel()
        yield
    finally:
        for name, value in saved_bs.items():
            setattr(bs, name, value)
        sla.KERNELS.clear()
        sla.KERNELS.update(saved_sla)


def _per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    for _ in range(max(calls // 10, 5)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def measure_host_path(*, tokens: int = 1024, heads: int = 2, head_dim: int = 64, block: int = 64,
                      calls: int = 400, repeats: int = 9, stages=None) -> Dict[str, float]:
    """Microseconds per eager call of each stage (module docstring), launches stubbed; CPU tensors.

    Needs ``TRITON_INTERPRET=1`` set before triton was imported (the test suite's conftest does it on
    machines without CUDA); raises RuntimeError otherwise."""
    import torch

    from ..kernels import block_sparse_attention
    from ..kernels.backends import triton_reason
    from ..kernels.block_sparse.ops import block_sparse_fwd
    from ..kernels.layout import BlockLayout
    from ..kernels.sla import sla_attention
    from ..methods import SLA

    if triton_reason("cpu") is not None:
        raise RuntimeError("measure_host_path needs TRITON_INTERPRET=1 set before triton is imported "
                           "(run `python -m dit_accel.eval.host_path`)")
    from ..kernels.block_sparse.triton import triton_forward

    gen = torch.Generator().manual_seed(0)
    shape = (1, heads, tokens, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    n_b = -(-tokens // block)
    band = (torch.arange(n_b)[:, None] - torch.arange(n_b)[None, :]).abs() <= 1
    layout = BlockLayout.from_block_masks(band, q_len=tokens, kv_len=tokens, block_q=block, block_k=block)
    scale = head_dim ** -0.5
    tensors = [getattr(layout, name) for name in BlockLayout.TENSORS]
    method = SLA(topk=0.05)
    proj = torch.nn.Linear(head_dim, head_dim).to(torch.bfloat16).requires_grad_(False)

    def grad_call():
        block_sparse_attention(qg, kg, vg, layout, backend="triton")

    cases = {
        "api": lambda: block_sparse_attention(q, k, v, layout, backend="triton"),
        "api_lse": lambda: block_sparse_attention(q, k, v, layout, backend="triton", return_lse=True),
        "api_grad": grad_call,
        "custom_op": lambda: block_sparse_fwd(q, k, v, *tensors, layout.q_len, layout.kv_len, layout.block_q,
                                              layout.block_k, scale),
        "launcher": lambda: triton_forward(q, k, v, layout, scale),
        "sla": lambda: sla_attention(q, k, v, method, None, backend="triton"),
        "sla_proj": lambda: sla_attention(q, k, v, method, proj, backend="triton"),
    }
    out = {}
    with stub_launches():
        for name, fn in cases.items():
            if stages is not None and name not in stages:
                continue
            if name == "api_grad":
                out[name] = _per_call_us(fn, calls, repeats)
            else:
                with torch.no_grad():
                    out[name] = _per_call_us(fn, calls, repeats)
    return out


def main(argv=None) -> dict:
    import argparse
    import json
    import platform

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import datetime

    import torch

    from .._util import load_average, versions

    torch.set_num_threads(1)
    result = {"us_per_call": measure_host_path(tokens=args.tokens, calls=args.calls, repeats=args.repeats),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_average": load_average(), "versions": versions(("torch", "triton")),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "note": "CPU, bf16 (1, 2, 1024, 64), 64-blocks, launches stubbed; median of repeats"}
    for name, us in result["us_per_call"].items():
        print(f"{name:10s} {us:8.1f} us/call")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
