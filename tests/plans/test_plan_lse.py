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
