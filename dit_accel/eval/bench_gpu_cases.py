"""The timed cases of one shape for ``dit-accel bench gpu`` (dense contenders, layout methods, SLA), and the fp32
twins each timed row is checked against (:mod:`dit_accel.eval.bench_gpu` runs them)."""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, Dict, Optional

import torch

from ..kernels.block_sparse.api import DENSE
from .bench import ModelShape, call_timing_fields, extra_dense_contenders

#: Relative error against the fp32 twin above which a row fails (issue 35's targets).
O_TOLERANCE = 1e-2
GRAD_TOLERANCE = 2e-2
#: Heads of the first batch entry that the fp32 twins compute (all heads are alike to the kernels).
TWIN_HEADS = 1
#: A timed span aims at this many seconds: back-to-back calls are fewer for long calls.
SPAN_S = 0.25


def _method(name: str, grid, density: float):
    return _method_cached(name, tuple(grid), float(density))


@functools.lru_cache(maxsize=64)
def _method_cached(name: str, grid, density: float):
    """The method at ``density`` on ``grid``: searched once (GNA's window search takes tens of seconds at 720p),
    then shared by the autotune on/off rows and the shapes of one grid."""
    from ..methods import GNA, SLA, Radial, Tile

    if name in ("sla", "sla-topk"):
        return SLA(topk=density)
    if name == "radial":
        return Radial()  # its density is fixed by its rule
    if name == "tile-128":  # a 128-token STA tile: CUDA calls run 128-row query blocks (sm_90: ws + resume)
        return Tile().at_density(tuple(grid), density, tile=(1, 16, 8) if len(grid) == 3 else (16, 8))
    if name == "tile-fit":  # the same setting with its tile fitted to the grid (no padded tiles, no masked tiles)
        return Tile().at_density(tuple(grid), density).replace(fit=True)
    return {"tile": Tile, "gna": GNA}[name]().at_density(tuple(grid), density)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _skipped(shape: ModelShape, kernel: str, density, why: str) -> dict:
    return {"shape": shape.name, "tokens": shape.tokens, "heads": shape.heads, "batch": shape.batch,
            "kernel": kernel, "density": density, "pass": "-", "status": "skipped", "error": why}


def _set_autotune(mode: str) -> None:
    from ..kernels import autotune as tuner

    os.environ[tuner.ENV_AUTOTUNE] = "1" if mode == "on" else "0"


