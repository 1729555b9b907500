"""The launchers' GPU-only code, driven on CPU up to the launch with real sm_90 compiled kernels.

Compiling is not running: a launcher's code that runs only on a GPU (the persistent grid read from the
compiled kernel's registers and shared memory, scratch for in-kernel descriptors) is invisible to the
interpreter tests, which take the CPU branch. Here the launchers are told the device is a GPU
(``occupancy.on_gpu``), an sm_90 with 2 SMs (``torch.cuda`` properties monkeypatched), and triton's
``warmup`` hands them a real ``CompiledKernel`` compiled ahead of time for sm_90 (``triton.compile(ASTSource,
GPUTarget("cuda", 90, 32))`` in a spawned process), with no handles loaded: exactly what ``warmup`` returns on
an H100 under triton 3.9. The launch itself then runs in the interpreter with the grid the GPU code chose, and
its numbers are checked against the fp32 reference.

The guards (TMA needs aligned bases and strides, none 0): a misaligned Q, expanded (stride-0) K/V, and
the scratch allocator on q's device, each proven by the configuration or launch the launcher chose.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

pytest.importorskip("triton")

from dit_accel.kernels import BlockLayout  # noqa: E402
from dit_accel.kernels import occupancy  # noqa: E402
from dit_accel.kernels.block_sparse import triton as bst  # noqa: E402
from dit_accel.kernels.block_sparse.configs import fused_config, resume_config, select_config, ws_config  # noqa: E402
from dit_accel.kernels.dense import triton as dense_triton  # noqa: E402
from dit_accel.kernels.dense.configs import tma_ok  # noqa: E402
from dit_accel.kernels.occupancy import occupancy as occupancy_of  # noqa: E402
from tests.utils import assert_attention_close, assert_grads_close, banded_mask, make_qkv, random_mask  # noqa: E402

interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="drives the GPU-only code on CPU")
pytestmark = interpreter_only

SMS = 2  # the pretend GPU's SMs: fewer resident CTAs than work items, so programs walk several
D = 80  # padded to 128: TMA zero-fills the columns past D
#: The configurations the sm_90 launchers pick below: the persistent one-loop forward (fp16, head dim 80)
#: for 64-blocks and for 128-blocks, and the warp-specialized forward with its resume pass (128-blocks).
FWD = select_config("fwd", torch.float16, D, 64, 64, 90)
ONE_LOOP = select_config("fwd", torch.float16, D, 128, 128, 90)
WS = ws_config(ONE_LOOP, 90)
RESUME = resume_config(WS)
FWD_LEN = dataclasses.replace(FWD, lengths=True)  # column-prefix tiles by a column count (block_sparse.lengths)


@pytest.fixture(autouse=True)
def _trusted(monkeypatch):
    """The launchers' own choices only: no first-use self-check launches its problem inside these tests
    (tests/kernels/test_selfcheck*.py prove the check)."""
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "0")


def _compile_job(cfg):
    """In a spawned process (no interpreter): compile ``cfg`` for sm_90; what rebuilds its CompiledKernel."""
    from dit_accel.kernels.compile import compile_for_target

    ck = compile_for_target(cfg, 90)
    return dict(ck.metadata_group), ck.hash


@pytest.fixture(scope="module")
def compiled():
    """``{config: CompiledKernel}`` for sm_90, as triton's own cache rebuilds one: no handles loaded."""
    from triton.compiler.compiler import CompiledKernel

    from dit_accel.kernels.compile import map_in_workers

    cfgs = [FWD, ONE_LOOP, WS, RESUME, FWD_LEN]
    assert len(set(cfgs)) == 5 and FWD.tma and ONE_LOOP.tma and not ONE_LOOP.ws and WS.ws and RESUME.resume
    out = {}
    for cfg, (group, digest) in zip(cfgs, map_in_workers(_compile_job, cfgs)):
        out[cfg] = CompiledKernel(None, group, digest)
    return out


def _cuobjdump_ctas(ck) -> int:
    """CTAs per SM from ``cuobjdump -res-usage`` (an oracle independent of occupancy.cubin_resources)."""
    from dit_accel.kernels.sass import resource_usage

    res = resource_usage(ck.asm["cubin"])
    return occupancy_of(90, res["registers"], ck.metadata.shared + res["shared_static"], ck.metadata.num_warps)["ctas"]


