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
- ``launcher``: ``triton_forward`` alone (launch lookup, allocation, launch);
- ``backward_launcher``: ``triton_backward`` alone (launch lookup, allocations, the preprocess, dK/dV and
  dQ launches), what a training step's backward adds per attention call after autograd;
- ``plan``: ``LayoutPlan.run`` of the same layout in raster order, no text tokens (what a pipeline's
  attention hook adds on top of ``api_lse``);
- ``plan_tiled``: ``Tile(...).plan(grid).run``: the same plus the permutation to tiled order and
  back (three gathers in, two out);
- ``plan_tiled_text``: the same with 32 text tokens: the dense text branch and the log-sum-exp merge.
  The last two run real torch ops on the CPU (gathers; the text branch's fp32 matmuls are most of
  the time), as their launches would on a GPU: host overhead plus CPU compute, timed over
  ``calls // 20`` calls;
- ``sla``: ``sla_attention(q, k, v, SLA(topk=...), backend="triton")`` without projection, whose
  classification runs real (small) torch ops on the CPU, as their launches would on a GPU;
- ``sla_proj``: the same with a (non-zero) ``nn.Linear`` projection: the linear branch, its global
  sums and the projection's GEMM too (a bf16 GEMM the CPU computes slowly: milliseconds at 1024 tokens);
- ``sla_small``, ``sla_small_proj``: the two SLA stages at :data:`SMALL_SLA_SHAPE` (one head, 256 tokens),
  where the torch ops compute next to nothing, so their time is host time: Python, dispatch and the
  launches' argument building. (The Triton launches themselves are stubbed everywhere.)
- ``vsa_fine``: VSA's fine branch (``kernels.vsa.api._fine_branch``, Triton) at :data:`VSA_GRID` (whole 4x4x4
  cubes, 2 heads, a fixed selection at sparsity 0.875) on a class's later call: planned from the selection alone
  (:mod:`dit_accel.kernels.vsa.fine`); ``vsa_fine_partial``: the same at :data:`VSA_PARTIAL_GRID` (partial edge
  cubes: one sort more); ``vsa_fine_layout``: :data:`VSA_GRID` on the general path every call (a layout, the
  backend decision and the launch derived per call, as every call before the per-call plan);