# ----------------------------------------------------------------------------- correctness
def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32 (inf when either is not finite)."""
    out, ref = out.float(), ref.float()
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    return err if math.isfinite(err) else float("inf")


def fp32_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, do: Optional[torch.Tensor] = None,
               chunk: int = 1024):
    """Dense attention in fp32, chunked over queries (memory ``chunk x M`` per head): ``o`` and, with ``do``,
    its exact gradients ``(dq, dk, dv)`` (``dS = P * (dP - rowsum(dO * O))``), without autograd."""
    q, k, v = q.float(), k.float(), v.float()
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    for s0 in range(0, q.shape[2], chunk):
        s = torch.matmul(q[:, :, s0:s0 + chunk], k.transpose(-1, -2)) * scale
        lse[:, :, s0:s0 + chunk] = torch.logsumexp(s, -1)
        o[:, :, s0:s0 + chunk] = torch.matmul(torch.exp(s - lse[:, :, s0:s0 + chunk, None]), v)
    if do is None:
        return o
    do = do.float()
    delta = (do * o).sum(-1)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for s0 in range(0, q.shape[2], chunk):
        rows = slice(s0, s0 + chunk)
        p = torch.exp(torch.matmul(q[:, :, rows], k.transpose(-1, -2)) * scale - lse[:, :, rows, None])
        ds = p * (torch.matmul(do[:, :, rows], v.transpose(-1, -2)) - delta[:, :, rows, None])
        dq[:, :, rows] = torch.matmul(ds, k) * scale
        dk += torch.matmul(ds.transpose(-1, -2), q[:, :, rows]) * scale
        dv += torch.matmul(p.transpose(-1, -2), do[:, :, rows])
    return o, (dq, dk, dv)


_S = (slice(0, 1), slice(0, TWIN_HEADS))  # the heads the twins compute
#: VSA's cube: FastVideo's default and FastWan's.
VSA_TILE = (4, 4, 4)


def _grad_error(grads, ref_grads) -> float:
    return max(relative_error(g[_S], r) for g, r in zip(grads, ref_grads))


# ----------------------------------------------------------------------------- one shape
class _Shape:
    """The rows of one shape: inputs made once, every case timed and checked against its fp32 twin."""

    def __init__(self, shape, device, dtype, backward, timer, calls, repeats, left, rows, notes, log):
        self.shape, self.device, self.dtype, self.backward = shape, device, dtype, backward
        self.timer, self.calls, self.repeats, self.left = timer, calls, repeats, left
        self.rows, self.notes, self.log = rows, notes, log
        self.cuda = device.type == "cuda"
        self.gen = torch.Generator(device=device).manual_seed(0)
        b, h, n, d = shape.batch, shape.heads, shape.tokens, shape.head_dim
        self.q, self.k, self.v = (self.randn(b, h, n, d) for _ in range(3))
        self.scale = d ** -0.5
        self.flops = 4.0 * b * h * n * n * d
        self.base: Dict[str, float] = {}  # pass -> dense SDPA seconds

    def randn(self, *size) -> torch.Tensor:
        return torch.randn(*size, generator=self.gen, device=self.device, dtype=self.dtype)

    def run(self, densities, methods, autotune, forced) -> None:
        # SDPA first (every speed-up is against it), then the sparse rows with the autotuner off (what the run
        # is for), then the other dense candidates and the autotuner's choices, which a short share may skip.
        self.dense_rows(only="dense SDPA")
        first = [mode for mode in autotune if mode == "off"] or list(autotune[:1])
        self.sparse_at(densities, methods, first, forced)
        self.dense_rows(skip="dense SDPA")
        rest = [mode for mode in autotune if mode not in first]
        if rest:  # the autotuner's choice at the first density only (its timing costs seconds)
            self.sparse_at(densities[:1], methods, rest, forced)

    def sparse_at(self, densities, methods, autotune, forced) -> None:
        for i, target in enumerate(densities):
            for name in methods:
                if name in ("radial", "vsa") and len(self.shape.grid) != 3:  # video only: said, not silently left out
                    note = (f"{self.shape.name}: no {name} rows ({name} takes video grids (T, H, W); this grid "
                            f"{tuple(self.shape.grid)} is an image's)")
                    if note not in self.notes:
                        self.notes.append(note)
                    continue
                if name == "radial" and i:
                    continue  # its rule fixes its density: once per shape
                for mode in autotune:
                    self.sparse_rows(name, target, mode, forced)
            self.log(f"{self.shape.name}: density {target}, autotune {'/'.join(autotune)} done "
                     f"({self.left():.0f} s left)")

    # -- timing
    def measure(self, kernel: str, fn: Callable[[], object], check: Callable[[], dict], density: float,
                work: float, pass_: str, variant: Callable[[], str] = lambda: "", **extra) -> dict:
        """One row: warm-up, correctness (``check() -> {"o_error", "grad_error"}``), timing, variant."""
        from .timing import CallTiming, measure_call

        s = self.shape
        row = {"shape": s.name, "tokens": s.tokens, "heads": s.heads, "head_dim": s.head_dim, "batch": s.batch,
               # density: the true one (visited pairs / N^2; the block share is layout_density / block_density),
               # also as true_density, the key bench kernels' rows give it under (their density is the block share)
               "kernel": kernel, "density": density, "true_density": density, "work_vs_dense": work,
               "padded_work": work / density, "pass": pass_, **extra}
        if self.left() <= 0:
            row.update(status="skipped", error="time budget")
            self.rows.append(row)
            return row
        try:
            fn()  # warm-up: compilation, plans, autotuning
            row["variant"] = variant()
            row.update(check())
            row["tolerance"] = O_TOLERANCE
            self.timer.sync()
            once = self.timer.span(fn, 1)[0]
            calls = max(1, min(self.calls, int(SPAN_S / once) if once > 0 else self.calls))
            if pass_ == "forward":
                timing = measure_call(fn, self.timer, calls=calls, repeats=self.repeats, graph=self.cuda)
            else:  # forward + backward: back-to-back throughput (graphs do not capture autograd here)
                spans = []
                for _ in range(self.repeats):
                    self.timer.sync()
                    spans.append(self.timer.span(fn, calls))
                spans.sort()
                mid = spans[len(spans) // 2]
                timing = CallTiming(throughput_s=mid[0] / calls, host_s=mid[1] / calls, calls=calls)
        except Exception as exc:
            if self.cuda:
                torch.cuda.empty_cache()
            row.update(status="failed", error=_short(exc))
            self.rows.append(row)
            return row
        seconds = timing.throughput_s
        row.update(status="ok", time_ms=seconds * 1e3,
                   **call_timing_fields(timing, self.flops * work * (1 if pass_ == "forward" else 3.5)))
        if kernel == "dense SDPA":
            self.base[pass_] = seconds
        if pass_ in self.base:
            row["speedup"] = self.base[pass_] / seconds
            row["fraction_of_ideal"] = row["speedup"] * density  # density: the true one (visited pairs / N^2)
        self.rows.append(row)
        return row

    # -- dense
    def dense_rows(self, only: Optional[str] = None, skip: Optional[str] = None) -> None:
        """The dense rows, forward and forward + backward: ``only`` that one, or all but ``skip``."""
        import torch.nn.functional as F

        def wanted(name: str) -> bool:
            return (only is None or name == only) and name != skip

        from ..kernels.dense import choice, dense_contenders

        q, k, v, scale = self.q, self.k, self.v, self.scale
        ref = {}

        def check_o(out_fn, bnhd: bool):
            def check():
                if "o" not in ref:
                    ref["o"] = fp32_dense(q[_S], k[_S], v[_S], scale)
                with torch.no_grad():
                    out = out_fn()
                out = out[0] if isinstance(out, tuple) else out
                out = out.transpose(1, 2) if bnhd else out  # flash-attn's (B, N, H, D)
                return {"o_error": relative_error(out[_S], ref["o"])}
            return check

        contenders = dense_contenders(q, k, v, scale)
        if self.cuda:
            contenders.update(extra_dense_contenders(q, k, v, self.notes, scale=scale, flex=False))
        else:  # (tests) SDPA only: the Triton kernels would run in the interpreter
            contenders = {name: fn for name, fn in contenders.items() if name == "dense SDPA"}
        tune = self.cuda
        contenders["dense [fastest]"] = lambda: choice.run_candidate(
            choice.choose(q, k, v, scale, False, tune=tune), q, k, v, scale, False)[0]
        contenders["dense+lse [fastest]"] = lambda: choice.run_candidate(
            choice.choose(q, k, v, scale, True, tune=tune), q, k, v, scale, True)
        variants = {"dense SDPA": lambda: _sdpa_backend(q, k, v),
                    "dense Triton (dit_accel)": lambda: _triton_dense_variant(q, k, v),
                    "dense [fastest]": lambda: choice.choose(q, k, v, scale, False, tune=tune),
                    "dense+lse [fastest]": lambda: choice.choose(q, k, v, scale, True, tune=tune)}
        for name, fn in contenders.items():
            if not wanted(name):
                continue
            self.measure(name, lambda fn=fn: _no_grad(fn), check_o(fn, name.startswith("flash-attn")), 1.0, 1.0,
                         "forward", variants.get(name, lambda name=name: name))
        if not self.backward:
            return
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        do = self.randn(*q.shape)

        def check_grads(run):
            def check():
                if "grads" not in ref:
                    ref["o"], ref["grads"] = fp32_dense(q[_S], k[_S], v[_S], scale, do[_S])
                for t in (qg, kg, vg):
                    t.grad = None
                out = run()
                grads = (qg.grad, kg.grad, vg.grad)
                return {"o_error": relative_error(out.detach()[_S], ref["o"]),
                        "grad_error": _grad_error(grads, ref["grads"]), "grad_tolerance": GRAD_TOLERANCE}
            return check

        def fb(fn):
            def run():
                out = fn()
                out.backward(do)
                return out
            return run

        cases = {"dense SDPA": (lambda: F.scaled_dot_product_attention(qg, kg, vg, scale=scale),
                                lambda: _sdpa_backend(qg, kg, vg))}
        if "dense Triton (dit_accel)" in contenders:
            from ..kernels.dense import dense_attention

            cases["dense Triton (dit_accel)"] = (lambda: dense_attention(qg, kg, vg, scale),
                                                 lambda: _triton_dense_variant(q, k, v))
        cases["dense [fastest]"] = (lambda: choice.run(qg, kg, vg, scale)[0],
                                    lambda: choice.chosen(qg, kg, vg, scale))
        for name, (fn, variant) in cases.items():
            if not wanted(name):
                continue
            self.measure(name, fb(fn), check_grads(fb(fn)), 1.0, 1.0, "forward+backward", variant)

    # -- sparse
    def sparse_rows(self, name: str, target: float, mode: str, forced: Optional[str]) -> None:
        _set_autotune(mode)
        label = f"{name} [auto, autotune {mode}]"
        try:
            if name == "vsa":  # sparsity 1 - density: 0.8 and 0.9 at 0.2 and 0.1
                runner = _VsaCase(self, round(1.0 - target, 6))
            else:
                method = _method(name, self.shape.grid, target)
                runner = (_SlaCase(self, method, projection=name == "sla") if name.startswith("sla")
                          else _LayoutCase(self, method))
        except Exception as exc:
            self.rows.append({**_skipped(self.shape, label, target, ""), "status": "failed", "error": _short(exc)})
            return
        layout_free = name.startswith("sla") or name == "vsa"  # their blocks are chosen per call
        if runner.layout is None and not layout_free:
            self.rows.append({**_skipped(self.shape, label, target, f"no layout: {runner.why}"), "status": "dense"})
            return
        passes = ("forward", "forward+backward") if self.backward else ("forward",)
        vendors = [] if layout_free or mode != "off" else self.vendor_backends(runner)
        backends = ["auto"] + vendors  # (the Triton kernel forced is appended below where auto ran another)
        for backend in backends:
            tag = label if backend == "auto" else f"{name} [{backend} forced]"
            for pass_ in passes if backend not in vendors else self.vendor_passes(runner, backend, passes):
                row = self.measure(tag, runner.fn(pass_, backend), runner.check(pass_, backend), runner.density,
                                   runner.work, pass_, lambda: runner.variant(pass_, backend), target_density=target,
                                   autotune=mode, backend=backend, **runner.facts)
                # Where auto chose another backend than the Triton kernels (dense, say), the sparse
                # kernel forced beside it, once per (method, density).
                if (forced and backend == "auto" and mode == "off" and pass_ == "forward" and row.get("status") == "ok"
                        and not layout_free and not str(row.get("variant", "")).startswith(forced)):
                    backends.append(forced)
        if name == "vsa" and mode == "off":  # its launches alone, forward
            for phase, fn in runner.phases("auto").items():
                self.measure(f"vsa {phase}", fn, lambda: {}, runner.density, runner.work, "forward",
                             target_density=target, autotune=mode, backend="phase", **runner.facts)


    # -- the vendor kernels (FA4, cuDNN, NATTEN), forced on the same layout beside auto
    def vendor_backends(self, runner) -> list:
        """The vendor backends that can run ``runner``'s layout here (timed forced, at every density, beside
        ``auto``, which picks one where the autotuner measures it faster); why each other one cannot goes to the
        report's notes."""
        from ..kernels.block_sparse.backends import vendor_reasons

        if not self.cuda:
            return []
        reasons = vendor_reasons(runner.layout, runner.q, runner.k, runner.v)
        self.notes.extend(f"{vendor}: {why}" for vendor, why in reasons.items())
        from ..kernels.block_sparse.backends import NAMES

        return [vendor for vendor in NAMES if vendor not in reasons]

    def vendor_passes(self, runner, vendor: str, passes) -> tuple:
        """``passes`` less forward + backward where ``vendor`` cannot take gradients for this call."""
        from ..kernels.backends import Request
        from ..kernels.block_sparse.backends import module

        qg, kg, vg = runner._grad_inputs()
        why = module(vendor).reason(Request.of(qg, kg, vg, runner.layout.block_q, runner.layout.block_k))
        if why is not None and "forward+backward" in passes:
            self.notes.append(f"{vendor} forward + backward: {why}")
            return tuple(p for p in passes if p != "forward+backward")
        return tuple(passes)


