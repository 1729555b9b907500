"""Kernel benchmark: block-sparse and SLA attention against dense, at model shapes.

:func:`bench_kernels` times, for each model shape and target density:

- dense SDPA (``torch.nn.functional.scaled_dot_product_attention``); on GPUs also
  the in-repo dense Triton kernel and flash-attn's dense kernel when ``flash_attn``
  is installed;
- :func:`dit_accel.kernels.block_sparse_attention` on every usable backend, with
  a sliding-tile layout from :func:`dit_accel.patterns.tile_layout` whose window
  is chosen to land nearest the target density (q/k/v already in tiled order:
  the permutation is not timed); on CPU also ``torch.compile(flex_attention)`` with
  a ``BlockMask`` of the same layout;
- :func:`dit_accel.kernels.sla.sla_attention` with ``topk = density`` and a
  zero-initialised projection (sparse plus linear branch).

It reports time, dense-equivalent TFLOPS ``4*B*H*N^2*D / t`` (``N`` = real
tokens, whatever the kernel visits), speedup over dense SDPA, and the fraction
of the ideal speedup reached: ``speedup x true_density``, the pattern's own
visited token pairs over ``N^2`` (Tile rows: the window's ``token_density``),
so the ideal is ``1/true_density`` (issue 72). The work the padded blocks add is
its own column, ``padded_work``: the kernel's visited block density scaled to the
dense computation over the real tokens, ``work_vs_dense = density * (Np/N)^2``
(``Np`` = tokens after tile padding), over the true density. SLA rows take both from the timed call's own top-k
(:func:`dit_accel.kernels.sla.sla_visited`): whether a ragged last key block is picked is the data's. The
contenders of a shape and density run in interleaved rounds, and speedups are medians of per-round ratios. On CPU the
shapes are reduced (fewer tokens and heads) and the output says so; every case
runs at each requested thread count.

On CUDA each contender is also timed the ways a pipeline sees it
(:func:`dit_accel.eval.timing.measure_call`): latency of one call from an idle GPU,
throughput of back-to-back calls (and of a CUDA-graph replay where the contender can be
captured), and the host time per call; rows then carry the effective TFLOP/s on the
tiles the kernel visits (``tflops_visited``). The dense contenders on CUDA are SDPA
(whatever PyTorch picks), SDPA pinned to its flash and to its cuDNN backend, the in-repo
dense Triton kernel, flash-attn 2, 3 and 4 when installed, and compiled FlexAttention
without a mask.

:func:`model_kernels` predicts the same table from static facts with the cost model
(:mod:`dit_accel.kernels.cost`), with no GPU: its rows say ``"modelled": True``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import statistics
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._util import load_average, time_median, versions
from .report import percent_down

__all__ = ["ModelShape", "GPU_SHAPES", "CPU_SHAPES", "CPU_QUICK_SHAPES", "DENSITIES", "bench_kernels",
           "tile_layout_for_density", "time_fn", "bench_sla", "model_kernels", "kernels_table",
           "extra_dense_contenders"]


@dataclass(frozen=True)
class ModelShape:
    name: str
    grid: Tuple[int, ...]
    heads: int
    head_dim: int = 128
    batch: int = 1

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


# Real shapes: latent token grids after patchify; heads/head dim from the model configs.
GPU_SHAPES = (
    ModelShape("Wan2.1 480p", (21, 30, 52), 12),      # N = 32,760 (1.3B: 12 heads of 128)
    ModelShape("Wan2.1 720p", (21, 45, 80), 12),      # N = 75,600
    ModelShape("HunyuanVideo 720p", (30, 48, 80), 24),  # N = 115,200
    ModelShape("FLUX 1024px", (64, 64), 24),          # N = 4,096
    ModelShape("FLUX 4K", (256, 256), 24),            # N = 65,536
)
# CPU: the same models at reduced grids and 2 heads, so a 2-core machine finishes.
CPU_SHAPES = (
    ModelShape("Wan2.1 480p (reduced)", (6, 15, 26), 2),
    ModelShape("HunyuanVideo 720p (reduced)", (8, 12, 20), 2),
    ModelShape("FLUX 1024px (reduced)", (48, 48), 2),
)
CPU_QUICK_SHAPES = (ModelShape("Wan2.1 480p (reduced)", (6, 15, 26), 2),)
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
CPU_QUICK_DENSITIES = (0.1, 0.25, 0.5)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()``: CUDA events on GPU, perf_counter on CPU."""
    return time_median(fn, device, warmup=warmup, repeats=repeats)


def tile_layout_for_density(grid: Sequence[int], density: float, block: int = 64):
    """Sliding-tile layout on ``grid`` whose visited density is nearest ``density`` (``Tile.at_density``).

    Returns ``(perm, layout, window)``.
    """
    method, perm, layout = _tile_case(grid, density, block)
    return perm, layout, method.window