- ``vsa``: a whole ``vsa_attention`` call with a gate at :data:`VSA_GRID`, sparsity 0.875, its coarse launches
  stubbed too (returning the PyTorch twin's selection, worked out once): cube order, the class's later calls;
  ``vsa_raster``: the same reading raster order (:mod:`dit_accel.kernels.vsa.raster`, forced); ``vsa_partial``,
  ``vsa_partial_raster``: both at :data:`VSA_PARTIAL_GRID`. Their copies and gated sum run on the CPU, as their
  launches would on a GPU.

With ``detail``, each stage also reports the device work one call issues (:func:`count_device_ops`): the
torch kernels and the Triton launches, each one launch on a GPU (about 5 us of host time there, and of
``sla_small``'s time here), and the allocations (caching-allocator calls on a GPU, no launch).

Each stage reports the median and the minimum over repeats of the wall time per call, and the
median of the thread's CPU time per call (``time.thread_time``): on a shared, loaded machine the
wall time counts the time the process waits for a core, the CPU time mostly does not.

Run it in its own process (``TRITON_INTERPRET`` must be set before triton is imported)::

    python -m dit_accel.eval.host_path [--calls 400] [--repeats 9] [--json out.json]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Dict, Iterator

__all__ = ["stub_launches", "kept_stub", "twin_coarse", "count_device_ops", "run_observed", "measure_host_path",
           "main", "SMALL_SLA_SHAPE", "VSA_GRID", "VSA_PARTIAL_GRID"]

#: The ``sla_small*`` stages' q, k, v shape: four 64-token blocks, one head, so the classification's torch ops
#: compute next to nothing on the CPU and their time is their dispatch, as a launch's would be on a GPU.
SMALL_SLA_SHAPE = (1, 1, 256, 64)
#: The ``vsa_fine*`` stages' grids: 32 whole cubes; 28 cubes, 26 of them partial.
VSA_GRID, VSA_PARTIAL_GRID = (8, 16, 16), (7, 14, 14)


class _StubKernel:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kwargs)`` does nothing but count."""

    def __init__(self, counts: Dict[str, int]) -> None:
        self._counts = counts

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self._counts["triton"] += 1


@contextlib.contextmanager
def stub_launches() -> Iterator[Dict[str, int]]:
    """Replace the block-sparse, SLA and VSA Triton kernels (SLA's pooling, selection, operand and backward glue
    kernels too, VSA's coarse ones and its gated backward) with :class:`_StubKernel` while inside; yields
    ``{"triton": launches so far}``."""
    from ..kernels.block_sparse import triton as bs
    from ..kernels.dense import triton as dense
    from ..kernels.sla import glue, operands, pool, select
    from ..kernels.sla import triton as sla
    from ..kernels.vsa import gated
    from ..kernels.vsa import triton as vsa

    from .._util import env_set
    from ..kernels.selfcheck import ENV_SELFCHECK

    counts = {"triton": 0}
    # (the dense module's preprocess too: SLA's backward launches it through dense.triton.bwd_preprocess)
    globals_ = [(bs, name) for name in ("_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")]
    globals_.append((dense, "_bwd_preprocess_kernel"))
    saved_globals = [(module, name, getattr(module, name)) for module, name in globals_]
    tables = (sla.KERNELS, glue.KERNELS, pool.KERNELS, select.KERNELS, operands.KERNELS, vsa.KERNELS, gated.KERNELS)
    saved = [dict(table) for table in tables]
    with env_set(ENV_SELFCHECK, "0"):  # stubbed kernels return nothing: the first-use check would disable them
        try:
            for module, name in globals_:
                setattr(module, name, _StubKernel(counts))
            for table in tables:
                for name in table:
                    table[name] = _StubKernel(counts)
            yield counts
        finally:
            for module, name, value in saved_globals:
                setattr(module, name, value)
            for table, before in zip(tables, saved):
                table.clear()
                table.update(before)


@contextlib.contextmanager
def kept_stub(module, name: str, make: Callable[[Callable], Callable], compute: Callable,
              key: Callable) -> Iterator[None]:
    """``module.name`` (``make(stub)``) stubbed while inside by ``compute``'s result, worked out on the first call of
    each ``key(*args)`` and kept (the stubbed launches behind it would leave their outputs unwritten)."""
    saved, kept = getattr(module, name), {}

    def stub(*args, **kw):
        k = key(*args, **kw)
        if k not in kept:
            kept[k] = compute(*args, **kw)
        return kept[k]

    setattr(module, name, make(stub))
    try:
        yield
    finally:
        setattr(module, name, saved)


@contextlib.contextmanager
def twin_coarse() -> Iterator[None]:
    """Inside :func:`stub_launches`: VSA's ``coarse_triton``, and its ``pool_triton`` and ``coarse_of_means`` where a
    training call reading raster order calls them apart, run as they do (their host work, their stubbed launches)
    and return the PyTorch twin's result for their inputs, worked out on a first call and kept (the stubbed launches
    leave their outputs unwritten, and the fine branch indexes with the selection)."""
    import torch

    from ..kernels.vsa import triton as vsa_triton
    from ..kernels.vsa.naive import _cube_means, coarse_attention, top_cubes

    def cube_order(q_t, k_t, v_t, cubes, rows):
        if rows is not None:  # raster inputs: the twin takes them in cube order
            q_t, k_t, v_t = (cubes.perm.permute(x, dim=-2) for x in (q_t, k_t, v_t))
        return q_t, k_t, v_t

    def coarse(q_t, k_t, v_t, cubes, count, scale, with_output=True, rows=None):
        return coarse_attention(*cube_order(q_t, k_t, v_t, cubes, rows), cubes, count, scale, with_output)

    def pool(q_t, k_t, v_t, cubes, rows=None):
        return tuple(_cube_means(x, cubes, torch.float32) for x in cube_order(q_t, k_t, v_t, cubes, rows))

    def of_means(qc, kc, vc, count, scale, with_output=True):
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        out = torch.matmul(torch.softmax(scores, dim=-1), vc) if with_output else None
        return out, scores, top_cubes(scores, count)

    def runs_then(name):  # (the real function first: its host work and its stubbed launches are counted)
        real = getattr(vsa_triton, name)
        return lambda stub: lambda *args, **kw: (real(*args, **kw), stub(*args, **kw))[1]

    def key(x, *rest, **kw):
        return (tuple(x.shape), tuple(x.stride())) + tuple(r for r in rest if isinstance(r, (int, float))) + \
            tuple(sorted((name, value is not None if name == "rows" else value) for name, value in kw.items()))

    with kept_stub(vsa_triton, "coarse_triton", runs_then("coarse_triton"), coarse, key), \
            kept_stub(vsa_triton, "pool_triton", runs_then("pool_triton"), pool, key), \
            kept_stub(vsa_triton, "coarse_of_means", runs_then("coarse_of_means"), of_means, key):
        yield


#: Allocations: on a GPU a caching-allocator call, no kernel launch.
_ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")


#: Operators that neither compute nor allocate: a view of their input.
_NOT_KERNELS = ("detach", "alias", "lift_fresh", "_unsafe_view")


def run_observed(fn: Callable[[], object], observe: Callable[[object, tuple, dict, object], None]) -> None:
    """Run ``fn`` under a ``TorchDispatchMode`` that hands each aten operator it dispatches, with its arguments and
    output, to ``observe(func, args, kwargs, out)``; the package's custom ops run their Python bodies under the mode
    instead (what they launch is observed, not the op), so an eager call that goes to a launcher directly and one
    through its op are seen alike."""
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Observe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "dit_accel":
                with self:
                    return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)
            observe(func, args, kwargs, out)
            return out

    with _Observe():
        fn()


def count_device_ops(fn: Callable[[], object], launches: Dict[str, int]) -> Dict[str, int]:
    """What one call of ``fn`` would launch on a GPU: ``{"kernels", "torch", "triton", "allocations"}``.

    ``torch``: the aten operators it dispatches that compute (not views such as ``view``, ``slice`` or
    ``transpose``, not allocations), each one kernel launch on a GPU; ``triton``: the (stubbed) Triton
    launches, read from ``launches`` (:func:`stub_launches`' counter); ``kernels`` their sum. Counted by
    :func:`run_observed`, inside the package's custom ops too."""
    counts = {"torch": 0, "allocations": 0}

    def observe(func, args, kwargs, out):
        name = func._schema.name.split("::")[-1]
        if name in _ALLOCATIONS:
            counts["allocations"] += 1
        elif not func.is_view and name not in _NOT_KERNELS:
            counts["torch"] += 1

    before = launches["triton"]
    run_observed(fn, observe)
    counts["triton"] = launches["triton"] - before
    counts["kernels"] = counts["torch"] + counts["triton"]
    return counts


def _per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> Dict[str, float]:
    """``{"median", "min", "cpu"}`` microseconds per call of ``fn`` over ``repeats`` runs of ``calls``."""
    for _ in range(max(calls // 10, 5)):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        cpu.append((time.thread_time() - start_cpu) / calls * 1e6)
        wall.append((time.perf_counter() - start) / calls * 1e6)
    return {"median": statistics.median(wall), "min": min(wall), "cpu": statistics.median(cpu)}


def measure_host_path(*, tokens: int = 1024, heads: int = 2, head_dim: int = 64, block: int = 64,
                      calls: int = 400, repeats: int = 9, stages=None, detail: bool = False) -> Dict[str, object]:
    """Microseconds per eager call of each stage (module docstring), launches stubbed; CPU tensors:
    the median wall time, or with ``detail`` ``{"median", "min", "cpu"}`` per stage.

    Needs ``TRITON_INTERPRET=1`` set before triton was imported (the test suite's conftest does it on
    machines without CUDA); raises RuntimeError otherwise."""
    import torch

    from ..kernels import block_sparse_attention
    from ..kernels.backends import triton_reason
    from ..kernels.block_sparse.ops import block_sparse_fwd
    from ..kernels.layout import BlockLayout
    from ..kernels.sla import sla_attention
    from ..methods import SLA, Tile
    from .._util import env_set
    from ..kernels.block_sparse.gather import ENV_GATHER
    from ..plans.plan import LayoutPlan

    if tokens % 256:
        raise ValueError(f"tokens={tokens}: use a multiple of 256 (the tiled plan's grid is (tokens // 256, 16, 16))")
    if triton_reason("cpu") is not None:
        raise RuntimeError("measure_host_path needs TRITON_INTERPRET=1 set before triton is imported "
                           "(run `python -m dit_accel.eval.host_path`)")
    from ..kernels.block_sparse.triton import triton_backward, triton_forward

    gen = torch.Generator().manual_seed(0)
    # Half precision as on a GPU: float16, since the Triton backend refuses bfloat16 under the interpreter (its
    # bf16 dot is wrong), and a stubbed launch costs the same host time either way.
    dtype = torch.float16
    shape = (1, heads, tokens, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    n_b = -(-tokens // block)
    band = (torch.arange(n_b)[:, None] - torch.arange(n_b)[None, :]).abs() <= 1
    layout = BlockLayout.from_block_masks(band, q_len=tokens, kv_len=tokens, block_q=block, block_k=block)
    scale = head_dim ** -0.5
    # The backward's inputs: any o, lse and dO of the right shapes (the stubbed kernels read nothing).
    o, do = torch.randn_like(q), torch.randn_like(q)
    lse = torch.randn(shape[:3], generator=gen)
    tensors = [getattr(layout, name) for name in BlockLayout.TENSORS]
    method = SLA(topk=0.05)
    raster = LayoutPlan(None, (tokens,), layout)
    # A video grid of `tokens` tokens, tiled by 4x4x4 tiles (64-token blocks), plus 32 text tokens.
    tiled = Tile(tile=(4, 4, 4), window=(3, 3, 3)).plan((tokens // 256, 16, 16))
    n_text = 32
    qt, kt, vt = (torch.randn((1, heads, tokens + n_text, head_dim), generator=gen, dtype=dtype)
                  for _ in range(3))
    proj = torch.nn.Linear(head_dim, head_dim).to(dtype).requires_grad_(False)
    # SLA at a size whose CPU compute is negligible: what is left is host time (Python, dispatch, launches).
    qs, ks, vs = (torch.randn(SMALL_SLA_SHAPE, generator=gen, dtype=dtype) for _ in range(3))
    proj_s = torch.nn.Linear(SMALL_SLA_SHAPE[-1], SMALL_SLA_SHAPE[-1]).to(dtype).requires_grad_(False)

    def grad_call():
        block_sparse_attention(qg, kg, vg, layout, backend="triton")

    vsa_fine, vsa_partial = (_vsa_fine_call(grid, heads, head_dim, dtype, gen) for grid in (VSA_GRID, VSA_PARTIAL_GRID))

    cases = {
        "api": lambda: block_sparse_attention(q, k, v, layout, backend="triton"),
        "api_lse": lambda: block_sparse_attention(q, k, v, layout, backend="triton", return_lse=True),
        "api_grad": grad_call,
        "custom_op": lambda: block_sparse_fwd(q, k, v, *tensors, layout.q_len, layout.kv_len, layout.block_q,
                                              layout.block_k, scale),
        "launcher": lambda: triton_forward(q, k, v, layout, scale),
        "backward_launcher": lambda: triton_backward(do, q, k, v, o, lse, layout, scale),
        "plan": lambda: raster.run(q, k, v, backend="triton"),
        "plan_tiled": lambda: tiled.run(q, k, v, backend="triton"),
        "plan_tiled_text": lambda: tiled.run(qt, kt, vt, num_text=n_text, backend="triton"),
        "sla": lambda: sla_attention(q, k, v, method, None, backend="triton"),
        "sla_proj": lambda: sla_attention(q, k, v, method, proj, backend="triton"),
        "sla_small": lambda: sla_attention(qs, ks, vs, method, None, backend="triton"),
        "sla_small_proj": lambda: sla_attention(qs, ks, vs, method, proj_s, backend="triton"),
        "vsa_fine": vsa_fine, "vsa_fine_partial": vsa_partial, "vsa_fine_layout": vsa_fine,
    }
    for grid, stage in ((VSA_GRID, "vsa"), (VSA_PARTIAL_GRID, "vsa_partial")):
        cases[stage] = cases[stage + "_raster"] = _vsa_call(grid, heads, head_dim, dtype, gen)
    out = {}
    with stub_launches() as launches, twin_coarse():
        for name, fn in cases.items():
            if stages is not None and name not in stages:
                continue
            n = max(calls // 20, 2) if name == "plan_tiled_text" else calls  # milliseconds of CPU matmuls
            with torch.set_grad_enabled(name == "api_grad"), _general_vsa_path(name == "vsa_fine_layout"), \
                    env_set(ENV_GATHER, "1" if name.startswith("vsa") and name.endswith("_raster") else "0"):
                out[name] = _per_call_us(fn, n, repeats)
                if detail:  # (a dispatch mode sends VSA's fine branch down the general path: the profiler does not)
                    count = _profiled_ops if name.startswith("vsa") else count_device_ops
                    out[name]["ops"] = count(fn, launches)
    return out if detail else {name: us["median"] for name, us in out.items()}


def _profiled_ops(fn: Callable[[], object], launches: Dict[str, int]) -> Dict[str, int]:
    """:func:`count_device_ops` read from torch's profiler instead of a dispatch mode (whose presence changes the
    path of calls that skip their custom op where nothing intercepts them): the top-level aten operators, views
    and allocations apart."""
    from torch.profiler import ProfilerActivity, profile

    before = launches["triton"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {"torch": 0, "allocations": 0}
    for e in prof.events():
        parent = e.cpu_parent
        if not e.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        name = e.name[len("aten::"):]
        if name in _ALLOCATIONS:
            counts["allocations"] += 1
        elif name not in _PROFILED_VIEWS:
            counts["torch"] += 1
    counts["triton"] = launches["triton"] - before
    counts["kernels"] = counts["torch"] + counts["triton"]
    return counts


_PROFILED_VIEWS = {"view", "reshape", "alias", "unsqueeze", "transpose", "expand", "slice", "select", "expand_as",
                   "permute", "contiguous", "detach", "_reshape_alias", "as_strided", "squeeze", "lift_fresh", "t",
                   "unflatten", "flatten", "_unsafe_view"}


def _vsa_fine_call(grid, heads: int, head_dim: int, dtype, gen) -> Callable[[], object]:
    """VSA's fine branch on ``grid`` (4x4x4 cubes) over a fixed selection at sparsity 0.875, as a call."""
    import torch

    from ..kernels.vsa import api
    from ..kernels.vsa.naive import cubes_of, selected_count

    cubes = cubes_of(grid, (4, 4, 4))
    count = selected_count(cubes.count, None, 0.875)
    selection = torch.rand(1, heads, cubes.count, cubes.count, generator=gen).topk(count, -1).indices.sort(-1).values
    q, k, v = (torch.randn(1, heads, cubes.perm.num_padded, head_dim, generator=gen, dtype=dtype) for _ in range(3))
    return lambda: api._fine_branch(q, k, v, cubes, cubes.perm, None, selection, head_dim ** -0.5, "triton")


def _vsa_call(grid, heads: int, head_dim: int, dtype, gen) -> Callable[[], object]:
    """``vsa_attention`` with a gate on ``grid`` (4x4x4 cubes) at sparsity 0.875, Triton, as a call."""
    import torch

    from ..kernels.vsa import vsa_attention

    n = grid[0] * grid[1] * grid[2]
    q, k, v, gate = (torch.randn(1, n, heads, head_dim, generator=gen, dtype=dtype).transpose(1, 2) for _ in range(4))
    return lambda: vsa_attention(q, k, v, grid, sparsity=0.875, gate=gate, backend="triton")


@contextlib.contextmanager
def _general_vsa_path(on: bool) -> Iterator[None]:
    """While inside (``on``), VSA's fine branch keeps no template: every call takes the general path."""
    from ..kernels.vsa import fine

    if not on:
        yield
        return
    saved, remember = fine._TEMPLATES, fine.remember
    fine._TEMPLATES, fine.remember = {}, lambda *args: None
    try:
        yield
    finally:
        fine._TEMPLATES, fine.remember = saved, remember


def main(argv=None) -> dict:
    import argparse
    import platform

    from .._util import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=positive_int, default=400)
    parser.add_argument("--repeats", type=positive_int, default=9)
    parser.add_argument("--tokens", type=positive_int, default=1024)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    if args.tokens % 256:
        parser.error(f"--tokens {args.tokens}: use a multiple of 256 (the tiled plan's grid is (tokens // 256, 16, "
                     "16))")
    from .._util import file_error

    problem = file_error(args.json, "--json", "host_path.json") if args.json is not None else None
    if problem:  # now, not in a traceback after the measurement
        parser.error(problem)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import datetime

    import torch

    from .._util import load_average, versions

    torch.set_num_threads(1)
    detail = measure_host_path(tokens=args.tokens, calls=args.calls, repeats=args.repeats, detail=True)
    result = {"us_per_call": {name: us["median"] for name, us in detail.items()},
              "min_us_per_call": {name: us["min"] for name, us in detail.items()},
              "cpu_us_per_call": {name: us["cpu"] for name, us in detail.items()},
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_average": load_average(), "versions": versions(("torch", "triton")),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "note": f"CPU, bf16 (1, 2, {args.tokens}, 64) (sla_small*: {SMALL_SLA_SHAPE}), 64-blocks, launches "
                      "stubbed; wall time median and minimum of repeats, thread CPU time median; device ops per "
                      "call: torch kernels + Triton launches (allocations apart)"}
    result["device_ops_per_call"] = {name: us["ops"] for name, us in detail.items()}
    print(f"{'stage':18s} {'median':>8s} {'min':>8s} {'cpu':>8s} {'kernels':>8s} {'(torch':>6s} {'triton)':>7s} "
          f"{'allocs':>6s}  us/call (load {result['load_average']})")
    for name, us in detail.items():
        ops = us["ops"]
        print(f"{name:18s} {us['median']:8.1f} {us['min']:8.1f} {us['cpu']:8.1f} {ops['kernels']:8d} {ops['torch']:6d} "
              f"{ops['triton']:7d} {ops['allocations']:6d}")
    if args.json:
        from ..atomic_files import atomic_write_json

        atomic_write_json(args.json, result, indent=1)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