@functools.lru_cache(maxsize=16)
def _plan_cached(method, grid):
    """``method.plan(grid)``, built once for the autotune on/off rows and the shapes that share a grid."""
    return method.plan(grid)


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _sdpa_backend(q, k, v) -> str:
    """The backend SDPA dispatches these inputs to (PyTorch's own choice)."""
    try:
        from torch.nn.attention import SDPBackend

        return f"SDPA {SDPBackend(int(torch._fused_sdp_choice(q, k, v))).name.lower()}"
    except Exception:
        return "SDPA (backend unknown)"


def _triton_dense_variant(q, k, v) -> str:
    from ..kernels.dense import triton_variant

    return f"dense triton {triton_variant(q, k, v)}"


class _Case:
    """What the timed cases share: leaf copies of q, k, v (and an upstream gradient) for the backward rows,
    made on first use, and the check of a pass against the case's fp32 twin (``_twin``, from each case's
    ``_reference(q, k, v)``: the PyTorch twin of its method in fp32)."""

    def _checked(self, pass_: str, attend, ran_dense: Callable[[], bool] = lambda: False):
        """The check of ``pass_`` for ``attend(q, k, v)``: the forward's error, and with ``"both"`` the
        gradients' too, against the twin; against dense attention's fp32 twin where ``ran_dense()`` (``auto``
        ran the call as dense attention, as it does where the cost model has the sparse kernel lose: then the
        row checks the dense call that ran, and says so in ``ran_dense``)."""
        def forward():
            with torch.no_grad():
                out = attend(self.q, self.k, self.v)
            dense = ran_dense()
            return {"o_error": relative_error(out[_S], self._twin(False, dense)), "ran_dense": dense}

        def both():
            qg, kg, vg = self._grad_inputs()
            for t in (qg, kg, vg):
                t.grad = None
            out = attend(qg, kg, vg)
            out.backward(self.do)
            dense = ran_dense()
            ref_o, ref_grads = self._twin(True, dense)
            return {"o_error": relative_error(out.detach()[_S], ref_o),
                    "grad_error": _grad_error((qg.grad, kg.grad, vg.grad), ref_grads),
                    "grad_tolerance": GRAD_TOLERANCE, "ran_dense": dense}

        return forward if pass_ == "forward" else both

    def _twin(self, grads: bool, dense: bool = False):
        """The fp32 twin's output (and its q, k, v gradients for ``grads``) on the checked slice, made once each
        from the case's :meth:`_reference` call (``dense``: from fp32 dense attention)."""
        import torch.nn.functional as F

        key = ("dense " if dense else "") + ("grads" if grads else "o")
        if key not in self.ref:
            q, k, v = (t[_S].detach().float().requires_grad_(grads) for t in (self.q, self.k, self.v))
            o = F.scaled_dot_product_attention(q, k, v) if dense else self._reference(q, k, v)
            if grads:
                o.backward(self.do[_S].float())
                self.ref[key] = (o.detach(), (q.grad, k.grad, v.grad))
            else:
                self.ref[key] = o.detach()
        return self.ref[key]

    def _grad_inputs(self):
        if self.grad_inputs is None:
            self.grad_inputs = tuple(t.detach().clone().requires_grad_() for t in (self.q, self.k, self.v))
            self.do = self.s.randn(*self.q.shape)
        return self.grad_inputs