def _tile_case(grid: Sequence[int], density: float, block: int = 64, tile=None):
    """``(Tile config, perm, layout)`` of :func:`tile_layout_for_density` (the config searched once);
    ``tile``: the STA tile to search windows for (default a 64-token tile)."""
    from ..methods import Tile
    from ..patterns import tile_layout

    method = Tile().at_density(tuple(grid), density, tile=tile)
    perm, layout = tile_layout(tuple(grid), method.tile, method.window, block_q=block, block_k=block)
    return method, perm, layout


def _target_miss(shape: ModelShape, target: float, layout) -> Optional[str]:
    """The note of a target density no Tile layout of ``shape`` comes within 1.5x of, naming the density its rows
    run at; None when one does (before: rows at 0.026 for --densities 0.0001, unsaid). (1.5x: the windows' steps
    on the reduced CPU grids put the defaults 0.1 and 0.25 at 0.128 and 0.231, which are no surprise.)"""
    reached = layout.density()
    if abs(math.log(reached / target)) <= math.log(1.5):
        return None
    return (f"{shape.name} density {target:g}: no Tile layout on grid {tuple(shape.grid)} visits that share of the "
            f"blocks; the nearest visits {reached:.3f}, the density its tile rows ran at")


def bench_kernels(shapes: Sequence[ModelShape], densities: Sequence[float], *, device="cpu",
                  dtype: Optional[torch.dtype] = None, warmup: Optional[int] = None, repeats: Optional[int] = None,
                  backends: Optional[Sequence[str]] = None, sla: bool = True, flex_compiled: Optional[bool] = None,
                  threads: Optional[Sequence[int]] = None, log=print, progress: bool = True,
                  call_timer=None, vsa: bool = True, on_progress=None) -> dict:
    """Time dense and sparse attention kernels; returns a JSON-ready dict (``rows`` list, ``complete`` True).

    For every shape and target density the contenders run interleaved: each round times every
    contender once, in an order that rotates between rounds (load from other processes hits all
    of them alike), and a row's ``speedup`` is the median over rounds of dense SDPA's time over
    the contender's (its ``time_ms`` is the median round). Rows carry the visited block
    ``density`` and, for the tile layouts, the ``token_density`` (the fraction of token pairs the
    pattern attends: the work an ideal kernel would do).

    Args:
        shapes: model shapes (:data:`GPU_SHAPES`, :data:`CPU_SHAPES`).
        densities: target visited densities in ``(0, 1]``.
        device: ``"cpu"`` or ``"cuda"``; dtype defaults to bf16 on CUDA, fp32 on CPU.
        warmup, repeats: warm-up calls and timed rounds (defaults 3/10 on CUDA, 1/5 on CPU).
        backends: block-sparse backends to time (default: triton on CUDA when usable, the
            PyTorch twin on CPU; the ``flex`` backend runs FlexAttention eagerly, which builds
            the score matrix: ask for it by name).
        flex_compiled: also time ``torch.compile(flex_attention)`` with a ``BlockMask`` of the
            same layout, what a PyTorch user would write (default: on; compiled before the
            rounds, not timed).
        threads: CPU only, the ``torch.set_num_threads`` values to run everything at (default:
            the current count); each row records its count.
        call_timer: the :class:`~dit_accel.eval.timing.CallTimer` of the per-contender call timings
            (default: CUDA events on CUDA, none on CPU; tests pass a fake one).
        on_progress: called with the result so far (``complete`` False) after each shape, so that a run stopped
            part-way keeps what it timed (``bench kernels --out`` writes it).

    The dense contenders are :func:`dit_accel.kernels.dense.dense_contenders`: SDPA, the
    in-repo dense Triton kernel (CUDA) and flash-attn (when installed).
    """
    from tqdm.auto import tqdm

    from ..kernels import available_backends

    device = torch.device(device)
    cuda = device.type == "cuda"
    if threads and cuda:
        raise ValueError("threads= sets CPU thread counts; leave it out on CUDA")
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    warmup = warmup if warmup is not None else (3 if cuda else 1)
    repeats = repeats if repeats is not None else (10 if cuda else 5)
    flex_compiled = True if flex_compiled is None else flex_compiled
    usable = {name: why for name, why in available_backends(device).items()}
    if backends is None:
        # CPU: the PyTorch twin; GPU: Triton (the twin at 100k tokens takes minutes per call, eager flex
        # builds the N x N scores; ask for them by name). Compiled flex is its own contender on both.
        fast = [b for b, why in usable.items() if why is None and b == "triton"]
        backends = fast if cuda and fast else ["torch"]
    notes = [f"{b}: {usable[b]}" for b in usable if usable[b] is not None]
    if not cuda:
        notes.append("CPU run: reduced shapes (fewer tokens and heads than the real models); the Triton kernels "
                     "need a GPU. Not comparable with GPU numbers.")
    if cuda:
        try:
            import flash_attn  # noqa: F401
        except Exception:  # not installed, or built for another torch
            notes.append("flash-attn not installed: no flash-attn row")
    threads = list(threads) if threads else [torch.get_num_threads()]
    before = torch.get_num_threads()
    rows: List[dict] = []
    bar = tqdm(total=len(threads) * len(shapes) * len(densities), desc="bench kernels", unit="case",
               disable=not progress)
    load_start = load_average()

    def result(complete: bool) -> dict:
        return {"kind": "kernels", "device": str(device), "device_name": _device_name(device), "dtype": str(dtype),
                "reduced_sizes": not cuda, "load_average": load_start, "load_average_end": load_average(),
                "warmup": warmup, "repeats": repeats, "backends": list(backends), "flex_compiled": flex_compiled,
                "threads": None if cuda else threads, "timing": "interleaved rounds, median of per-round ratios",
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "versions": versions(("torch", "triton")), "notes": list(notes), "complete": complete,
                "rows": list(rows)}

    try:
        for count in threads:
            if not cuda:
                torch.set_num_threads(count)
            for shape in shapes:
                bar.set_postfix_str(f"{shape.name}, {count} threads" if not cuda else shape.name)
                rows += _bench_shape(shape, densities, device, dtype, warmup, repeats, backends, sla, flex_compiled,
                                     notes, bar, None if cuda else count, call_timer, vsa=vsa)
                if on_progress is not None:
                    on_progress(result(False))
    finally:
        torch.set_num_threads(before)
        bar.close()
    return result(True)


