"""Device memory traffic of the PyTorch operators around the kernels, per attention call (MODELLED).

Around its kernels an attention call runs PyTorch operators: the token permutation into tiled order and back,
VSA's gated term, and under autograd their backward. On a GPU each is a memory-bound kernel, so its cost is the
bytes it moves. This counts them on the CPU, with the Triton launches stubbed (:func:`~.host_path.stub_launches`;
VSA's coarse launches return the PyTorch twin's result, worked out before counting; VSA's fine branch planned per
call where an eager call is): every operator that is not a view or an allocation, inside the package's own ops
too, is taken to read each input tensor once and write each output once (an expanded input counts the storage it
reads, an in-place output once), except that an index select reads, an index fill writes and a gather reads only
the rows its index names. A model, not a measurement: caches are ignored, and the operators are the CPU's dispatch
(a CUDA softmax with ``dtype=`` casts inside, which the CPU does in a copy first).

Cases, each at ``grid`` (default Wan 2.1 480p's (21, 30, 52)) with ``heads`` heads of ``head_dim``, float16:

- ``tile``, ``tile_train``: the recommended Tile for Wan (fitted, (6, 8, 8) / (3, 3, 3)) through its plan,
  forward only, and forward + backward; ``tile_raster``, ``tile_train_raster``: the same with the kernels reading
  raster order (:mod:`~dit_accel.kernels.block_sparse.gather`, forced: ``DIT_ACCEL_GATHER=1``);
- ``vsa``, ``vsa_train``: ``vsa_attention`` with a gate, sparsity 0.9; ``vsa_nogate``: without a gate (the fine
  branch alone), so ``vsa - vsa_nogate`` is the gated term's traffic; ``vsa_raster``, ``vsa_train_raster``:
  ``vsa`` and ``vsa_train`` with both branches reading raster order (:mod:`~dit_accel.kernels.vsa.raster`, forced);
- ``sla``, ``sla_train``: ``sla_attention`` with a projection (trained SLA), top-k 0.05 (its classification
  launches stubbed by the PyTorch twin's block lists, worked out before counting); ``sla_train_glue``: the training
  call with the backward's glue in its Triton kernels (:mod:`~dit_accel.kernels.sla.glue`, forced:
  ``DIT_ACCEL_SLA_GLUE=1``; the others run with it off).

The SLA cases, ``vsa_raster`` and ``vsa_train_raster`` also report ``kernel_units``: the bytes of every tensor
argument of the kernels that do glue work (SLA's glue kernels and its global-sums kernel, which makes phi(K); VSA's
gated backward, :mod:`~dit_accel.kernels.vsa.gated`), each read or written once (their partial sums are small), and
the gate and cube rows that VSA's fine launch reads where it adds the gated term, and the cube means' gradients its
backward kernels add (:mod:`~dit_accel.kernels.vsa.raster`): work that moved into kernels still moves bytes.

Totals are given in bytes and in ``units``, the bytes of one q tensor ``(1, heads, N, head_dim)``; a unit scales
with heads and head dim alike (Wan 2.1 14B 480p, 2 x 40 heads of 128 in bf16: 671 MB).

Run it in its own process (``TRITON_INTERPRET`` must be set before triton is imported)::

    python -m dit_accel.eval.traffic [--grid 21,30,52] [--heads 2] [--json out.json]
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

__all__ = ["count_traffic", "measure_traffic", "main", "CASES"]

CASES = ("tile", "tile_raster", "tile_train", "tile_train_raster", "vsa", "vsa_raster", "vsa_nogate", "vsa_train",
         "vsa_train_raster", "sla", "sla_train", "sla_train_glue")
#: The cases whose kernels read raster order (``DIT_ACCEL_GATHER=1``; the others run with it off).
RASTER = ("tile_raster", "tile_train_raster", "vsa_raster", "vsa_train_raster")
#: The cases whose SLA backward runs its glue kernels (``DIT_ACCEL_SLA_GLUE=1``; the others run with it off).
GLUE = ("sla_train_glue",)


def _read_bytes(t) -> int:
    """Bytes an operator reads from ``t``: its elements, or its storage where that is smaller (an expanded view)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def _slices(t, dim: int, index) -> int:
    """Bytes of ``index.numel()`` slices of ``t`` along ``dim`` (what an index operator reads or writes of it)."""
    return t.numel() // max(t.shape[dim], 1) * index.numel() * t.element_size() if t.dim() else t.element_size()