class _LayoutCase(_Case):
    """Tile, GNA or radial through ``block_sparse_attention`` on the layout production runs (kernel_layout)."""

    def __init__(self, s: _Shape, method):
        from ..kernels.block_sparse.api import layout_on

        self.s = s
        plan = _plan_cached(method, tuple(s.shape.grid))
        self.why = getattr(plan, "dense_reason", None)
        base = plan.kernel_layout(s.device) if hasattr(plan, "kernel_layout") else None
        self.layout = None if base is None else layout_on(base, s.device)
        if self.layout is None:
            return
        train = plan.kernel_layout(s.device, grad=True)  # (a training call's: 64-row blocks where base has 128)
        self.train_layout = self.layout if train is base else layout_on(train, s.device)
        lay, shape = self.layout, s.shape
        np_ = lay.q_len
        self.q, self.k, self.v = (s.randn(shape.batch, shape.heads, np_, shape.head_dim) for _ in range(3))
        # The efficiency is speedup x the pattern's true density (issue 72); the padded blocks' work is its own
        # column (padded_work), never folded into the ideal.
        self.density = _true_density(plan)
        # Every visited block is worked in full, a ragged last block too (a radial layout of T*H*W tokens):
        # block_figures' padded work, not the layout's positions (which made it < 1 there).
        worked = lay.num_q_blocks * lay.block_q * lay.num_kv_blocks * lay.block_k
        self.work = lay.density() * worked / shape.tokens ** 2
        self.facts = {"config": method.to_dict(), "padded_tokens": np_, "layout_density": lay.density(),
                      "block_q": lay.block_q, "block_k": lay.block_k}
        self.twin_layout = lay if lay.num_heads == 1 else lay.select(heads=(0, TWIN_HEADS))
        self.grad_inputs = None
        self.do = None
        self.ref: Dict[str, object] = {}

    def _layout(self, pass_: str):
        return self.layout if pass_ == "forward" else self.train_layout

    def fn(self, pass_: str, backend: str):
        from ..kernels import block_sparse_attention

        lay = self._layout(pass_)
        if pass_ == "forward":
            return lambda: _no_grad(lambda: block_sparse_attention(self.q, self.k, self.v, lay, backend=backend))
        qg, kg, vg = self._grad_inputs()
        return lambda: block_sparse_attention(qg, kg, vg, lay, backend=backend).backward(self.do)

    def _reference(self, q, k, v):
        from ..kernels import block_sparse_attention

        return block_sparse_attention(q, k, v, self.twin_layout, backend="torch")

    def check(self, pass_: str, backend: str):
        from ..kernels import block_sparse_attention

        lay = self._layout(pass_)
        return self._checked(pass_, lambda q, k, v: block_sparse_attention(q, k, v, lay, backend=backend),
                             lambda: self._backend(pass_, backend) == DENSE)

    def _backend(self, pass_: str, backend: str) -> str:
        """The backend ``block_sparse_attention`` runs this pass's calls on (``auto``'s cached decision)."""
        from ..kernels.block_sparse.api import block_sparse_backend

        q, k, v = (self.q, self.k, self.v) if pass_ == "forward" else self._grad_inputs()
        return block_sparse_backend(q, k, v, self._layout(pass_), backend, return_lse=False)

    def variant(self, pass_: str, backend: str) -> str:
        name = self._backend(pass_, backend)
        if name == DENSE:
            from ..kernels.dense import choice

            q, k, v = (self.q, self.k, self.v) if pass_ == "forward" else self._grad_inputs()
            return f"dense: {choice.chosen(q, k, v)}"
        if name != "triton":
            return name
        from ..kernels.block_sparse.launches import launched_variants

        ran = launched_variants(self._layout(pass_))["forward" if pass_ == "forward" else "backward"]
        return "triton " + ("; ".join(dict.fromkeys(ran)) if ran else "(no launch recorded)")