def _shape_row(shape: ModelShape, threads, kernel: str, times: List[float], base: List[float], density: float,
               **extra) -> dict:
    """One row of :func:`bench_kernels`: the median time, dense-equivalent and visited TFLOPS, the speedup over
    ``base`` (dense SDPA, same rounds) and its fraction of the 1/true-density ideal (padded work its own column)."""
    seconds = statistics.median(times)
    flops = 4.0 * shape.batch * shape.heads * shape.tokens ** 2 * shape.head_dim
    speedup = statistics.median(s / t for s, t in zip(base, times))
    work = extra.pop("work_vs_dense", None)  # (SLA's: its call's visited blocks in full)
    if work is None:  # vs dense on N tokens
        work = density * (extra.get("padded_tokens", shape.tokens) / shape.tokens) ** 2
    true = extra.get("token_density") or density  # the pattern's visited pairs / N^2 (issue 72)
    timing = extra.pop("call_timing", None)
    out = {"shape": shape.name, "grid": list(shape.grid), "tokens": shape.tokens, "heads": shape.heads,
           "head_dim": shape.head_dim, "batch": shape.batch, "threads": threads, "kernel": kernel,
           "density": density, "true_density": true, "time_ms": seconds * 1e3,
           "tflops_dense_equiv": flops / seconds / 1e12, "speedup": speedup, "work_vs_dense": work,
           "padded_work": work / true, "ideal_speedup": 1.0 / true, "fraction_of_ideal": speedup * true,
           # the FLOPs of the tiles the kernel visits (padded tiles included), at the median round's time
           "tflops_visited": flops * work / seconds / 1e12, **extra}
    if timing is not None:
        out.update(call_timing_fields(timing, flops * work))
    return out


