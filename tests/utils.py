"""Helpers shared by the test suite: q/k/v factory, masks, tolerances, and the one dense oracle.

Every attention result is compared with :func:`reference`, which is the package's
own :func:`dit_accel.kernels.dense_attention_reference` (fp32, masked, empty rows
give 0 and ``lse = -inf``); ``tests/kernels/test_reference.py`` checks that oracle
against a per-row definition written in the test.
"""

from __future__ import annotations

import contextlib
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dit_accel.kernels import dense_attention_reference as reference

__all__ = ["DEVICE", "DT", "TOL", "make_qkv", "reference", "random_mask", "banded_mask", "assert_lse_close",
           "assert_attention_close", "assert_grads_close", "ReferenceAttention", "method_mask", "dispatched", "largest_output", "first_output"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pinned_triton() -> str:
    """The Triton release the repository pins for CI (constraints-cpu.txt)."""
    import pathlib

    for line in (pathlib.Path(__file__).resolve().parents[1] / "constraints-cpu.txt").read_text().splitlines():
        if line.strip().startswith("triton=="):
            return line.split("==", 1)[1].strip()
    return ""


def _installed_triton() -> str:
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return ""


PINNED_TRITON = _pinned_triton()
# Register counts, spills and instruction counts are what one Triton release's compiler makes of the
# shipped configurations: the thresholds on them hold for the pinned release (CI's), not for every one.
# (Without a pin they always run.)
static_toolchain = pytest.mark.skipif(
    bool(PINNED_TRITON) and _installed_triton() != PINNED_TRITON,
    reason=f"compile-time thresholds are checked with triton=={PINNED_TRITON} (constraints-cpu.txt); "
           f"installed: {_installed_triton() or 'none'}")

#: Tests that run the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1`` before triton was imported).
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton interpreter on CPU tensors")

DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (o, lse, grads) absolute/relative tolerances per dtype; fp32 products are tf32 on a GPU.
TOL = {
    torch.float32: (5e-3, 5e-3, 2e-2) if DEVICE == "cuda" else (1e-4, 1e-4, 2e-4),
    torch.float16: (4e-3, 2e-3, 2e-2),
    torch.bfloat16: (2e-2, 1e-2, 8e-2),
}


def make_qkv(b: int, h: int, n: int, m: int, d: int, dtype=torch.float32, *, seed: int = 0, device=DEVICE,
             requires_grad: bool = False):
    """Random ``q (b, h, n, d)``, ``k, v (b, h, m, d)`` from a fixed seed (drawn on the CPU, then moved)."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(b, h, x, d, generator=g).to(dtype).to(device) for x in (n, m, m)]
    return [t.requires_grad_(requires_grad) for t in out]


def random_mask(heads: int, n: int, m: int, *, density: float = 0.4, block: int = 32, seed: int = 0,
                empty_rows=(), full_block=None) -> torch.Tensor:
    """Random bool mask ``[heads, n, m]``: about half the ``block`` tiles empty (skipped by a layout),
    random elements in the others, an optional dense rectangle (full blocks) and empty rows."""
    g = torch.Generator().manual_seed(seed)
    tiles = torch.rand(heads, -(-n // block), -(-m // block), generator=g) < 0.5
    tiles = tiles.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :n, :m]
    mask = tiles & (torch.rand(heads, n, m, generator=g) < density)
    if full_block is not None:
        r0, r1, c0, c1 = full_block
        mask[:, r0:r1, c0:c1] = True
    for r in empty_rows:
        mask[:, r] = False
    return mask


def banded_mask(n: int, m: int, width: float) -> torch.Tensor:
    """``|i * m/n - j| <= width``: a diagonal band, bool ``[n, m]``."""
    i = torch.arange(n)[:, None] * (m / n)
    j = torch.arange(m)[None, :]
    return (i - j).abs() <= width


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Same rows without keys (``-inf``), and close values elsewhere."""
    assert torch.equal(torch.isneginf(lse), torch.isinf(ref)), "rows without keys must give lse = -inf, others finite"
    fin = ~torch.isinf(ref)
    torch.testing.assert_close(lse[fin].double(), ref[fin].double(), atol=atol, rtol=rtol)


def assert_attention_close(o, lse, q, k, v, mask, scale=None):
    """``(o, lse)`` of a kernel equal :func:`reference` on ``mask`` within q's dtype tolerance."""
    o_ref, lse_ref = reference(q, k, v, None if mask is None else mask.to(q.device), scale)
    tol_o, tol_l, _ = TOL[q.dtype]
    assert o.dtype == q.dtype and o.shape == q.shape
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.float(), o_ref, atol=tol_o, rtol=tol_o)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        assert_lse_close(lse, lse_ref, atol=tol_l, rtol=tol_l)