def _true_density(plan) -> float:
    """Allowed real token pairs / N^2 of a layout plan's pattern: its token density where the plan knows it, else
    counted on its layout (:func:`~dit_accel.kernels.geometry.block_figures`)."""
    if getattr(plan, "token_density", None) is not None:
        return float(plan.token_density)
    from ..kernels.geometry import block_figures

    real = None if plan.perm is None else plan.perm.order >= 0
    return block_figures(plan.layout, real, real).density


def _zero_projection(d: int, device, dtype) -> torch.nn.Linear:
    """SLA's projection as ``apply`` makes it before fine-tuning: a zero ``Linear(d, d)``."""
    proj = torch.nn.Linear(d, d, device=device, dtype=dtype)
    torch.nn.init.zeros_(proj.weight)
    torch.nn.init.zeros_(proj.bias)
    return proj


class _SlaCase(_Case):
    """SLA through ``sla_attention`` with a zero projection (``projection``: its linear branch computed, as a
    projection under training runs it) or none (``sla-topk``: training-free top-k, what the pipelines run while
    every projection is still zero), against the PyTorch twin."""

    def __init__(self, s: _Shape, method, projection: bool = True):
        from ..kernels.sla import sla_density, sla_visited

        self.s, self.method, self.layout, self.why = s, method, None, None
        d = s.shape.head_dim
        self.proj = _zero_projection(d, s.device, s.dtype) if projection else None
        self.q, self.k, self.v = s.q, s.k, s.v
        visited = sla_visited(s.q, s.k, method)  # (the timed call's own top-k: a ragged last block's share is data's)
        self.density, self.work = visited["true_density"], visited["work_vs_dense"]
        self.facts = {"config": method.to_dict(), "block_density": sla_density(s.shape.tokens, method)}
        self.grad_inputs = self.do = None
        self.ref: Dict[str, object] = {}

    def fn(self, pass_: str, backend: str):
        from ..kernels import sla_attention

        if pass_ == "forward":
            return lambda: _no_grad(lambda: sla_attention(self.q, self.k, self.v, self.method, self.proj,
                                                          backend=backend))
        qg, kg, vg = self._grad_inputs()
        return lambda: sla_attention(qg, kg, vg, self.method, self.proj, backend=backend).backward(self.do)

    def _reference(self, q, k, v):
        from ..kernels import sla_attention

        proj = None if self.proj is None else _zero_projection(q.shape[-1], q.device, torch.float32)
        return sla_attention(q, k, v, self.method, proj, backend="torch")

    def check(self, pass_: str, backend: str):
        from ..kernels import sla_attention

        return self._checked(pass_, lambda q, k, v: sla_attention(q, k, v, self.method, self.proj, backend=backend))

    def variant(self, pass_: str, backend: str) -> str:
        from ..kernels.sla import sla_parts

        with torch.no_grad():
            info = sla_parts(self.q[:1, :1], self.k[:1, :1], self.v[:1, :1], self.method, self.proj,
                             backend=backend)[3]
        return f"sla {info['backend']}"