def _indexed(name: str, args: tuple) -> Optional[Tuple[int, Optional[int]]]:
    """``(read, written or None: its outputs)`` bytes of the index operators that touch only the indexed rows of
    their big operand, or None for the general rule: an ``index_select`` reads the selected slices and the index,
    an ``index_fill_`` writes its slices and reads the index, a ``gather`` reads at most one input element per
    index element."""
    if name == "index_select":
        src, dim, index = args[:3]
        return min(_read_bytes(src), _slices(src, dim, index)) + _read_bytes(index), None
    if name == "index_fill_":
        dst, dim, index = args[:3]
        return _read_bytes(index), _slices(dst, dim, index)
    if name == "gather":
        src, _, index = args[:3]
        return min(_read_bytes(src), index.numel() * src.element_size()) + _read_bytes(index), None
    return None


def count_traffic(fn: Callable[[], object]) -> Dict[str, int]:
    """``{"ops", "bytes"}`` of the PyTorch operators one call of ``fn`` (and any backward it runs) dispatches, under
    the module docstring's model; inside the package's own ops (``dit_accel::``) too, whose Python bodies run the
    (stubbed) launches and the operators around them."""
    import torch
    from torch.utils._pytree import tree_flatten

    from .host_path import _ALLOCATIONS, _NOT_KERNELS, run_observed

    counts = {"ops": 0, "bytes": 0}

    def tensors(x):
        return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]

    def observe(func, args, kwargs, out):
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in _ALLOCATIONS or name in _NOT_KERNELS:
            return
        inputs = tensors((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs}
        written = [t for t in tensors(out) if t.untyped_storage().data_ptr() not in seen]
        counts["ops"] += 1
        indexed = _indexed(name, args)
        read = sum(_read_bytes(t) for t in inputs) if indexed is None else indexed[0]
        # (an in-place op's output is one of its inputs: read and written, counted once as read, or as the rows
        # an index fill writes)
        counts["bytes"] += read + (sum(t.numel() * t.element_size() for t in written) if indexed is None or
                                   indexed[1] is None else indexed[1])

    run_observed(fn, observe)
    return counts


def _twin_classify():
    """SLA's classification launches stubbed: the fused path's classify returns the PyTorch twin's block lists
    (its stubbed launches would leave the lists unwritten, which the backward's list transposition reads)."""
    from ..kernels.sla import api as sla_api
    from ..kernels.sla.common import sla_classify
    from .host_path import kept_stub

    attention = sla_api._fused()[1]
    return kept_stub(sla_api, "_fused", lambda stub: lambda: (stub, attention), sla_classify,
                     lambda q, k, method: (tuple(q.shape), method))


@contextlib.contextmanager
def _kernel_bytes(counts: Dict[str, int]) -> Iterator[None]:
    """Inside :func:`~.host_path.stub_launches`: each launch of SLA's glue kernels, of its global-sums kernel and of
    VSA's gated backward adds the bytes of its tensor arguments to ``counts["kernel_bytes"]``, VSA's fine launch
    those of the gate and the cube rows where it adds the gated term, and its backward those of the cube means'
    gradients it adds."""
    import torch

    from ..kernels.sla import glue
    from ..kernels.sla import triton as sla
    from ..kernels.block_sparse import triton as bst
    from ..kernels.vsa import fine, gated

    class Counting:
        def __init__(self, stub):
            self._stub = stub

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counts["kernel_bytes"] += sum(t.numel() * t.element_size() for t in args
                                              if isinstance(t, torch.Tensor))
                return self._stub[grid](*args, **kwargs)
            return launch

    names = [(glue.KERNELS, name) for name in glue.KERNELS] + [(sla.KERNELS, "global"), (gated.KERNELS, "gated_bwd")]
    saved = [(table, name, table[name]) for table, name in names]
    for table, name, stub in saved:
        table[name] = Counting(stub)
    fine_launch = fine._launch

    def launch(q, k, v, launched, plan, scale, table, gated=None, **kw):  # (its epilogue reads these once)
        if gated is not None:
            counts["kernel_bytes"] += sum(t.numel() * t.element_size() for t in gated[:2])
        return fine_launch(q, k, v, launched, plan, scale, table, gated, **kw)

    fine._launch = launch
    backward = bst.triton_backward

    def spread_backward(*args, spread=None, **kw):  # (the cube means' gradients the backward kernels add, read once)
        if spread is not None:
            counts["kernel_bytes"] += sum(t.numel() * t.element_size() for t in spread[:3] if t is not None)
        return backward(*args, spread=spread, **kw)

    bst.triton_backward = spread_backward
    try:
        yield
    finally:
        for table, name, stub in saved:
            table[name] = stub
        fine._launch, bst.triton_backward = fine_launch, backward


@contextlib.contextmanager
def _planned_fine() -> Iterator[None]:
    """VSA's fine branch takes its per-call plan (:mod:`~dit_accel.kernels.vsa.fine`) under the counting mode too,
    as an eager call does without one (the path refuses a dispatch mode, which may intercept its launch; here the
    launch is a stub and the mode only watches)."""
    from ..kernels.request import records_grad
    from ..kernels.vsa import fine

    saved = fine._direct
    fine._direct = lambda q, k, v: not records_grad(q, k, v)
    try:
        yield
    finally:
        fine._direct = saved


def measure_traffic(*, grid: Tuple[int, int, int] = (21, 30, 52), heads: int = 2, head_dim: int = 64,
                    cases=CASES, tile=None) -> Dict[str, Dict[str, float]]:
    """``{case: {"ops", "bytes", "units"}}`` per call (module docstring); ``tile``: the Tile method of the ``tile``
    cases (default Wan's recommended one; a grid it covers whole runs dense attention, counted as torch operators).
    Needs ``TRITON_INTERPRET=1`` set before triton was imported; raises RuntimeError otherwise."""
    import math

    import torch

    from .._util import env_set
    from ..kernels.backends import triton_reason
    from ..kernels.block_sparse.gather import ENV_GATHER
    from ..kernels.sla.glue import ENV_GLUE
    from ..kernels.sla import sla_attention
    from ..kernels.vsa import vsa_attention
    from ..methods import SLA, Tile
    from .host_path import stub_launches, twin_coarse

    if triton_reason("cpu") is not None:
        raise RuntimeError("measure_traffic needs TRITON_INTERPRET=1 set before triton is imported "
                           "(run `python -m dit_accel.eval.traffic`)")
    n = math.prod(grid)
    gen = torch.Generator().manual_seed(0)
    shape = (1, heads, n, head_dim)
    q, k, v, gate, do = (torch.randn(shape, generator=gen, dtype=torch.float16) for _ in range(5))
    qg, kg, vg, gg = (t.clone().requires_grad_() for t in (q, k, v, gate))
    plan = (Tile(tile=(6, 8, 8), window=(3, 3, 3), fit=True) if tile is None else tile).plan(tuple(grid))
    proj = torch.nn.Linear(head_dim, head_dim).to(torch.float16).requires_grad_(False)
    sla = SLA(topk=0.05)

    def vsa(grad: bool, with_gate: bool = True):
        args = (qg, kg, vg) if grad else (q, k, v)
        g = (gg if grad else gate) if with_gate else None
        return vsa_attention(*args, tuple(grid), sparsity=0.9, gate=g, backend="triton")

    def backward(out):  # (each call's gradients new, as a training step's after zero_grad(set_to_none=True))
        for t in (qg, kg, vg, gg):
            t.grad = None
        out.backward(do)

    runs = {
        "tile": lambda: plan.run(q, k, v, backend="triton"),
        "tile_raster": lambda: plan.run(q, k, v, backend="triton"),
        "tile_train": lambda: backward(plan.run(qg, kg, vg, backend="triton")[0]),
        "tile_train_raster": lambda: backward(plan.run(qg, kg, vg, backend="triton")[0]),
        "vsa": lambda: vsa(False),
        "vsa_raster": lambda: vsa(False),
        "vsa_nogate": lambda: vsa(False, with_gate=False),
        "vsa_train": lambda: backward(vsa(True)),
        "vsa_train_raster": lambda: backward(vsa(True)),
        "sla": lambda: sla_attention(q, k, v, sla, proj, backend="triton"),
        "sla_train": lambda: backward(sla_attention(qg, kg, vg, sla, proj, backend="triton")),
        "sla_train_glue": lambda: backward(sla_attention(qg, kg, vg, sla, proj, backend="triton")),
    }
    unit = q.numel() * q.element_size()
    out, kernel = {}, {"kernel_bytes": 0}
    with stub_launches(), twin_coarse(), _twin_classify(), _planned_fine(), _kernel_bytes(kernel), \
            warnings.catch_warnings():
        # (the launches the stubs leave, such as the backward's preprocess in the interpreter, read unwritten
        # outputs of stubbed ones: numpy's warnings about their values say nothing about the bytes)
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in cases:
            # (the cases that gather stay as they are: DIT_ACCEL_GATHER=0 but for the raster ones)
            with torch.set_grad_enabled("_train" in name), env_set(ENV_GATHER, str(int(name in RASTER))), \
                    env_set(ENV_GLUE, str(int(name in GLUE))):
                runs[name]()  # (first call: layouts, plans, the coarse twin's kept result)
                kernel["kernel_bytes"] = 0
                counts = count_traffic(runs[name])
            out[name] = {**counts, "units": counts["bytes"] / unit}
            if name.startswith("sla") or name in ("vsa_raster", "vsa_train_raster"):
                out[name]["kernel_units"] = kernel["kernel_bytes"] / unit
    return out


def main(argv=None) -> dict:
    import argparse

    from .._util import positive_int

    def grid_arg(text: str):
        try:
            return tuple(int(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated ints such as 21,30,52") from None

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="21,30,52", type=grid_arg, help="the video token grid T,H,W")
    parser.add_argument("--heads", type=positive_int, default=2)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    grid = args.grid
    if len(grid) != 3 or min(grid) < 1:
        parser.error(f"--grid {','.join(map(str, grid))}: expected a video token grid of three positive ints T,H,W "
                     "such as 21,30,52 (every case cuts it into 3-D tiles and cubes)")
    from .._util import file_error

    problem = file_error(args.json, "--json", "traffic.json") if args.json is not None else None
    if problem:  # now, not in a traceback after the counting
        parser.error(problem)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from ..kernels.request import BackendUnavailable

    try:
        result = measure_traffic(grid=grid, heads=args.heads, head_dim=args.head_dim)
    except (ValueError, BackendUnavailable) as exc:  # a grid too small for a case's tiles or the Triton kernels
        parser.error(f"--grid {','.join(map(str, grid))} --heads {args.heads} --head-dim {args.head_dim}: {exc}")
    print(f"{'case':17s} {'ops':>5s} {'MB':>9s} {'q units':>8s}  (MODELLED, grid {grid}, {args.heads} heads of "
          f"{args.head_dim}, float16, kernels stubbed)")
    for name, row in result.items():
        glue = f"  (+ {row['kernel_units']:.1f} in its kernels' glue)" if "kernel_units" in row else ""
        print(f"{name:17s} {row['ops']:5d} {row['bytes'] / 1e6:9.1f} {row['units']:8.1f}{glue}")
    if args.json:
        from ..atomic_files import atomic_write_json

        atomic_write_json(args.json, {"grid": list(grid), "heads": args.heads, "head_dim": args.head_dim,
                                      "cases": result}, indent=1)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
