"""The one-pass block-sparse backward (dit_accel.kernels.block_sparse.bwd_fused): exact against the fp32
reference and the two-pass kernels under the interpreter, chosen only where asked or self-checked.

Interpreter sizes (N <= 257) in fp32 and fp16 (the interpreter's bf16 tl.dot is wrong); the static count of
its tensor-core products per tile is in test_sass_bwd_fused.py.
"""

import os

import pytest
import torch

from dit_accel.kernels import BlockLayout, selfcheck
from dit_accel.kernels.block_sparse import bwd_fused
from dit_accel.kernels.block_sparse.configs import fused_config
from dit_accel.kernels.block_sparse.launches import launched_variants
from dit_accel.kernels.block_sparse.triton import triton_backward, triton_forward
from tests.utils import DT, assert_grads_close, make_qkv, random_mask

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter test (CPU tensors)")

# (q_len, kv_len, head dim, layout block): odd lengths (ragged last tiles on both sides), q_len != kv_len, head
# dims the pointer kernel pads (48, 32), and layout blocks of 16 to 64 (the kernel tile is min(64, block)).
# Two heads with patterns of their own at N=63, one head elsewhere (the interpreter's time).
F32, F16 = torch.float32, torch.float16
CASES = [(63, 63, 64, 32, F32, 2), (63, 63, 64, 32, F16, 2), (130, 257, 48, 32, F16, 1), (257, 130, 64, 64, F32, 1),
         (130, 130, 32, 16, F32, 1)]


def _problem(n, m, d, block, dtype, heads=2, seed=0):
    mask = random_mask(heads, n, m, block=block, seed=seed + n + m, empty_rows=(n - 1,),
                       full_block=(0, min(n, 2 * block), 0, min(m, 2 * block)))
    layout = BlockLayout.from_dense_mask(mask, block_q=block, block_k=block)
    q, k, v = make_qkv(1, heads, n, m, d, dtype, seed=seed + d)
    return q, k, v, mask, layout


@pytest.mark.parametrize("n,m,d,block,dtype,heads", CASES,
                         ids=[f"N{n}-M{m}-D{d}-B{b}-{DT[t]}-H{h}" for n, m, d, b, t, h in CASES])
def test_one_pass_backward_matches_reference_and_two_pass(n, m, d, block, dtype, heads):
    q, k, v, mask, layout = _problem(n, m, d, block, dtype, heads)
    plan_full, plan_part = _tile_kinds(layout, q)
    assert plan_full > 0 and plan_part > 0  # both loops of the kernel run
    scale = d ** -0.5
    o, lse = triton_forward(q, k, v, layout, scale)
    do = torch.randn_like(o)
    one = triton_backward(do, q, k, v, o, lse, layout, scale, one_pass=True)
    assert_grads_close(one, q, k, v, mask, do)
    two = triton_backward(do, q, k, v, o, lse, layout, scale, one_pass=False)
    # The same products as the two-pass kernels (dQ's summed in another order): equal to rounding.
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for a, b in zip(one, two):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    ran = launched_variants(layout)["backward"]
    assert len(ran) == 2 and ran[0].startswith("bwd_dkdv-") and ran[1].startswith("bwd_dkdv_dq-"), ran


def _tile_kinds(layout, q):
    cfg = fused_config(q.dtype, q.shape[-1], layout.block_q, layout.block_k, 80, gpu=False)
    from dit_accel.kernels.block_sparse.tile_plans import tile_plan

    return tile_plan(layout, cfg.block_n, cfg.block_m, transposed=True).tile_counts()


def test_one_pass_backward_with_lse_gradient_and_strided_inputs():
    """An lse gradient (delta - dlse) and q, k, v in the (B, N, H, D) memory layout Diffusers hands over."""
    n, m, d, heads = 130, 97, 64, 3
    mask = random_mask(heads, n, m, block=32, seed=5, empty_rows=(7,), full_block=(0, 64, 0, 64))
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make_qkv(2, heads, n, m, d, seed=3))
    scale = 0.3
    o, lse = triton_forward(q, k, v, layout, scale)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    got = triton_backward(do, q, k, v, o, lse, layout, scale, dlse=dlse, one_pass=True)
    want = triton_backward(do, q, k, v, o, lse, layout, scale, dlse=dlse, one_pass=False)
    for g, w, x in zip(got, want, (q, k, v)):
        assert g.stride() == x.stride()
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # and against autograd of the fp32 reference, lse term included
    from dit_accel.kernels.reference import dense_attention_reference

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    ro, rlse = dense_attention_reference(*leaves, mask, scale)
    rlse = torch.where(torch.isinf(rlse), 0.0, rlse)
    ref = torch.autograd.grad((ro * do).sum() + (rlse * dlse).sum(), leaves)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-4)