class _VsaCase(_Case):
    """VSA (FastWan's video sparse attention, (4, 4, 4) cubes) through ``vsa_attention`` with a gate, so the coarse
    branch counts as in FastWan's checkpoints: pooling, coarse attention and the cube selection, then the fine
    block-sparse branch. The fp32 twin takes the timed call's own selection (a bf16 coarse score may pick another
    cube where two nearly tie); ``density``: the true pair density of that selection (:meth:`density`).
    ``phases`` are the coarse-and-select and the fine launches, timed alone."""

    def __init__(self, s: _Shape, sparsity: float):
        from ..kernels.vsa.naive import cubes_of, selected_count

        self.s, self.layout, self.why, self.grid = s, None, None, tuple(s.shape.grid)
        self.sparsity = sparsity
        self.cubes = cubes_of(self.grid, VSA_TILE)
        self.count = selected_count(self.cubes.count, None, sparsity)
        self.q, self.k, self.v = s.q, s.k, s.v
        self.gate = s.randn(*s.q.shape)
        self.scale = s.shape.head_dim ** -0.5
        self.work = self.count / self.cubes.count * (self.cubes.perm.num_padded / s.shape.tokens) ** 2
        self.facts = {"config": {"method": "vsa", "sparsity": sparsity, "tile": list(VSA_TILE)},
                      "cubes": self.cubes.count, "topk": self.count}
        self.grad_inputs = self.do = None
        self.ref: Dict[str, object] = {}
        self._selection = self._density = None

    def _call(self, q, k, v, backend: str, **kw):
        from ..kernels.vsa.api import vsa_attention

        return vsa_attention(q, k, v, self.grid, sparsity=self.sparsity, tile=VSA_TILE, gate=self.gate,
                             scale=self.scale, backend=backend, **kw)

    def fn(self, pass_: str, backend: str):
        if pass_ == "forward":
            return lambda: _no_grad(lambda: self._call(self.q, self.k, self.v, backend))
        qg, kg, vg = self._grad_inputs()
        return lambda: self._call(qg, kg, vg, backend).backward(self.do)

    @property
    def density(self) -> float:
        """Real (query, key) token pairs the timed calls' selection visits / N^2, the efficiency's true density
        (issue 72). The selected share of the cubes equals it only where every cube is whole: Wan's 21 frames and
        720p's 45 rows leave partial cubes, which hold fewer tokens and which random inputs select more often
        (0.19, not 0.25, at sparsity 0.75 on (5, 6, 10)): the share overstated the efficiency."""
        if self._density is None:
            try:
                sel = self.selection()
            except Exception:  # (the row's own call fails the same way and says so; no density to report)
                return float("nan")
            sizes = self.cubes.sizes.to(sel.device, torch.float64)
            pairs = (sizes[None, None, :, None] * sizes[sel]).sum().item()
            self._density = pairs / (sel.shape[0] * sel.shape[1] * self.s.shape.tokens ** 2)
        return self._density

    def selection(self) -> torch.Tensor:
        """The cube selection of the timed calls (``auto``, the backend every VSA row runs), made once."""
        if self._selection is None:
            with torch.no_grad():
                self._selection = self._call(self.q, self.k, self.v, "auto", return_selection=True)[1]
        return self._selection

    def _reference(self, q, k, v):
        from ..kernels.vsa.api import _fine_branch
        from ..kernels.vsa.naive import coarse_attention

        perm = self.cubes.perm
        q_t, k_t, v_t = (perm.permute(x, dim=-2) for x in (q, k, v))
        coarse = coarse_attention(q_t, k_t, v_t, self.cubes, self.count, self.scale)[0]
        res = _fine_branch(q_t, k_t, v_t, self.cubes, perm, coarse, self.selection()[_S], self.scale, "torch")
        return res.gated(self.gate[_S].float(), torch.float32, add_fine=True)

    def check(self, pass_: str, backend: str):
        return self._checked(pass_, lambda q, k, v: self._call(q, k, v, backend))

    def phases(self, backend: str) -> Dict[str, Callable[[], object]]:
        """The forward's launches alone: coarse attention with the selection (pooling included), and the fine
        branch over a fixed selection."""
        from ..kernels.vsa.api import _fine_branch, _fused_coarse
        from ..kernels.vsa.naive import coarse_attention

        perm = self.cubes.perm
        q_t, k_t, v_t = (perm.permute(x, dim=-2) for x in (self.q, self.k, self.v))
        fused = _fused_coarse(q_t, k_t, v_t, True, backend)
        if fused:
            from ..kernels.vsa.triton import coarse_triton as coarse_fn
        else:
            coarse_fn = coarse_attention
        selection = self.selection()

        def coarse():
            return _no_grad(lambda: coarse_fn(q_t, k_t, v_t, self.cubes, self.count, self.scale))

        def fine():
            return _no_grad(lambda: _fine_branch(q_t, k_t, v_t, self.cubes, perm, None, selection, self.scale,
                                                 backend))

        return {f"coarse+select ({'triton' if fused else 'torch'})": coarse, "fine": fine}

    def variant(self, pass_: str, backend: str) -> str:
        """The coarse branch's path and the backend the fine branch ran (``auto``'s choice for this shape class,
        made by the warm-up call: with a gradient it may differ from the forward's)."""
        from ..kernels.vsa.api import _fused_coarse, chosen_fine_backend
        from ..kernels.vsa.fine import has_template

        q_t = self.cubes.perm.permute(self.q[:1, :1], dim=-2)
        fused = pass_ == "forward" and _fused_coarse(q_t, q_t, q_t, True, backend)  # (forward-only launches)
        b, h, _, d = self.q.shape
        folded = (1, b * h, self.cubes.perm.num_padded, d)
        chosen = chosen_fine_backend(self.grid, folded, pass_ != "forward")
        fine = f"{backend} ({chosen})" if backend == "auto" and chosen else backend
        if pass_ == "forward" and has_template(self.grid, folded):  # (kernels.vsa.fine: no layout per call)
            fine += ", planned per call"
        return f"vsa: coarse {'triton' if fused else 'torch'}, fine {fine}"