def _sparse_contenders(shape: ModelShape, target: float, q, k, v, gen, device, dtype, backends, sla, flex_compiled,
                       notes, vsa: bool = True) -> Tuple[dict, dict]:
    """The sparse calls timed at one target density, ``(name -> call, name -> row fields)``: the tile layout on
    each backend (and compiled FlexAttention), and SLA."""
    from ..kernels import block_sparse_attention
    from ..kernels.sla import sla_attention, sla_density, sla_visited
    from ..methods import SLA
    from ..patterns.tile import tile_token_density

    b, h, n, d = q.shape
    calls, meta = {}, {}
    try:
        method, perm, layout = _tile_case(shape.grid, target)
    except Exception as exc:
        notes.append(f"{shape.name} density {target}: no tile layout ({type(exc).__name__}: {exc})")
        layout = None
    if layout is not None:
        notes.extend(filter(None, [_target_miss(shape, target, layout)]))
        np_ = perm.num_padded
        qp, kp, vp = (torch.randn(b, h, np_, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
        lay = layout.to(device)
        tile_meta = dict(density=layout.density(), target_density=target, window=list(method.window),
                         token_density=tile_token_density(shape.grid, method.tile, method.window),
                         padded_tokens=np_, partial_fraction=layout.partial_fraction())
        for backend in backends:
            name = f"block-sparse tile [{backend}]"
            calls[name] = partial(block_sparse_attention, qp, kp, vp, lay, backend=backend)
            meta[name] = tile_meta
        if flex_compiled:
            from torch.nn.attention.flex_attention import flex_attention

            from ..kernels.block_sparse.flex import kernel_options, layout_to_block_mask

            compiled = torch.compile(flex_attention, dynamic=False)
            block_mask = layout_to_block_mask(lay)
            calls["block-sparse tile [flex, compiled]"] = partial(
                compiled, qp, kp, vp, block_mask=block_mask, kernel_options=kernel_options(lay, device))
            meta["block-sparse tile [flex, compiled]"] = tile_meta
    if sla:
        method = SLA(topk=target)
        proj = torch.nn.Linear(d, d).to(device, dtype)
        torch.nn.init.zeros_(proj.weight)
        torch.nn.init.zeros_(proj.bias)
        calls["SLA (sparse+linear)"] = partial(sla_attention, q, k, v, method, proj)
        visited = sla_visited(q, k, method)  # (this call's top-k: a ragged last key block's share is the data's)
        meta["SLA (sparse+linear)"] = dict(density=sla_density(n, method), target_density=target,
                                           token_density=visited["true_density"],
                                           work_vs_dense=visited["work_vs_dense"])
    if vsa and len(shape.grid) == 3:  # VSA (training-free: no gate) keeps the same fraction of its 4x4x4 cubes
        calls["VSA (cubes, no gate)"], meta["VSA (cubes, no gate)"] = _vsa_contender(shape.grid, target, q, k, v)
    return calls, meta


def _vsa_contender(grid, target: float, q, k, v):
    """``(call, row fields)`` of VSA at the top-k that keeps ``target`` of the key cubes (at least one).

    ``token_density``: the real token pairs the call's selection visits / N^2, and ``padded_tokens``: the cubes'
    positions, as ``bench gpu``'s VSA rows: where cubes are partial (Wan's 21 frames, an extent under 4, which
    shrinks the cube) the share of the cubes is neither the true density nor the work."""
    from ..kernels.vsa import vsa_attention
    from ..kernels.vsa.naive import cubes_of

    tile = (4, 4, 4)
    cubes = cubes_of(tuple(grid), tile)  # (the tile clamped to the grid, as the call cuts it)
    topk = max(1, round(target * cubes.count))
    with torch.no_grad():
        selection = vsa_attention(q, k, v, tuple(grid), topk=topk, tile=tile, return_selection=True)[1]
    sizes = cubes.sizes.to(selection.device, torch.float64)
    pairs = float((sizes[None, None, :, None] * sizes[selection]).sum())
    true = pairs / (selection.shape[0] * selection.shape[1] * math.prod(grid) ** 2)
    return (partial(vsa_attention, q, k, v, tuple(grid), topk=topk, tile=tile),
            dict(density=topk / cubes.count, target_density=target, cubes=cubes.count, topk=topk,
                 token_density=true, padded_tokens=cubes.perm.num_padded))


def _bench_shape(shape: ModelShape, densities, device, dtype, warmup, repeats, backends, sla, flex_compiled, notes,
                 bar, threads, call_timer=None, vsa: bool = True) -> List[dict]:
    """The rows of one shape: the dense contenders and, per density, the sparse ones, each density's set
    timed in interleaved rounds together with dense SDPA."""
    from ..kernels.dense import DENSE_CONTENDERS, dense_contenders
    from .bench_cpu import run_rounds

    gen = torch.Generator(device=device).manual_seed(0)  # draw on the device: GPU shapes are GBs
    b, h, n, d = shape.batch, shape.heads, shape.tokens, shape.head_dim
    q, k, v = (torch.randn(b, h, n, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
    sdpa = DENSE_CONTENDERS[0]
    cuda = device.type == "cuda"
    dense = dense_contenders(q, k, v) if cuda else {sdpa: dense_contenders(q, k, v)[sdpa]}
    if cuda:
        dense.update(extra_dense_contenders(q, k, v, notes))
    rows: List[dict] = []
    if cuda and call_timer is None:
        from .timing import CudaCallTimer

        call_timer = CudaCallTimer(device)
    row = partial(_shape_row, shape, threads)

    def timed(calls: dict) -> dict:
        """Per contender, :func:`measure_call` on CUDA (after the rounds warmed everything up)."""
        if call_timer is None:
            return {}
        from .timing import measure_call

        out = {}
        for name, fn in calls.items():
            try:
                out[name] = measure_call(fn, call_timer, calls=max(repeats, 3), repeats=max(repeats // 2, 3))
            except Exception as exc:
                notes.append(f"{shape.name} {name}: call timing failed ({type(exc).__name__}: {exc})"[:300])
        return out

    with torch.no_grad():
        _drop_failing(dense, shape, notes)
        times = run_rounds(dense, repeats, device=device, warmup=warmup)
        extra = timed(dense)
        rows += [row(name, t, times[sdpa], 1.0, call_timing=extra.get(name)) for name, t in times.items()]
        for target in densities:
            sparse, meta = _sparse_contenders(shape, target, q, k, v, gen, device, dtype, backends, sla,
                                              flex_compiled, notes, vsa=vsa)
            calls = {sdpa: dense[sdpa], **sparse}
            _drop_failing(calls, shape, notes)
            times = run_rounds(calls, repeats, device=device, warmup=warmup)
            extra = timed({name: fn for name, fn in calls.items() if name != sdpa})
            rows += [row(name, t, times[sdpa], **meta[name], call_timing=extra.get(name))
                     for name, t in times.items() if name != sdpa]
            bar.update(1)
    return rows


def _drop_failing(calls: dict, shape: ModelShape, notes: List[str]) -> None:
    """Call every contender but the first (dense SDPA) once; one that cannot run here becomes a note."""
    for name in list(calls)[1:]:
        try:
            calls[name]()
        except Exception as exc:
            notes.append(f"{shape.name} {name}: failed ({type(exc).__name__}: {exc})"[:300])
            del calls[name]


def call_timing_fields(timing, visited_flops: float) -> dict:
    """Row fields of a :class:`~dit_accel.eval.timing.CallTiming` (ms, host us, TFLOP/s on visited tiles
    at the back-to-back throughput)."""
    def ms(value):
        return None if value is None else value * 1e3

    return {"latency_ms": ms(timing.latency_s), "throughput_ms": ms(timing.throughput_s),
            "graph_ms": ms(timing.graph_s), "host_us": None if timing.host_s is None else timing.host_s * 1e6,
            "back_to_back_calls": timing.calls, "call_timing_notes": list(timing.notes),
            "tflops_visited_throughput": (visited_flops / timing.throughput_s / 1e12
                                          if timing.throughput_s else None)}


def extra_dense_contenders(q, k, v, notes: List[str], scale: Optional[float] = None, flex: bool = True) -> dict:
    """The dense contenders beside :func:`~dit_accel.kernels.dense.dense_contenders` on CUDA: SDPA pinned to
    its flash and to its cuDNN backend, flash-attn 3 (``flash_attn_interface``) and flash-attn 4
    (``flash_attn.cute``) when installed, compiled FlexAttention without a mask (``flex``). What is missing is a note;
    what cannot run these inputs is dropped later by the first call (also a note)."""
    out = {}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        notes.append("torch.nn.attention.sdpa_kernel missing: no per-backend SDPA rows")
    else:
        for label, which in (("dense SDPA [flash]", "FLASH_ATTENTION"), ("dense SDPA [cuDNN]", "CUDNN_ATTENTION")):
            backend = getattr(SDPBackend, which, None)
            if backend is None:
                notes.append(f"SDPBackend.{which} missing in torch {torch.__version__}: no {label} row")
                continue

            def pinned(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)

            out[label] = pinned
    bnhd = None

    def as_bnhd():
        nonlocal bnhd
        if bnhd is None:
            bnhd = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
        return bnhd

    for label, module, attr in (("flash-attn 3 (dense)", "flash_attn_interface", "flash_attn_func"),
                                ("flash-attn 4 (dense)", "flash_attn.cute.interface", "flash_attn_func")):
        try:
            fn = getattr(__import__(module, fromlist=[attr]), attr)
        except Exception:
            notes.append(f"{label.split(' (')[0]} not installed ({module}): no row")
            continue
        qf, kf, vf = as_bnhd()
        out[label] = partial(fn, qf, kf, vf, softmax_scale=scale)
    if not flex:
        return out
    try:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        out["dense FlexAttention [compiled]"] = partial(compiled, q, k, v, scale=scale)
    except Exception as exc:
        notes.append(f"compiled FlexAttention (dense): {type(exc).__name__}: {exc}"[:200])
    return out


def _device_name(device: torch.device) -> str:
    import os
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def kernels_table(result: dict) -> str:
    """Markdown table of a :func:`bench_kernels` (or :func:`model_kernels`) result; the GPU call timings
    (latency, back-to-back, graph, host) appear when the rows have them."""
    from .report import markdown_table

    from .._util import format_time

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    def ms(value):  # times to 3 significant figures, in ms or s
        return "-" if value is None else format_time(value / 1e3)

    threads = any(r.get("threads") for r in result["rows"])
    calls = any(r.get("latency_ms") is not None for r in result["rows"])
    header = ["shape", "N", "H", *(["threads"] if threads else []), "kernel", "density", "token density", "time",
              *(["latency", "back-to-back", "graph", "host us"] if calls else []),
              "TFLOPS (dense-eq.)", "TFLOPS (visited)", "speedup", "ideal", "% of ideal", "padded work"]
    rows = [[r["shape"], str(r["tokens"]), str(r["heads"]), *([str(r.get("threads"))] if threads else []),
             r["kernel"], f"{r['density']:.3f}",
             f"{r['token_density']:.3f}" if r.get("token_density") is not None else "-",
             ms(r["time_ms"]),
             *([ms(r.get("latency_ms")), ms(r.get("throughput_ms")), ms(r.get("graph_ms")),
                num(r.get("host_us"), ".0f")] if calls else []),
             f"{r['tflops_dense_equiv']:.4f}", num(r.get("tflops_visited"), ".4f"),
             f"{r['speedup']:.2f}x" if r["speedup"] else "-", f"{r['ideal_speedup']:.1f}x",
             percent_down(r["fraction_of_ideal"]) if r["fraction_of_ideal"] else "-",
             num(r.get("padded_work"), ".2f")] for r in result["rows"]]
    table = markdown_table(header, rows)
    if result.get("modelled"):
        table = ("**MODELLED, not measured** (dit_accel.kernels.cost; constants: "
                 f"{result['constants_source']})\n\n" + table)
    return table


def _wide_query_facts(method, perm, layout, facts: dict, h: int, b: int, arch: str):
    """With ``tile``: the query block a CUDA plan runs, and whether ``ws`` applies to it (added to ``facts``);
    returns the row name and the resumed 128-row blocks (None where the plan runs 64-row blocks)."""
    from ..kernels import cost
    from ..kernels.block_sparse.configs import ws_pays
    from ..patterns.separable import wide_query_layout

    wide = wide_query_layout(perm, layout)
    name = f"block-sparse tile {tuple(method.tile)} q{64 if wide is None else 128}"
    facts.update(tile=list(method.tile), cuda_block_q=64 if wide is None else 128, ws_pays=None)
    resumed = None
    if wide is not None:
        wc = cost.tile_counts(wide, heads=h, batch=b)
        resumed = float((wide.kv_mask_ids >= 0).any(-1).sum()) * b * (h if wide.num_heads == 1 else 1)
        if "ws" in cost.kernels_for(arch):  # (h200 has no ws constants: ws_pays raised there, a raw traceback)
            facts["ws_pays"] = ws_pays(wc.full_tiles, wc.partial_tiles, resumed, 128, 64, arch)
    return name, resumed


def _modelled_result(arch: str, kernels, base, skipped: Dict[str, str], rows: List[dict],
                     notes: Sequence[str] = ()) -> dict:
    """:func:`model_kernels`'s table with what it modelled: the constants, their sources, the notes."""
    from ..kernels import cost

    return {"kind": "kernels", "modelled": True, "device": f"modelled {arch}", "device_name": f"MODELLED {arch}",
            "dtype": "torch.bfloat16", "reduced_sizes": False, "arch": arch, "kernels": kernels,
            "constants_source": base.source,
            "constants": {cost.constants(arch, k).name: {**dataclasses.asdict(cost.constants(arch, k))}
                          for k in kernels},
            "timing": "MODELLED by dit_accel.kernels.cost (no GPU ran anything)",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": versions(("torch",)), "notes": [
                "modelled rows: time = per_call + (CTAs x per_cta + tiles x per_tile) / (SMs x CTAs per SM); "
                "the 'current' constants are a fit to BENCHMARKS.md section 10 (H100); the other kernel variants "
                "model kernels not yet measured"] + [f"no '{k}' rows where the layout cannot run it: {why}"
                                                     for k, why in skipped.items()] + list(notes), "rows": rows}


def model_kernels(shapes: Sequence[ModelShape], densities: Sequence[float], *, arch: str = "h100",
                  kernels: Optional[Sequence[str]] = None, sla: bool = True, tile=None) -> dict:
    """The :func:`bench_kernels` table predicted by the cost model (:mod:`dit_accel.kernels.cost`), no GPU.

    Static facts only: each shape's Tile layout at each target density (built on the CPU, as the
    benchmark builds it) gives the CTAs and the visited full and partial tiles; the constants of
    ``arch`` and of each modelled kernel variant (``kernels``, default all of
    :data:`dit_accel.kernels.cost.KERNELS`) turn them into seconds. Rows: dense SDPA and the dense
    Triton kernel, then per density one block-sparse row per kernel variant and an SLA row. Every row
    says ``"modelled": True``; the result names the constants' sources. A model, not a measurement.

    ``tile``: the STA tile the Tile windows are searched for (default a 64-token tile). Rows then
    name the tile and the query block a CUDA plan runs (``cuda_block_q``: 128 where every 128-row
    block's halves visit the same key tiles, :func:`~dit_accel.patterns.separable.wide_query_layout`).
    With 128-row blocks the sm_90 warp-specialized forward applies where
    :func:`~dit_accel.kernels.block_sparse.configs.ws_pays` says so (``ws_pays``), and a
    ``ws+resume`` row adds the resume pass's per-CTA term that ``ws_pays`` charges. A variant the layout
    cannot run (:func:`~dit_accel.kernels.block_sparse.configs.kernel_reason`: ``ws`` on 64-row blocks) gets no row;
    ``ws_pays`` is None on an ``arch`` without ``ws`` constants (``h200``). A density without a Tile layout (a 3-D
    ``tile`` at an image shape) keeps its SLA row and says why in the result's ``notes``.
    """
    from ..kernels import cost
    from ..kernels.sla import sla_density
    from ..methods import SLA

    kernels = list(kernels or cost.KERNELS)
    base = cost.constants(arch)
    rows: List[dict] = []
    skipped: Dict[str, str] = {}  # variant -> why a layout could not run it (the first reason)
    notes: List[str] = []  # densities without a tile layout (their SLA rows still run)
    for shape in shapes:
        b, h, n, d = shape.batch, shape.heads, shape.tokens, shape.head_dim
        flops = 4.0 * b * h * n * n * d
        sdpa_s = cost.dense_time(n, n, h, batch=b, head_dim=d, arch=arch)

        def row(kernel, seconds, density, work, **extra):
            speedup = sdpa_s / seconds
            true = extra.get("token_density") or density  # the pattern's visited pairs / N^2 (issue 72)
            return {"shape": shape.name, "grid": list(shape.grid), "tokens": n, "heads": h, "head_dim": d, "batch": b,
                    "threads": None, "kernel": kernel, "density": density, "true_density": true,
                    "time_ms": seconds * 1e3, "tflops_dense_equiv": flops / seconds / 1e12,
                    "tflops_visited": flops * work / seconds / 1e12, "speedup": speedup, "work_vs_dense": work,
                    "padded_work": work / true, "ideal_speedup": 1.0 / true,
                    "fraction_of_ideal": cost.ideal_fraction(seconds, sdpa_s, true), "modelled": True, **extra}

        rows.append(row("dense SDPA [modelled]", sdpa_s, 1.0, 1.0, constants=base.name))
        rows.append(row("dense Triton (dit_accel) [modelled]", cost.dense_time(n, n, h, batch=b, head_dim=d, arch=arch,
                                                                    contender="triton"), 1.0, 1.0,
                        constants=base.name))
        for target in densities:
            try:
                case = _tile_case(shape.grid, target, tile=tile)
            except Exception as exc:  # (a 3-D --tile at an image shape): a note; the SLA row still runs
                notes.append(f"{shape.name} density {target}: no tile layout ({exc})")  # (the CLI prints notes)
            else:
                notes.extend(filter(None, [_target_miss(shape, target, case[2])]))
                rows += _modelled_tile_rows(shape, target, case, tile, kernels, arch, row, skipped)
            if sla:
                method_sla = SLA(topk=target)
                dens = sla_density(n, method_sla)
                counts_sla = cost.sla_counts(n, method_sla, heads=h, batch=b)
                # (a top-k that picks blocks alike visits the block share; each block runs in full, ragged or not)
                sla_work = counts_sla.full_tiles * counts_sla.block_q * counts_sla.block_k / (b * h * n * n)
                rows.append(row("SLA (sparse+linear) [modelled]", cost.sla_time(counts_sla, head_dim=d, arch=arch),
                                dens, sla_work, target_density=target, constants=base.name))
    return _modelled_result(arch, kernels, base, skipped, rows, notes)


def _modelled_tile_rows(shape: ModelShape, target: float, case, tile, kernels, arch: str, row,
                        skipped: Dict[str, str]) -> List[dict]:
    """:func:`model_kernels`' block-sparse rows of one shape at one density: one per kernel variant the layout can
    run (``skipped`` gets why the others cannot), and a ``ws+resume`` row where the warp-specialized forward pays."""
    from ..kernels import cost
    from ..kernels.block_sparse.configs import kernel_reason
    from ..patterns.tile import tile_token_density

    method, perm, layout = case
    b, h, n, d = shape.batch, shape.heads, shape.tokens, shape.head_dim
    counts = cost.tile_counts(layout, heads=h, batch=b)
    work = cost.work_vs_dense(layout.density(), perm.num_padded, n)
    facts = dict(target_density=target, window=list(method.window), padded_tokens=perm.num_padded,
                 token_density=tile_token_density(shape.grid, method.tile, method.window),
                 partial_fraction=layout.partial_fraction(), ctas=counts.ctas,
                 tiles_per_q_block=counts.tiles_per_q_block)
    name, resumed = "block-sparse tile", None
    if tile is not None:
        name, resumed = _wide_query_facts(method, perm, layout, facts, h, b, arch)
    block_q = facts.get("cuda_block_q", layout.block_q)  # the rows the launch would run
    rows = []
    for kernel in kernels:
        why = kernel_reason(kernel, block_q, layout.block_k, d, arch)
        if why is not None:
            skipped.setdefault(kernel, why)
            continue
        c = cost.constants(arch, kernel)
        seconds = cost.block_sparse_time(counts, head_dim=d, arch=arch, kernel=kernel)
        rows.append(row(f"{name} [triton] [modelled: {kernel}]", seconds, layout.density(), work, constants=c.name,
                        **facts))
        if kernel == "ws" and facts.get("ws_pays"):  # + the resume pass over 128-row blocks with partials
            extra = resumed * c.per_cta_s * 2 / c.slots
            rows.append(row(f"{name} [triton] [modelled: ws+resume]", seconds + extra, layout.density(), work,
                            constants=c.name, **facts))
    return rows


def _true(row: dict) -> float:
    """A row's true density (its ``true_density``; rows written before it had one: ``token_density`` or ``density``)."""
    return row.get("true_density") or row.get("token_density") or row["density"]


def plot_kernels(result: dict, path) -> None:
    """Speedup vs true density (visited token pairs / N^2) per shape, one line per kernel, with the 1/true-density
    ideal of the table's "ideal" column (the visited-block density put a Tile, VSA or SLA point above an ideal line
    it does not reach)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker used below)

    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in result["rows"] if r["shape"] == shape and r["density"] < 1.0]
        for kernel, threads in dict.fromkeys((r["kernel"], r.get("threads")) for r in rows):
            pts = sorted((_true(r), r["speedup"]) for r in rows
                         if r["kernel"] == kernel and r.get("threads") == threads and r["speedup"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=kernel + (f", {threads} threads" if threads else ""))
        ds = sorted({_true(r) for r in rows})
        if ds:
            ax.plot(ds, [1 / x for x in ds], "k--", alpha=0.5, label="ideal 1/true density")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.set_xlabel("true density (visited token pairs / N^2)")
        ax.set_ylabel("speedup vs dense SDPA")
        ax.set_title(shape, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['device_name']} ({result['dtype']})" + (" - reduced CPU shapes" if result["reduced_sizes"]
                                                                      else ""), fontsize=9)
    fig.tight_layout()
    from ..atomic_files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))  # (a failed write leaves the old plot, as report.py's)
    plt.close(fig)


def bench_sla(n_tokens: int = 32760, heads: int = 12, head_dim: int = 128, *, topk: float = 0.05,
              dtype: torch.dtype = torch.bfloat16, backward: bool = True, batch: int = 1,
              warmup: int = 3, iters: int = 10, device: str = "cuda") -> dict:
    """Time the fused SLA kernel against SDPA (dense) at one shape; CUDA only.

    Returns a dict with ``sla_fwd_ms``, ``sdpa_fwd_ms`` (and ``*_bwd_ms`` when ``backward``:
    forward+backward time), ``speedup_fwd``, ``density`` and ``ideal_speedup`` (1 / density).
    Default shape: Wan2.1-1.3B at 480p (N = 32,760, 12 heads, D = 128, bf16), 95% sparsity.
    """
    from ..kernels import sla_attention, sla_density
    from ..methods import SLA

    if not torch.cuda.is_available():
        raise RuntimeError("bench_sla needs a CUDA device")
    method = SLA(topk=topk)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, heads, n_tokens, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g, requires_grad=backward)
               for _ in range(3))
    proj = torch.nn.Linear(head_dim, head_dim, device=device, dtype=dtype)
    torch.nn.init.zeros_(proj.weight)
    torch.nn.init.zeros_(proj.bias)

    def timed(fn):  # milliseconds
        return time_fn(fn, torch.device(device), warmup=warmup, repeats=iters) * 1e3

    def sla_fwd():
        with torch.no_grad():
            sla_attention(q, k, v, method, proj, backend="triton")

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    out = {"n_tokens": n_tokens, "heads": heads, "head_dim": head_dim, "dtype": str(dtype),
           "density": sla_density(n_tokens, method)}
    out["ideal_speedup"] = 1.0 / out["density"]
    out["sla_fwd_ms"], out["sdpa_fwd_ms"] = timed(sla_fwd), timed(sdpa_fwd)
    out["speedup_fwd"] = out["sdpa_fwd_ms"] / out["sla_fwd_ms"]
    if backward:
        do = torch.randn(shape, device=device, dtype=dtype, generator=g)
        out["sla_fwd_bwd_ms"] = timed(lambda: sla_attention(q, k, v, method, proj, backend="triton").backward(do))
        out["sdpa_fwd_bwd_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v).backward(do))
        out["speedup_fwd_bwd"] = out["sdpa_fwd_bwd_ms"] / out["sla_fwd_bwd_ms"]
    return out