def test_default_runs_the_two_pass_backward_off_the_gpu():
    q, k, v, mask, layout = _problem(63, 63, 64, 32, torch.float32)
    o, lse = triton_forward(q, k, v, layout, 0.125)
    grads = triton_backward(torch.randn_like(o), q, k, v, o, lse, layout, 0.125)
    assert all(torch.isfinite(g).all() for g in grads)
    (ran,) = launched_variants(layout)["backward"]
    assert ran.startswith("bwd_dkdv-") and " + bwd_dq-" in ran


def test_gpu_default_prefers_one_pass_only_after_its_self_check(monkeypatch):
    """On a GPU the launcher asks the variant's verdict: a pass runs the one-pass kernel, a failure the two-pass
    one; nothing is asked (and nothing runs one-pass) where no configuration ships."""
    cuda = torch.device("cuda", 0)
    asked = []

    def verdict(ok):
        def usable_fast(name, *args):
            asked.append(name)
            return ok
        return usable_fast

    monkeypatch.setattr(bwd_fused.selfcheck, "usable_fast", verdict(True))
    assert bwd_fused.one_pass_runs(True, None, cuda, torch.bfloat16, 128, 128, 128)
    assert asked == [bwd_fused.FUSED_VARIANT]
    monkeypatch.setattr(bwd_fused.selfcheck, "usable_fast", verdict(False))
    assert not bwd_fused.one_pass_runs(True, None, cuda, torch.bfloat16, 128, 128, 128)
    assert not bwd_fused.one_pass_runs(False, None, cuda, torch.bfloat16, 128, 128, 128)
    assert len(asked) == 2
    assert not bwd_fused.one_pass_runs(True, None, torch.device("cpu"), torch.float16, 64, 64, 64)
    monkeypatch.setattr(bwd_fused.selfcheck, "usable_fast", verdict(True))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)  # atomics: no fixed order
    assert not bwd_fused.one_pass_runs(True, None, cuda, torch.bfloat16, 128, 128, 128) and len(asked) == 2
    assert bwd_fused.one_pass_runs(True, True, torch.device("cpu"), torch.float16, 64, 64, 64)


def test_the_default_one_pass_is_kept_only_where_it_timed_faster(monkeypatch):
    """On a GPU with the autotuner on, the one-pass and two-pass backwards are timed once per shape class on the
    call's inputs and the faster runs; off the GPU, in a graph or with the autotuner off the default stands."""
    from dit_accel.kernels import autotune
    from dit_accel.kernels.block_sparse import triton as bst

    q, k, v, _, layout = _problem(63, 63, 64, 32, torch.float32)
    runs = []
    run = runs.append
    times = {True: 2.0, False: 1.0}  # one-pass 2 ms, two-pass 1 ms

    def timer(fn, warmup, repeats):
        fn()
        return times[runs[-1]]

    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    assert not bwd_fused.one_pass_faster(layout, q, k, v, run, timer=timer, gpu=True)
    assert runs == [True, False]
    assert not bwd_fused.one_pass_faster(layout, q, k, v, run, timer=timer, gpu=True) and len(runs) == 2  # stored
    other = _problem(63, 63, 64, 32, torch.float16)  # another shape class: timed again, one-pass faster there
    times.update({True: 0.5})
    assert bwd_fused.one_pass_faster(other[4], *other[:3], run, timer=timer, gpu=True) and len(runs) == 4
    assert bwd_fused.one_pass_faster(layout, q, k, v, run, timer=timer, gpu=False)
    monkeypatch.setattr("dit_accel.kernels.request.in_graph", lambda: True)
    assert bwd_fused.one_pass_faster(layout, q, k, v, run, timer=timer, gpu=True) and len(runs) == 4
    monkeypatch.undo()
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    fresh = _problem(63, 63, 48, 32, torch.float32)
    assert bwd_fused.one_pass_faster(fresh[4], *fresh[:3], run, timer=timer, gpu=True) and len(runs) == 4

    # The launcher asks once per (layout, call signature) and runs what the answer says.
    asked = []
    monkeypatch.setattr(bst, "one_pass_runs", lambda shipped, one_pass, *a: one_pass if one_pass is not None else True)
    monkeypatch.setattr(bst, "one_pass_faster", lambda *a, **kw: asked.append(1) or False)
    o, lse = triton_forward(q, k, v, layout, 0.125)
    do = torch.randn_like(o)
    for _ in range(2):
        grads = triton_backward(do, q, k, v, o, lse, layout, 0.125)
    assert asked == [1]
    (ran,) = launched_variants(layout)["backward"]
    assert ran.startswith("bwd_dkdv-") and " + bwd_dq-" in ran
    assert_grads_close(grads, q, k, v, layout.to_dense_mask(), do, 0.125)