@pytest.fixture
def sm90(monkeypatch, compiled):
    """Pretend the launches go to an sm_90 GPU with :data:`SMS` SMs; ``_fwd_kernel.warmup`` returns the AOT
    kernel of the configuration it is asked for (recorded in ``.warmed``); ``.grids`` records the forward
    launches' grids and configurations."""
    from triton.runtime import _allocation

    monkeypatch.setattr(occupancy, "on_gpu", lambda device: True)
    monkeypatch.setenv("DIT_ACCEL_WS", "1")  # the ws forward is opt-in (tests of its default below)
    _pretend_ws_applies(monkeypatch)
    for module in (bst, dense_triton):
        monkeypatch.setattr(module, "_arch", lambda device: 90)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(multi_processor_count=SMS))
    monkeypatch.setattr(bst, "_RESIDENT", {})
    monkeypatch.setattr(bst, "_PLANS", bst._PlanCache())
    state = types.SimpleNamespace(warmed=[], grids=[])
    fn = bst._fwd_kernel
    params = list(fn.arg_names)

    def config_of(kw):
        """The compiled configuration with these launch keywords, else the keywords themselves."""
        for cfg in compiled:
            if all(kw.get(k) == v for k, v in cfg.constexprs().items()) and \
                    (kw["num_warps"], kw["num_stages"]) == (cfg.num_warps, cfg.num_stages):
                return cfg
        return kw

    def warmup(*args, grid, **kw):
        cfg = config_of(kw)
        assert cfg is not kw, f"warmup of a configuration this test did not compile: {kw}"
        # the launcher's arguments fill the kernel's parameters exactly (the constexprs by keyword)
        assert len(args) == len([p for p in params if p not in kw]) and grid == (1,)
        ck = compiled[cfg]
        assert ck.module is None and not hasattr(ck, "n_regs")  # what warmup returns: no handles loaded
        state.warmed.append(cfg)
        return ck

    def run(*args, grid, warmup, **kw):
        state.grids.append((config_of(kw), tuple(grid)))
        return type(fn).run(fn, *args, grid=grid, warmup=warmup, **kw)

    monkeypatch.setattr(fn, "warmup", warmup)
    monkeypatch.setattr(fn, "run", run)
    before = _allocation._allocator.get()
    yield state
    triton_set_allocator(before)


def triton_set_allocator(allocator):
    import triton

    triton.set_allocator(allocator)


# ----------------------------------------------------------------------------- reading the compiled kernel
def test_registers_and_shared_memory_come_from_the_cubin(compiled):
    """occupancy.cubin_resources reads what cuobjdump reads, from a kernel whose handles were never loaded."""
    from dit_accel.kernels.sass import resource_usage

    for cfg, ck in compiled.items():
        res = resource_usage(ck.asm["cubin"])
        assert occupancy.cubin_resources(ck.asm["cubin"], ck.name) == {
            "registers": res["registers"], "shared_static": res["shared_static"]}, cfg.name
        assert occupancy.compiled_resources(ck)["registers"] == res["registers"] > 0


def test_persistent_grid_from_a_kernel_without_handles(sm90, compiled):
    """The first-call crash of issue 35: ``_programs`` read ``n_regs``, which triton 3.9's ``warmup`` result
    lacks until its handles are loaded. Handed that very object it now sizes the grid from the cubin."""
    for cfg, ck in compiled.items():
        grid = bst._programs(torch.device("cuda", 0), cfg, 10 ** 6, lambda: ck)
        assert grid == _cuobjdump_ctas(ck) * SMS
    ws_ctas = _cuobjdump_ctas(compiled[WS])
    assert ws_ctas == 1 and compiled[WS].metadata.num_warps == 12  # a producer and two consumer warp groups
    assert bst._programs(torch.device("cuda", 0), FWD, 3, lambda: None) == 3  # at most one program per item


# ----------------------------------------------------------------------------- the forward launchers
def _uneven(heads, n, block, seed):
    mask = random_mask(heads, n, n, block=block, seed=seed, empty_rows=(2,), full_block=(0, block, 0, n))
    mask |= banded_mask(n, n, 5)
    mask[:, 2] = False
    return mask, BlockLayout.from_dense_mask(mask, block_q=block, block_k=block)