def assert_grads_close(grads, q, k, v, mask, do, scale=None):
    """``(dq, dk, dv)`` equal the gradients of :func:`reference` for upstream gradient ``do``."""
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    o_ref, _ = reference(qr, kr, vr, None if mask is None else mask.to(q.device), scale)
    o_ref.backward(do.float())
    tol = TOL[q.dtype][2]
    for name, got, want, x in zip(("dq", "dk", "dv"), grads, (qr.grad, kr.grad, vr.grad), (q, k, v)):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def first_output(model, kwargs) -> torch.Tensor:
    """The model's first output for ``kwargs``, without autograd (a transformer call's sample)."""
    with torch.no_grad():
        return model(**kwargs)[0]


@contextlib.contextmanager
def dispatched(observe):
    """Run the block under a ``TorchDispatchMode`` that hands every ATen operator it runs (the package's custom ops
    as one operator each), after it ran, to ``observe(func, args, kwargs, out)``: what the tests that count copies,
    casts, gathers or host operators record."""

    class _Observed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            observe(func, args, kwargs, out)
            return out

    with _Observed():
        yield


def largest_output(fn) -> int:
    """The most elements of any tensor an ATen operator returns while ``fn()`` runs (its backward too, if it runs
    one): what a test bounds to show that no N x N tensor is made."""
    largest = [0]

    def observe(func, args, kwargs, out):
        largest[0] = max([largest[0]] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])

    with dispatched(observe):
        fn()
    return largest[0]


def method_mask(method, grid) -> torch.Tensor:
    """The raster ``[N, N]`` bool mask of a GNA, Tile or Radial config on ``grid`` (its pattern's, from
    :mod:`dit_accel.patterns`, whose own tests hold it against brute-force definitions): what the integration
    tests' masked-dense reference attends by."""
    from dit_accel import GNA, Radial, Tile
    from dit_accel.patterns import gna_mask, radial_mask, tile_mask

    if isinstance(method, GNA):
        return gna_mask(grid, method.kernel_size)
    if isinstance(method, Tile):
        return tile_mask(grid, method.tile, method.window)
    if isinstance(method, Radial):
        return radial_mask(grid, block_size=method.block_size, decay=method.decay, sink_frames=method.sink_frames)
    raise TypeError(f"method_mask takes GNA, Tile or Radial; got {type(method).__name__}")


