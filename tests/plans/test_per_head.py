"""PerHead: each head runs its own method; block-sparse heads share one launch, SLA heads one more.

The oracle per head is masked dense attention with that head's own token mask (its plan's layout,
back in raster order), or the head's own single-method plan for SLA.
"""

import pytest
import torch

import dit_accel
from dit_accel.plans.per_head import PerHead, PerHeadPlan, _raster_mask
from dit_accel.plans.plan import LayoutPlan
from tests.utils import reference

GRID = (4, 12, 12)
TILE = dit_accel.Tile(tile=(4, 4, 4), window=(1, 1, 3))
GNA = dit_accel.GNA(kernel_size=(4, 8, 8), tile=(4, 4, 4))
RADIAL = dit_accel.Radial(block_size=64, decay=0.5, sink_frames=())
SLA = dit_accel.SLA(topk=0.3)


def _qkv(n, heads, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, d, generator=g) for _ in range(3)]


def _head_mask(method, grid):
    plan = method.plan(grid)
    n = plan.num_tokens
    return torch.ones(n, n, dtype=torch.bool) if plan.is_dense else _raster_mask(plan)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_mixed_block_sparse_heads_match_masked_dense_per_head(backend, monkeypatch):
    methods = (TILE, GNA, dit_accel.Dense(), RADIAL, TILE)
    plan = PerHead(methods).plan(GRID)
    assert isinstance(plan, PerHeadPlan) and plan.launches == 1
    q, k, v = _qkv(plan.num_tokens, len(methods))
    calls = []
    import dit_accel.plans.plan as plans_module

    real = plans_module.block_sparse_attention
    monkeypatch.setattr(plans_module, "block_sparse_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        out, density = plan.run(q, k, v, backend=backend)
    mask = torch.stack([_head_mask(m, GRID) for m in methods])
    ref, _ = reference(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(calls) <= 1  # one block-sparse launch (or one masked-dense / one-pass call on CPU)
    assert 0.0 < float(density) < 1.0


def test_sla_and_block_sparse_heads_run_as_two_launches_and_match_each_heads_method():
    methods = (TILE, SLA, dit_accel.Dense(), SLA)
    plan = PerHead(methods).plan(GRID)
    assert [kind for _, _, kind in plan.groups] == ["block_sparse", "sla"]
    q, k, v = _qkv(plan.num_tokens, len(methods), seed=1)
    with torch.no_grad():
        out, _ = plan.run(q, k, v, backend="torch")
        for h, m in enumerate(methods):
            alone, _ = m.plan(GRID).run(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], backend="torch")
            torch.testing.assert_close(out[:, h:h + 1], alone, rtol=1e-4, atol=1e-4)


def test_joint_text_tokens_merge_per_head():
    methods = (TILE, dit_accel.Dense(), GNA)
    plan = PerHead(methods).plan(GRID)
    q, k, v = _qkv(plan.num_tokens + 5, len(methods), seed=2)
    with torch.no_grad():
        out, _ = plan.run(q, k, v, num_text=5, text_first=True, backend="torch")
        for h, m in enumerate(methods):
            alone, _ = m.plan(GRID).run(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], num_text=5, text_first=True,
                                        backend="torch")
            torch.testing.assert_close(out[:, h:h + 1], alone, rtol=1e-4, atol=1e-4)


def test_same_method_on_every_head_is_that_methods_plan():
    plan = PerHead((TILE,) * 3).plan(GRID)
    assert isinstance(plan, LayoutPlan) and plan.method == TILE


def test_per_head_refuses_nested_and_per_head_settings():
    with pytest.raises(TypeError):
        PerHead((PerHead((TILE,)),))
    with pytest.raises(ValueError):
        PerHead((dit_accel.Tile(tile=(4, 4, 4), window=((1, 1, 3), (1, 3, 3))),))
    with pytest.raises(ValueError):
        PerHead(())


def test_a_gated_vsa_head_beside_a_projected_sla_head_keeps_both_extras():
    """Where the caller merges text keys, a gated VSA head's extra (``coarse * gate``) comes in fp32 and a
    projected SLA head's in the model's dtype: the per-head extra holds both, each head's exactly (promoted to fp32,
    so the VSA head's sum is still rounded once)."""
    from dit_accel.plans.vsa import gate_scope

    grid = (4, 8, 8)
    q, k, v, gate = (t.bfloat16() for t in _qkv(256, 2) + _qkv(256, 2, seed=1)[:1])
    proj = torch.nn.Linear(32, 32).bfloat16()
    vsa = dit_accel.VSA(topk=2, tile=(2, 4, 4))
    plan = PerHead((vsa, SLA)).plan(grid)
    layer_gate = gate.transpose(1, 2).flatten(2)
    with gate_scope(lambda: layer_gate), torch.no_grad():
        extra = plan.attend(q, k, v, scale=None, backend="torch", proj=proj)[2]
        vsa_extra = vsa.plan(grid).attend(q[:, :1], k[:, :1], v[:, :1], scale=None, backend="torch",
                                          heads=torch.tensor([0]))[2]
    sla_extra = SLA.plan(grid).attend(q[:, 1:], k[:, 1:], v[:, 1:], scale=None, backend="torch", proj=proj)[2]
    assert extra.dtype == torch.float32 and vsa_extra.dtype == torch.float32 and sla_extra.dtype == torch.bfloat16
    assert torch.equal(extra[:, :1], vsa_extra) and torch.equal(extra[:, 1:], sla_extra.float())