def test_persistent_forward_on_sm90(sm90, compiled):
    """The one-loop persistent forward: grid = resident CTAs (registers, shared memory and warps of the
    compiled kernel) x SMs, fewer than the work items; every item done once (numbers vs the reference)."""
    n = 257
    mask, layout = _uneven(2, n, 64, seed=1)
    q, k, v = make_qkv(2, 2, n, n, D, torch.float16, seed=1)
    o, lse = bst.triton_forward(q, k, v, layout, D ** -0.5)
    assert_attention_close(o, lse, q, k, v, mask)
    items = 2 * 2 * -(-n // 64)
    expected = _cuobjdump_ctas(compiled[FWD]) * SMS
    assert sm90.warmed == [FWD] and sm90.grids == [(FWD, (expected,))] and expected < items
    bst.triton_forward(q, k, v, layout, D ** -0.5)  # a repeated call: no second warmup
    assert sm90.warmed == [FWD] and sm90.grids[-1] == (FWD, (expected,))


def test_persistent_forward_by_length_on_sm90(sm90, compiled, monkeypatch):
    """The TMA one loop with length tiles (ragged key tiles included: TMA zero-fills past the keys), on a layout
    of full, column-prefix and element-masked blocks: opted in (DIT_ACCEL_LENGTHS=1), the launcher takes the length
    configuration (the self-check trusted here), its plan lists length tiles, and the numbers match the reference
    and the bit-mask path."""
    from dit_accel.kernels._selfchecks import prefix_layout

    monkeypatch.setenv("DIT_ACCEL_LENGTHS", "1")

    n, m = 257, 3 * 64 + 29
    layout = prefix_layout(2, n, m, 64, 64, seed=21)
    q, k, v = make_qkv(2, 2, n, m, D, torch.float16, seed=5)
    o, lse = bst.triton_forward(q, k, v, layout, D ** -0.5)
    assert_attention_close(o, lse, q, k, v, layout.to_dense_mask())
    assert sm90.warmed == [FWD_LEN] and sm90.grids[-1][0] == FWD_LEN
    plan = bst._plan(layout, FWD.block_m, FWD.block_n, False, lengths=True)
    n_len = plan.plan[..., 2]
    assert int(n_len.sum()) > 0 and int((plan.plan[..., 1] - n_len).sum()) > 0  # length and bit-masked tiles
    o0, _ = bst.triton_forward(q, k, v, layout, D ** -0.5, lengths=False)
    assert sm90.grids[-1][0] == FWD
    torch.testing.assert_close(o.float(), o0.float(), atol=2e-3, rtol=0)


def _ws_layout(heads, n, seed):
    """128-blocks: query block 0 has full tiles and partial ones, query block 1 whole blocks only."""
    mask = random_mask(heads, n, n, block=64, seed=seed) | banded_mask(n, n, 3)
    mask[:, :128, :128] = True
    mask[:, 128:256] = False
    mask[:, 128:256, :128] = True
    return mask, BlockLayout.from_dense_mask(mask, block_q=128, block_k=128)


def test_ws_and_resume_forward_on_sm90(sm90, compiled, monkeypatch):
    """The warp-specialized forward and its resume pass: each warmed once, each launched on its own resident
    grid (1 CTA per SM for ws: 12 warps, 213 KB), the resume pass over the items with partial tiles only."""
    monkeypatch.setattr(bst, "ws_pays", lambda *a, **k: True)
    n = 257
    mask, layout = _ws_layout(2, n, seed=3)
    q, k, v = make_qkv(2, 2, n, n, D, torch.float16, seed=3)
    o, lse = bst.triton_forward(q, k, v, layout, D ** -0.5)
    assert_attention_close(o, lse, q, k, v, mask)
    assert sm90.warmed == [ONE_LOOP, WS, RESUME]  # the one-loop kernel's grid is part of the cached launch
    assert [c for c, _ in sm90.grids] == [WS, RESUME]
    items, resumed = bst.ws_schedule(bst._plan(layout, 128, 64, False), 2, 2, WS)
    for (cfg, grid), todo in zip(sm90.grids, (items, resumed)):
        assert grid == (min(todo.numel(), _cuobjdump_ctas(compiled[cfg]) * SMS),)
    assert sm90.grids[0][1] == (SMS,) and SMS < items.numel()


# ----------------------------------------------------------------------------- guards: TMA operands
def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view whose storage offset is odd (base 2 bytes off 16-byte alignment in fp16)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert not tma_ok(out) and out.storage_offset() == 1
    return out


def test_vsa_later_calls_plan_without_a_layout_on_sm90(sm90, compiled, monkeypatch):
    """VSA's fine branch on the persistent sm_90 forward, on a grid with partial edge cubes: the class's first call
    (its layout) and a later one planned from the selection alone (:mod:`dit_accel.kernels.vsa.fine`) run the
    same compiled configuration on the same persistent grid, one warm-up in all, and the later one gives the
    general path's bits."""
    from dit_accel.kernels.vsa import api, fine
    from dit_accel.kernels.vsa.naive import cubes_of

    monkeypatch.delenv("DIT_ACCEL_WS")  # (opted in by the fixture; the template path leaves ws forwards alone)
    monkeypatch.setattr(fine, "_TEMPLATES", {})
    cubes = cubes_of((3, 9, 10), (4, 4, 4))  # 9 cubes, 8 of them partial
    n = cubes.perm.num_padded
    q, k, v = make_qkv(1, 2, n, n, D, torch.float16, seed=3)
    g = torch.Generator().manual_seed(4)
    first, later = (torch.rand(1, 2, 9, 9, generator=g).topk(4, -1).indices.sort(-1).values for _ in range(2))
    api._fine_branch(q, k, v, cubes, cubes.perm, None, first, D ** -0.5, "triton")
    assert fine.has_template((3, 9, 10), (1, 2, n, D)) and sm90.warmed == [FWD]
    launched = sm90.grids[-1]
    got = api._fine_branch(q, k, v, cubes, cubes.perm, None, later, D ** -0.5, "triton")
    items = 2 * -(-n // 64)
    assert sm90.grids[-1] == launched and launched[0] == FWD and sm90.warmed == [FWD] and launched[1][0] < items
    layout = api.vsa_layout(cubes, later)
    o, _ = bst.triton_forward(*(x.reshape(1, 2, n, D) for x in (q, k, v)), layout, D ** -0.5)
    assert torch.equal(got.fine, cubes.perm.unpermute(o.view(1, 2, n, D), dim=-2))


def test_tma_ok_rejects_misaligned_and_stride_0():
    q = torch.randn(2, 2, 64, 64, dtype=torch.float16)
    assert tma_ok(q)
    assert not tma_ok(_misaligned(q))
    assert not tma_ok(q[:, :1].expand(2, 2, 64, 64))  # head stride 0
    assert not tma_ok(q[:1].expand(2, 2, 64, 64))  # batch stride 0


def test_misaligned_q_keeps_the_ws_forward_off(sm90, compiled, monkeypatch):
    """The ws kernel makes a descriptor of Q: a Q off 16-byte alignment must not reach it (K, V aligned).
    The one-loop TMA kernel (Q by pointers, K/V by descriptors) runs instead."""
    monkeypatch.setattr(bst, "ws_pays", lambda *a, **k: True)
    n = 257
    mask, layout = _ws_layout(2, n, seed=5)
    q, k, v = make_qkv(2, 2, n, n, D, torch.float16, seed=5)
    q = _misaligned(q)
    assert tma_ok(k, v)
    o, lse = bst.triton_forward(q, k, v, layout, D ** -0.5)
    assert_attention_close(o, lse, q, k, v, mask)
    assert [c for c, _ in sm90.grids] == [ONE_LOOP]
    aligned = make_qkv(2, 2, n, n, D, torch.float16, seed=5)[0]  # the same call, aligned: ws runs
    bst.triton_forward(aligned, k, v, layout, D ** -0.5)
    assert [c for c, _ in sm90.grids[1:]] == [WS, RESUME]


@pytest.mark.parametrize("expanded", ["batch", "head"])
def test_expanded_kv_take_the_pointer_kernels(sm90, expanded):
    """K, V expanded over batch or heads (stride 0): forward and backward load them by pointers (the
    forward's grid is then one program per query tile, not the persistent one), with the reference's numbers."""
    n = 130
    mask, layout = _uneven(2, n, 64, seed=7)
    q, k, v = make_qkv(2, 2, n, n, D, torch.float16, seed=7)
    k, v = ((t[:1].expand_as(t) if expanded == "batch" else t[:, :1].expand_as(t)) for t in (k, v))
    assert 0 in k.stride()
    o, lse = bst.triton_forward(q, k, v, layout, D ** -0.5)
    assert_attention_close(o, lse, q, k, v, mask)
    (kw, grid), = sm90.grids
    assert kw["TMA"] is False and grid == (-(-n // kw["BLOCK_M"]), 4) and sm90.warmed == []
    do = torch.randn_like(o)
    grads = bst.triton_backward(do, q, k, v, o, lse, layout, D ** -0.5)
    assert_grads_close(grads, q, k, v, mask, do)
    back = [x for x in bst._PLANS.values(layout).values() if isinstance(x, bst._BackwardLaunch)]
    dkdv, dq = back[0].steps
    assert dq.descriptors is None and dq.kw["TMA"] is False  # K, V streamed by pointers
    assert dkdv.descriptors is not None and dkdv.kw["TMA"] is True  # Q, dO aligned: still TMA


def test_misaligned_q_takes_the_pointer_dkdv(sm90):
    """The dK/dV kernel streams Q and dO by descriptors: a misaligned Q sends it to pointers."""
    n = 130
    mask, layout = _uneven(2, n, 64, seed=8)
    q, k, v = make_qkv(1, 2, n, n, D, torch.float16, seed=8)
    o, lse = bst.triton_forward(q, k, v, layout, D ** -0.5)
    q = _misaligned(q)
    do = torch.randn_like(o)
    grads = bst.triton_backward(do, q, k, v, o, lse, layout, D ** -0.5)
    assert_grads_close(grads, q, k, v, mask, do)
    back = [x for x in bst._PLANS.values(layout).values() if isinstance(x, bst._BackwardLaunch)]
    dkdv, dq = back[0].steps
    assert dkdv.descriptors is None and dkdv.kw["TMA"] is False
    assert dq.descriptors is not None and dq.kw["TMA"] is True


#: The one-pass backward the sm_90 launcher picks for fp16, head dim 80, 128-token blocks.
FUSED = fused_config(torch.float16, D, 128, 128, 90)
_TYPES = {"fp16": torch.float16, "fp32": torch.float32, "i32": torch.int32, "i64": torch.int64}


@pytest.fixture(scope="module")
def compiled_fused():
    from triton.compiler.compiler import CompiledKernel

    from dit_accel.kernels.compile import map_in_workers

    ((group, digest),) = map_in_workers(_compile_job, [FUSED])
    return CompiledKernel(None, group, digest)


def _assert_type(kind: str, arg, name: str) -> None:
    """``arg`` is what a kernel compiled with signature entry ``kind`` takes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if kind.startswith("tensordesc<"):
        dtype, block = kind[len("tensordesc<"):-1].split("[")
        assert isinstance(arg, TensorDescriptor) and arg.base.dtype == _TYPES[dtype], name
        assert list(arg.block_shape) == [int(x) for x in block.rstrip("]").split(",")], name
    elif kind.startswith("*"):
        assert isinstance(arg, torch.Tensor) and arg.dtype == _TYPES[kind[1:]], (name, kind)
    elif kind == "i32":
        assert isinstance(arg, int) and -2 ** 31 <= arg < 2 ** 31, (name, arg)
    else:
        assert kind == "fp32" and isinstance(arg, float), (name, kind, arg)


def test_one_pass_backward_on_sm90(sm90, compiled_fused, monkeypatch):
    """The one-pass backward as the sm_90 launcher sets it up: the shipped configuration, every argument of
    the type the AOT-compiled kernel was built for (descriptors of Q and dO with its block, dQ's fp32 buffer),
    a grid of key tiles x B*H, and the reference's gradients (the launch itself runs in the interpreter)."""
    from dit_accel.kernels.block_sparse import bwd_fused
    from dit_accel.kernels.compile import aot_source

    fn, seen = bwd_fused._bwd_dkdv_dq_kernel, []
    monkeypatch.setattr(fn, "run", lambda *a, grid, warmup, **kw: (
        seen.append((a, grid, kw)), type(fn).run(fn, *a, grid=grid, warmup=warmup, **kw))[1])
    n = 257
    mask, layout = _ws_layout(2, n, seed=9)
    q, k, v = make_qkv(1, 2, n, n, D, torch.float16, seed=9)
    o, lse = bst.triton_forward(q, k, v, layout, D ** -0.5)
    do = torch.randn_like(o)
    grads = bst.triton_backward(do, q, k, v, o, lse, layout, D ** -0.5, one_pass=True)
    assert_grads_close(grads, q, k, v, mask, do)
    ((args, grid, kw),) = seen
    _, signature, constexprs, _ = aot_source(FUSED)
    assert {key: kw[key] for key in constexprs} == constexprs
    assert (kw["num_warps"], kw["num_stages"]) == (FUSED.num_warps, FUSED.num_stages) == (8, 1)
    params = [p for p in fn.arg_names if p not in constexprs]
    assert len(args) == len(params)
    for name, arg in zip(params, args):
        _assert_type(signature[name], arg, name)
    assert grid == (-(-n // FUSED.block_n), 2)
    assert compiled_fused.metadata.num_warps == 8 and compiled_fused.metadata.shared <= 232448
    # A misaligned Q: this kernel's pointer variant spills at d128 on sm_90 (configs.FUSED_POINTER_SPILLS), so
    # the two-pass backward runs; forced, the one-pass backward says it cannot.
    seen.clear()
    grads = bst.triton_backward(do, _misaligned(q), k, v, o, lse, layout, D ** -0.5)
    assert_grads_close(grads, q, k, v, mask, do)
    with pytest.raises(ValueError, match="16-byte aligned q and do"):
        bst.triton_backward(do, _misaligned(q), k, v, o, lse, layout, D ** -0.5, one_pass=True)
    assert seen == []


def _dense_launches(monkeypatch):
    fn, seen = dense_triton._dense_fwd_kernel, []
    monkeypatch.setattr(fn, "run", lambda *a, grid, warmup, **kw: (
        seen.append(kw), type(fn).run(fn, *a, grid=grid, warmup=warmup, **kw))[1])
    return seen


@pytest.mark.parametrize("case", ["aligned", "misaligned-q", "expanded-kv"])
def test_dense_forward_guards(sm90, monkeypatch, case):
    """The dense forward on sm_90: ws (descriptors of Q, K, V made in the kernel) only with all three
    aligned; a misaligned Q keeps the TMA kernel with K/V descriptors; expanded K/V take pointers."""
    seen = _dense_launches(monkeypatch)
    q, k, v = make_qkv(1, 2, 70, 100, D, torch.float16, seed=11)
    if case == "misaligned-q":
        q = _misaligned(q)
    if case == "expanded-kv":
        k, v = k[:, :1].expand_as(k), v[:, :1].expand_as(v)
    o, lse = dense_triton.dense_forward(q, k, v, D ** -0.5)
    assert_attention_close(o, lse, q, k, v, None)
    (kw,) = seen
    assert (kw["WS"], kw["TMA"]) == {"aligned": (True, True), "misaligned-q": (False, True),
                                     "expanded-kv": (False, False)}[case]


@pytest.mark.parametrize("case", ["aligned", "misaligned-q", "expanded-kv"])
def test_sla_tma_forward_guards(monkeypatch, case):
    """SLA's TMA forward makes descriptors of Q, K and V in the kernel: a misaligned Q or expanded K/V take
    the pointer forward (the configuration launched), with the reference's numbers."""
    from dit_accel.kernels.sla import sla_attention
    from dit_accel.kernels.sla import triton as st
    from dit_accel.methods import SLA
    from tests.kernels.sla_reference import reference_sla

    monkeypatch.setattr(occupancy, "on_gpu", lambda device: True)
    monkeypatch.setattr(st, "_arch", lambda device: 90)
    launched, real = [], st._launch
    monkeypatch.setattr(st, "_launch", lambda cfg, grid, *args: (launched.append(cfg), real(cfg, grid, *args)))
    from triton.runtime import _allocation

    before = _allocation._allocator.get()
    try:
        q, k, v = make_qkv(1, 2, 130, 130, 64, torch.float32, seed=13)
        if case == "misaligned-q":
            q = _misaligned(q)
        if case == "expanded-kv":
            k, v = k[:, :1].expand_as(k), v[:, :1].expand_as(v)
        method = SLA(topk=0.4)
        o_s, lse, _, info = sla_attention(q, k, v, method, None, backend="triton", return_parts=True)
    finally:
        triton_set_allocator(before)
    assert [c.tma for c in launched if c.kernel == "fwd"] == [case == "aligned"]
    _, ref_s, ref_lse, _ = reference_sla(q, k, v, info["blocks"].classes, method, None)
    torch.testing.assert_close(o_s, ref_s, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- guards: scratch on q's device
def test_descriptor_scratch_is_allocated_on_the_inputs_device(monkeypatch):
    """q on cuda:1 while cuda:0 is current: the in-kernel descriptors' scratch comes from cuda:1; a later
    launch on cuda:0 re-targets it; a caller's own allocator is left alone."""
    import triton
    from triton.runtime import _allocation

    monkeypatch.setattr(occupancy, "on_gpu", lambda device: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    made = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **kw: (made.append(torch.device(device)),
                                                                       real_empty(*a, **kw))[1])
    before = _allocation._allocator.get()
    try:
        triton.set_allocator(_allocation.NullAllocator())
        for dev in ("cuda:1", "cuda:1", "cuda:0"):
            dense_triton.ensure_allocator(torch.device(dev))
            _allocation._allocator.get()(128, 16, None)
        assert made == [torch.device("cuda:1"), torch.device("cuda:1"), torch.device("cuda:0")]

        def own(size, alignment, stream):
            return real_empty(size, dtype=torch.int8)

        triton.set_allocator(own)
        dense_triton.ensure_allocator(torch.device("cuda:1"))
        assert _allocation._allocator.get() is own
    finally:
        triton_set_allocator(before)


def test_launchers_run_with_the_inputs_gpu_current(monkeypatch):
    """Triton launches on the current device: a launcher given tensors on cuda:1 while cuda:0 is current
    makes cuda:1 current for its launches (and puts it back); on the current device it switches nothing. Every
    launcher a call reaches outside another one is wrapped: SLA's classification (pooling, selection) and VSA's
    coarse launches were not (a model placed on a second GPU launched them on the first)."""
    import contextlib

    from dit_accel.kernels.sla import backward as sla_bwd_launcher
    from dit_accel.kernels.sla import triton as st
    from dit_accel.kernels.sla import pool as sla_pool
    from dit_accel.kernels.sla import select as sla_select
    from dit_accel.kernels.vsa import gated
    from dit_accel.kernels.vsa import triton as vt

    current, switches = [0], []

    @contextlib.contextmanager
    def device(dev):
        before, current[0] = current[0], torch.device(dev).index
        switches.append(current[0])
        yield
        current[0] = before

    monkeypatch.setattr(occupancy, "on_gpu", lambda d: d.type == "cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    launcher = occupancy.on_inputs_device(lambda x, scale=1.0: seen.append((current[0], scale)) or "out")
    cuda1, cuda0, cpu = (types.SimpleNamespace(device=torch.device(d)) for d in ("cuda:1", "cuda:0", "cpu"))
    assert launcher(cuda1, scale=2.0) == "out" and seen == [(1, 2.0)] and current == [0] and switches == [1]
    launcher(cuda0)
    launcher(cpu)
    assert seen[1:] == [(0, 1.0), (0, 1.0)] and switches == [1]
    for fn in (bst.triton_forward, bst.triton_backward, dense_triton.dense_forward, dense_triton.dense_backward,
               dense_triton.bwd_preprocess, st.sla_forward, sla_bwd_launcher.sla_backward, st.global_sums,
               sla_pool.pool_blocks, sla_select.select_blocks, vt.pool_triton, vt.coarse_of_means, gated.gated_backward):
        assert fn.__code__ is launcher.__code__, fn.__name__  # each launcher is wrapped


def _pretend_ws_applies(monkeypatch):
    """The ws variant applies on sm_90 only (``selfcheck.usable`` says no elsewhere): pretend this is one."""
    import dataclasses

    from dit_accel.kernels import selfcheck as _sc

    name = "block_sparse.triton.fwd_ws"
    monkeypatch.setitem(_sc._REGISTRY, name, dataclasses.replace(_sc.variant(name), applies=lambda device: None))
