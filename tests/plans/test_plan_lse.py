"""Plans ask the kernels for the lse only where a merge uses it (issue 72, item 7): a video-only call (no text
keys merged in) asks for none, so backends that drop the lse's gradient (NATTEN, cuDNN) are not refused on
every training call; a call that merges text keys still asks for it."""

import torch

from dit_accel import GNA, Tile

GRID = (3, 16, 16)


def _recording(monkeypatch):
    import dit_accel.plans.plan as plans

    asked = []
    real = plans.block_sparse_attention

    def record(q, k, v, layout, *, scale=None, return_lse=False, backend="auto"):
        asked.append(return_lse)
        return real(q, k, v, layout, scale=scale, return_lse=return_lse, backend=backend)

    monkeypatch.setattr(plans, "block_sparse_attention", record)
    return asked


def _qkv(n, grad):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, n, 32, generator=g).requires_grad_(grad) for _ in range(3))


def test_a_video_only_training_call_asks_for_no_lse(monkeypatch):
    asked = _recording(monkeypatch)
    for method in (Tile(tile=(1, 4, 4)), GNA(kernel_size=(2, 5, 5))):
        plan = method.plan(GRID)
        assert type(plan).__name__ == "LayoutPlan", plan  # (a sparse plan: its kernel call is what is asked)
        q, k, v = _qkv(plan.num_tokens, grad=True)
        out, _ = plan.run(q, k, v, backend="torch")
        out.sum().backward()  # a training step
        assert q.grad is not None
        assert asked[-1] is False, method
        # the same call with 5 text keys merged in asks for it
        qt, kt, vt = _qkv(plan.num_tokens + 5, grad=True)
        plan.run(qt, kt, vt, num_text=5, backend="torch")[0].sum().backward()
        assert asked[-1] is True, method
        assert plan.backend_for(q, k, v, "torch", lse=False) == "torch"


def test_a_video_only_call_without_lse_matches_the_call_with_it():
    plan = Tile(tile=(1, 4, 4)).plan(GRID)
    q, k, v = _qkv(plan.num_tokens, grad=False)
    o, _ = plan.run(q, k, v, backend="torch")
    o_lse, lse, _, _ = plan.attend(q, k, v, scale=None, backend="torch", lse=True)
    assert lse is not None and torch.allclose(o, o_lse, atol=1e-6)


def test_a_gated_vsa_plan_rounds_its_sum_once():
    """VSA's gated output ``fine + coarse * gate`` in bf16: a video-only plan call returns exactly what
    ``vsa_attention`` returns (the sum in fp32, rounded once), and a call that merges text keys adds the fp32
    ``coarse * gate`` to the merged output before its one rounding (it used to round ``coarse * gate`` to bf16
    first, then the sum again)."""
    import math

    from dit_accel import VSA
    from dit_accel.kernels.merge import merge_attention
    from dit_accel.kernels.vsa import vsa_attention
    from dit_accel.plans.plan import attend_with_lse
    from dit_accel.plans.vsa import gate_scope

    grid, tile, n_text = (4, 8, 12), (2, 4, 4), 7
    n, d = math.prod(grid), 32
    g = torch.Generator().manual_seed(3)
    q, k, v, gate = (torch.randn(1, 2, n + n_text, d, generator=g).bfloat16() for _ in range(4))
    gate = gate[:, :, n_text:]
    plan = VSA(topk=2, tile=tile).plan(grid)
    layer_gate = gate.transpose(1, 2).flatten(2)  # (B, N, heads * D), as to_gate_compress gives it
    video = slice(n_text, None)
    with gate_scope(lambda: layer_gate):
        o, _ = plan.run(q[:, :, video], k[:, :, video], v[:, :, video], backend="torch")
        o_text, _ = plan.run(q, k, v, num_text=n_text, text_first=True, backend="torch")
    expected = vsa_attention(q[:, :, video], k[:, :, video], v[:, :, video], grid, topk=2, tile=tile, gate=gate,
                             backend="torch")
    assert o.dtype == torch.bfloat16 and torch.equal(o, expected)

    parts = plan.attend(q[:, :, video], k[:, :, video], v[:, :, video], scale=None, backend="torch")  # (no gate)
    fine, lse = parts[0], parts[1]
    o_t, lse_t = attend_with_lse(q[:, :, video], k[:, :, :n_text], v[:, :, :n_text], None, d ** -0.5)
    merged, _ = merge_attention(fine, lse, o_t, lse_t)
    with gate_scope(lambda: layer_gate):
        extra = plan.attend(q[:, :, video], k[:, :, video], v[:, :, video], scale=None, backend="torch")[2]
    assert extra.dtype == torch.float32
    assert torch.equal(o_text[:, :, video], (merged + extra).bfloat16())
    assert not torch.equal(o_text[:, :, video], merged + extra.bfloat16())  # (the two roundings differ here)
