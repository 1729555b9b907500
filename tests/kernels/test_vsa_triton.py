"""VSA's Triton coarse branch with its top-k selection fused into the coarse launch (dit_accel.kernels.vsa.triton).

Under the interpreter, on grids that are no multiple of the tile (partial cubes), fp32 (its bf16 dot is wrong):
the launch's selection is the set torch.topk picks (ascending, no duplicates), exact ties (duplicated key cubes)
go to the lower index on the launch and the twin alike, past NK_MAX the twin's rule selects instead, the coarse output and scores match the twin, and a
fault in the selection alone fails the self-check. Without a GPU (real compiles in a subprocess): the pooling and
the fused coarse + select kernels compile for sm_90 and sm_100 without spills, stack frame or local memory at head
dim 64 and 128, FastWan 480p's 624 cubes (4x4x4) and NK_MAX cubes.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from tests.utils import interpreter, static_toolchain  # noqa: E402


def _tiled(grid, tile, b=1, h=2, d=24, seed=0):
    from dit_accel.kernels.vsa.naive import cubes_of

    cubes = cubes_of(grid, tile)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, cubes.perm.num_tokens, d, generator=g) for _ in range(3))
    return cubes, [cubes.perm.permute(x, dim=-2) for x in (q, k, v)]


def _lower_index_top(scores, count):
    """The ``count`` largest per row, an exact tie going to the lower index (a stable descending sort), ascending."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count].sort(-1).values


GRIDS = [
    pytest.param((5, 6, 7), (2, 2, 4), id="5x6x7-t224-18cubes"),
    # 140 cubes: 256 key slots per row, so a program selects in 2 row groups; a ragged last program (140 % 16)
    pytest.param((4, 5, 13), (1, 1, 2), id="4x5x13-t112-140cubes"),
]