class ReferenceAttention(TorchFunctionMode):
    """While active, a model's self/joint SDPA calls run the dense oracle restricted to ``pattern``.

    ``pattern`` is the bool ``[N, N]`` video-video mask; text tokens (``text_position``
    ``"first"``/``"last"``) attend and are attended densely, and a boolean key-padding
    mask of the call (or a full ``(B, 1, S, S)`` one) is honoured; a float mask is added to the scores
    of the allowed pairs (Chroma's additive ``(B, 1, S, S)`` text mask). A call of the image's queries alone against
    the joint keys ([text, image]: Qwen-Image 2.1, PRX; [image, text]: Nucleus-Image) gets the image rows of that
    mask.
    Cross-attention and text-only calls pass through: those shorter than the image by their length, and the calls
    of the modules ``text_only`` names (a caption refiner over as many tokens as the image or more: Z-Image's and
    Lumina 2's ``context_refiner`` on small grids, which the length alone would take for joint calls).
    ``calls`` counts the calls it replaced.
    """

    def __init__(self, pattern: torch.Tensor, text_position: str, *, text_only=()):
        super().__init__()
        self.pattern, self.position, self.calls = pattern, text_position, 0
        self._text_only = list(text_only)
        self._inside, self._hooks = 0, []

    def _enter_text_only(self, *_):
        self._inside += 1

    def _leave_text_only(self, *_):
        self._inside -= 1

    def __enter__(self):
        for module in self._text_only:
            self._hooks += [module.register_forward_pre_hook(self._enter_text_only),
                            module.register_forward_hook(self._leave_text_only, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._inside = [], 0
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self._inside:
            return func(*args, **kwargs)
        call = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
        q, k, v, mask = call["query"], call["key"], call["value"], call.get("attn_mask")
        nv, s, m = self.pattern.shape[0], q.shape[2], k.shape[2]
        image_queries = self.position != "none" and s == nv < m  # the image's queries alone vs the joint keys
        if (m != s and not image_queries) or s < nv or (self.position == "none" and s != nv):
            return func(*args, **kwargs)  # cross-attention, text-only refiner
        allowed = torch.ones(s, m, dtype=torch.bool)
        keys = slice(m - nv, m) if self.position == "first" else slice(0, nv)
        allowed[slice(0, nv) if image_queries else keys, keys] = self.pattern
        scale = call.get("scale") or 1 / math.sqrt(q.shape[-1])
        outs = []
        for b in range(q.shape[0]):  # the oracle takes one [H, N, M] mask: per sample for padding masks
            if mask is not None and mask.is_floating_point():  # additive (Chroma's m_i * m_j): scores + mask
                bias = mask[b if mask.shape[0] > 1 else 0, 0].float().expand(s, m).masked_fill(~allowed, float("-inf"))
                qf, kf, vf = (t[b:b + 1].float() for t in (q, k, v))
                outs.append(torch.softmax(qf @ kf.transpose(-1, -2) * scale + bias, -1) @ vf)
                continue
            if mask is None:
                keep = allowed
            elif mask.dim() == 4 and mask.shape[-2] == s and s > 1:  # a full (B, 1, S, S) mask (HunyuanVideo 1.5)
                keep = allowed & mask[b if mask.shape[0] > 1 else 0, 0]
            else:
                keep = allowed & mask.reshape(-1, m)[b if mask.shape[0] > 1 else 0]
            outs.append(reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], keep, scale)[0])
        self.calls += 1
        return torch.cat(outs).to(q.dtype)


class PerCallReference(TorchFunctionMode):
    """While active, the i-th self-attention SDPA call of a video-only model (Wan) runs the dense oracle under
    ``masks[i % len(masks)]`` (``[N, N]`` or per head ``[H, N, N]``; None: the real SDPA). For patterns
    that change per layer, head or step (strategies, plans). Cross-attention passes through; ``calls``
    counts the self-attention calls."""

    def __init__(self, masks):
        super().__init__()
        self.masks, self.calls = masks, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(("query", "key", "value"), args), **kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        if k.shape[2] != q.shape[2]:  # cross-attention
            return func(*args, **kwargs)
        mask = self.masks[self.calls % len(self.masks)]
        self.calls += 1
        return reference(q, k, v, mask, call.get("scale"))[0].to(q.dtype) if mask is not None else func(*args,
                                                                                                          **kwargs)


def saved_beyond(fn, inputs) -> int:
    """Bytes of the tensors that ``fn()`` leaves saved for its backward beyond the storages of ``inputs`` (what a
    training call keeps alive until its backward runs: copies of the inputs count, the inputs themselves not)."""
    own = {x.untyped_storage().data_ptr() for x in inputs}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def resolved_here(model) -> None:
    """Let ``model.enable_parallelism`` run in this one process: its config is resolved as on rank 0 of a launch
    (Diffusers' own resolver needs torch.distributed and builds a device mesh across the ranks). The rest of
    ``enable_parallelism`` (processors given the config, the context-parallel hooks) is Diffusers' own."""
    from diffusers import ParallelConfig

    def resolve(config):
        config = ParallelConfig(context_parallel_config=config)
        cp = config.context_parallel_config
        cp._ulysses_local_rank = cp._ring_local_rank = 0
        cp._ulysses_mesh = cp._ring_mesh = types.SimpleNamespace(get_group=lambda: None)
        model._parallel_config = config
        return config

    model._resolve_parallel_config = resolve  # this instance only


def pretend_tracing(monkeypatch) -> None:
    """Make this thread's calls take the traced paths (``dit_accel.kernels.request.tracing()`` true), as inside
    torch.compile's trace: both of its conditions, the process-wide flag and the trace in this thread."""
    import torch

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr("dit_accel.kernels.request._traced_in_this_thread", lambda: True)