def test_forcing_one_pass_without_a_configuration_says_so(monkeypatch):
    n, d = 63, 64
    mask = random_mask(1, n, n, block=32, seed=1)
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    q, k, v = make_qkv(1, 1, n, n, d, torch.float16, seed=1)
    o, lse = triton_forward(q, k, v, layout, 0.1)
    # The launcher's question, as on an sm_89 (no configuration there): a clear error, nothing run.
    from dit_accel.kernels.block_sparse import triton as bst

    monkeypatch.setattr(bst, "_arch", lambda device: 89)
    monkeypatch.setattr(bst, "fused_config", lambda *a: fused_config(*a[:4], 89))
    with pytest.raises(ValueError, match="one_pass=True: no one-pass backward configuration ships .* head dim 64"):
        triton_backward(torch.randn_like(o), q, k, v, o, lse, layout, 0.1, one_pass=True)


def test_configurations_ship_where_they_do_not_spill():
    """fp16 / bf16 at d <= 64 on sm_80 and sm_90, d 65-128 on sm_90 with 128-token key blocks (every other
    tile searched spills: configs.FUSED_TUNED); the interpreter takes any dtype and head dim."""
    for dtype in (torch.float16, torch.bfloat16):
        for arch, d, bk in ((80, 64, 64), (90, 64, 64), (90, 128, 128), (90, 80, 128)):
            cfg = fused_config(dtype, d, 128, bk, arch)
            assert cfg is not None and cfg.kernel == "bwd_dkdv_dq" and cfg.tma == (arch == 90), (arch, dtype, d)
        assert fused_config(dtype, 128, 128, 128, 80) is None
        assert fused_config(dtype, 128, 128, 64, 90) is None
    assert fused_config(torch.float32, 64, 128, 128, 90) is None  # tf32 on a GPU: two-pass
    assert fused_config(torch.float32, 128, 128, 128, 80, gpu=False) is not None  # the interpreter checks fp32
    assert all(fused_config(torch.float16, 64, 128, 128, a) is None for a in (89, 100))
    assert fused_config(torch.float16, 256, 128, 128, 90) is None


def test_self_check_of_the_one_pass_backward_catches_a_broken_kernel(monkeypatch):
    """The variant's own problem passes on the interpreter, and fails when its output is corrupted; off a GPU
    the variant reads as not applying (the launcher never takes it unasked there)."""
    from dit_accel.kernels import _selfchecks

    (v,) = [x for x in selfcheck.variants() if x.name == bwd_fused.FUSED_VARIANT]
    assert "GPUs only" in v.applies(torch.device("cpu"))
    shape = {"head_dim": 64, "block_q": 64, "block_k": 64}
    good = _selfchecks._check_block_sparse_bwd(torch.device("cpu"), torch.float16, shape, one_pass=True)
    assert good.ok and "one pass" in good.problem, good
    monkeypatch.setenv(selfcheck.ENV_FAULT, bwd_fused.FUSED_VARIANT)
    bad = _selfchecks._check_block_sparse_bwd(torch.device("cpu"), torch.float16, shape, one_pass=True)
    assert not bad.ok, bad
    two = _selfchecks._check_block_sparse_bwd(torch.device("cpu"), torch.float16, shape)  # the fault is its own
    assert two.ok, two