@interpreter
@pytest.mark.parametrize("grid,tile,share", [
    pytest.param(*GRIDS[0].values, "one", id="18cubes-top1"),
    pytest.param(*GRIDS[0].values, "third", id="18cubes-top6"),
    pytest.param(*GRIDS[0].values, "all", id="18cubes-all"),
    pytest.param(*GRIDS[1].values, "third", id="140cubes-top46"),
])
def test_fused_selection_is_the_topk_set_without_ties(grid, tile, share):
    from dit_accel.kernels.vsa import triton as vt
    from dit_accel.kernels.vsa.naive import coarse_attention

    cubes, (q_t, k_t, v_t) = _tiled(grid, tile, seed=3)
    c = cubes.count
    count = {"one": 1, "third": c // 3, "all": c}[share]
    assert vt.fused_selection(c)
    coarse, scores, sel = vt.coarse_triton(q_t, k_t, v_t, cubes, count, 0.3)
    want = coarse_attention(q_t, k_t, v_t, cubes, count, 0.3)
    torch.testing.assert_close(coarse, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, want[1], atol=1e-5, rtol=1e-5)
    assert sel.dtype == torch.int64 and sel.shape == (1, 2, c, count)
    assert bool((sel[..., 1:] > sel[..., :-1]).all())  # ascending, no index twice
    # Against torch.topk of the launch's own scores: the same set exactly (no exact tie at the boundary).
    if count < c:
        top = torch.topk(scores, count + 1, dim=-1).values
        assert bool((top[..., count - 1] > top[..., count]).all())
    assert torch.equal(sel, torch.topk(scores, count, dim=-1).indices.sort(-1).values)
    # Against the twin's torch.topk: the same set on every row whose boundary is not a near-tie in fp32.
    gap = torch.ones(scores.shape[:-1])
    if count < c:
        top = torch.topk(want[1], count + 1, dim=-1).values
        gap = top[..., count - 1] - top[..., count]
    apart = gap > 1e-5
    assert apart.float().mean() > 0.95
    assert torch.equal(sel[apart], want[2].sort(-1).values[apart])


@interpreter
@pytest.mark.parametrize("grid,tile", GRIDS)
def test_exact_ties_go_to_the_lower_index(grid, tile):
    """Key cubes with the same real tokens get the same content, so their scores tie exactly: every row's
    boundary falls inside a tied class, and the launch takes that class's lower indices."""
    from dit_accel.kernels.vsa.naive import coarse_attention
    from dit_accel.kernels.vsa.triton import coarse_triton

    cubes, (q_t, k_t, v_t) = _tiled(grid, tile, seed=5)
    c, vol = cubes.count, cubes.volume
    b, h, n_pad, d = k_t.shape
    patterns, cls = torch.unique(cubes.real, dim=0, return_inverse=True)
    first = torch.stack([torch.nonzero(cls == i)[0, 0] for i in range(len(patterns))])
    k_t = k_t.view(b, h, c, vol, d)[:, :, first[cls]].reshape(b, h, n_pad, d)  # (padding stays zero)
    count = c // 3 + 1
    _, scores, sel = coarse_triton(q_t, k_t, v_t, cubes, count, 0.3)
    for i in range(len(patterns)):  # the ties are real in what the launch selected from
        same = scores[..., cls == i]
        assert torch.equal(same, same[..., :1].expand_as(same))
    values = torch.sort(scores, dim=-1, descending=True).values
    assert bool((values[..., count - 1] == values[..., count]).all())  # every row's boundary ties
    assert torch.equal(sel, _lower_index_top(scores, count))
    want = coarse_attention(q_t, k_t, v_t, cubes, count, 0.3)
    torch.testing.assert_close(scores, want[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(want[2], sel)  # the twin (the CPU path) picks the very same cubes, in the same order


@interpreter
def test_one_call_selects_the_same_tied_cubes_on_the_launch_and_the_twin():
    """As a user calls it: ``vsa_attention`` with every key cube alike (a full tie of the coarse scores) selects
    the lowest cube indices through the Triton launch (forced, the interpreter) and through the PyTorch twin."""
    import dit_accel

    grid = (5, 6, 7)  # 18 cubes of (2, 2, 4), partial ones included
    g = torch.Generator().manual_seed(2)
    q, v = (torch.randn(1, 2, 210, 16, generator=g) for _ in range(2))
    # one key vector of quarters: its mean over any cube is exact, so every key cube's score ties exactly
    k = (torch.randint(-8, 8, (1, 2, 1, 16), generator=g) / 4).expand(1, 2, 210, 16).contiguous()
    outs = {b: dit_accel.vsa_attention(q, k, v, grid, topk=5, tile=(2, 2, 4), backend=b, return_selection=True)
            for b in ("torch", "triton")}
    want = torch.arange(5).expand(1, 2, 18, 5)
    assert torch.equal(outs["torch"][1], want) and torch.equal(outs["triton"][1], want)
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], atol=1e-5, rtol=1e-5)


@interpreter
def test_past_the_bound_the_same_rule_selects(monkeypatch):
    from dit_accel.kernels.vsa import triton as vt

    cubes, (q_t, k_t, v_t) = _tiled((5, 6, 7), (2, 2, 4), seed=1)
    monkeypatch.setattr(vt, "NK_MAX", cubes.count - 1)
    assert not vt.fused_selection(cubes.count)
    real = cubes.real.reshape(1, 1, -1, 1)
    k_t = torch.where(real, k_t[:, :, :1], 0.0)  # every real key alike: every cube mean ties (padding stays zero)
    coarse, scores, sel = vt.coarse_triton(q_t, k_t, v_t, cubes, 4, 0.3, with_output=False)
    assert coarse is None
    assert torch.equal(sel, _lower_index_top(scores, 4))  # the fused selection's rule: ascending, lower index


@interpreter
def test_a_fault_in_the_selection_alone_fails_the_self_check(tmp_path, monkeypatch):
    """The selection no longer derives from the returned scores: with the scores and output left intact (corrupt
    a no-op), the fault switch's mirrored selection still fails vsa.triton.coarse."""
    from dit_accel.kernels import selfcheck

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setattr(selfcheck, "corrupt", lambda name, t: t)
    monkeypatch.setenv(selfcheck.ENV_FAULT, "vsa.triton.coarse")
    shape = {"head_dim": 64, "block_q": 64, "block_k": 64}
    bad = selfcheck.verdict("vsa.triton.coarse", torch.device("cpu"), torch.float32, shape, fresh=True)
    assert not bad["ok"] and bad["error"] > 0.01, bad
    assert "selection differs" in bad["problem"], bad


_SCRIPT = r"""
import json
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dit_accel.kernels.sass import ptxas_report, resource_usage
from dit_accel.kernels.vsa import triton as vt

jobs = [("pool", d, 0, dt, vol, True, g) for d in (64, 128) for dt in (torch.bfloat16, torch.float32)
        for vol in (64, 256) for g in (False, True)]  # (g: reading raster order through the row table)
jobs += [("coarse", d, c, torch.float32, 64, wo, False) for d in (64, 128) for c in (624, vt.NK_MAX)
         for wo in (True, False)]
jobs += [("coarse", 64, 100, torch.float32, 64, True, False), ("coarse", 128, vt.NK_MAX + 1, torch.float32, 64, True,
                                                                 False)]
out = []
for arch in (90, 100):
    for name, d, c, dt, vol, wo, g in jobs:
        fn, sig, cx, attrs = vt.aot_source(name, d, c, dt, volume=vol, with_output=wo, gather=g)
        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": vt.NUM_WARPS})
        rep, res = ptxas_report(ck.asm["ptx"], arch), resource_usage(ck.asm["cubin"])
        out.append(dict(name=name, arch=arch, d=d, c=c, dtype=str(dt), vol=vol, with_output=wo, gather=g,
                        select=cx.get("WITH_SELECT"), group=cx.get("GROUP"), shared=ck.metadata.shared,
                        registers=res["registers"], local=res["local"], stack=rep["stack"],
                        spill_stores=rep["spill_stores"], spill_loads=rep["spill_loads"], warnings=rep["warnings"],
                        ptx_local=ck.asm["ptx"].count(".local")))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_kernels_compile_for_sm90_and_sm100_within_shared_memory(compiled):
    from dit_accel.kernels.vsa.triton import NK_MAX

    assert {(r["name"], r["arch"]) for r in compiled} == {(n, a) for n in ("pool", "coarse") for a in (90, 100)}
    assert {r["gather"] for r in compiled if r["name"] == "pool"} == {False, True}
    assert all(r["shared"] <= 48 * 1024 for r in compiled), compiled
    fused = {(r["c"], r["select"]) for r in compiled if r["name"] == "coarse"}
    assert {(624, True), (NK_MAX, True), (NK_MAX + 1, False)} <= fused


@static_toolchain
def test_no_kernel_spills(compiled):
    bad = [r for r in compiled
           if r["stack"] or r["spill_stores"] or r["spill_loads"] or r["local"] or r["ptx_local"] or r["warnings"]]
    assert not bad, bad


@interpreter
def test_the_launch_copies_no_host_table_per_call():
    """Issue 72, item 5 (CUDA-graph safe): the pooling launch's 1 / cube sizes are made once per device, so a call
    after the first never reads the host-side ``cubes.sizes`` (a host-to-device copy per call on a GPU)."""
    from dit_accel.kernels.vsa.triton import coarse_triton

    cubes, (q_t, k_t, v_t) = _tiled((5, 6, 7), (2, 2, 4), seed=7)
    first = coarse_triton(q_t, k_t, v_t, cubes, 3, 0.3)
    again = coarse_triton(q_t, k_t, v_t, cubes._replace(sizes=None), 3, 0.3)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
