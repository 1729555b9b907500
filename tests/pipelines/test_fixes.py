"""Issue 38, item 1: SLA on attention modules without ``to_q`` (Kandinsky 5 / 6), Motif-Video's decoder
layers, and ``recommended()`` / ``at_density`` settings that fit the grid of the call.

SLA's reference is :mod:`tests.kernels.sla_reference` (written from METHODS.md, independent of the
package): block classes by a brute-force loop, then the dense oracle under the expanded token mask."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines.apply import _projection_dim
from tests.kernels.sla_reference import brute_force_classes, reference_sla
from tests.utils import first_output as _run


class SLAReference(TorchFunctionMode):
    """Self-attention SDPA calls over exactly ``num_video`` tokens (video first, then ``extra`` dense tokens:
    Kandinsky 6's appended reference frame) run the independent SLA reference on the video-video part;
    every pair involving an extra token is exact (dense), merged by log-sum-exp."""

    def __init__(self, method, num_video):
        super().__init__()
        self.method, self.num_video, self.calls = method, num_video, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(("query", "key", "value"), args), **kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        n = self.num_video
        if q.shape[2] != k.shape[2] or q.shape[2] < n:
            return func(*args, **kwargs)
        self.calls += 1
        scale = call.get("scale") or q.shape[-1] ** -0.5
        qv, kv, vv = q[:, :, :n], k[:, :, :n], v[:, :, :n]
        classes = brute_force_classes(qv, kv, self.method)
        o, _, lse, _ = reference_sla(qv, kv, vv, classes, self.method, scale=scale)
        if q.shape[2] == n:
            return o.to(q.dtype)
        # video queries: merge with the extra keys (exact); extra queries: dense over everything
        s_extra = (qv.float() @ k[:, :, n:].float().transpose(-1, -2)) * scale
        lse_extra = torch.logsumexp(s_extra, -1)
        o_extra = torch.softmax(s_extra, -1) @ v[:, :, n:].float()
        total = torch.logaddexp(lse, lse_extra)
        o = o * (lse - total).exp()[..., None] + o_extra * (lse_extra - total).exp()[..., None]
        o_rest = F.scaled_dot_product_attention(q[:, :, n:].float(), k.float(), v.float(), scale=scale)
        return torch.cat([o, o_rest], 2).to(q.dtype)


# ------------------------------------------------------------------ (a) SLA without to_q
@pytest.mark.parametrize("name", ["kandinsky5", "kandinsky6"])
def test_sla_on_kandinsky_matches_the_reference(name):
    model = T.build_tiny_transformer(name)
    attn = next(m for n, m in model.named_modules() if n.endswith("self_attention"))
    assert not hasattr(attn, "to_q") and _projection_dim(attn) == attn.to_query.out_features // attn.num_heads
    kwargs = T.tiny_transformer_inputs(name, model, batch=2)
    grid = T.TRANSFORMER_GRIDS[name]
    n = grid[0] * grid[1] * grid[2]
    dense = _run(model, kwargs)
    method = dit_accel.SLA(topk=0.5)
    with SLAReference(method, n) as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
        projections = handle.sla_projections()
    assert ref_mode.calls == len(rows) and len(projections) == len(rows)
    assert all(p.weight.shape == (attn.to_query.out_features // attn.num_heads,) * 2 for p in projections.values())
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 and r["density"] < 1 for r in rows)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert torch.equal(_run(model, kwargs), dense)


def test_sla_refuses_a_module_whose_projection_it_cannot_size_and_leaves_the_model():
    model = T.build_tiny_transformer("kandinsky5")
    kwargs = T.tiny_transformer_inputs("kandinsky5", model)
    dense = _run(model, kwargs)
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    for m in model.modules():
        if type(m).__name__ == "Kandinsky5Attention":
            m.to_q_renamed = m.to_query
            del m.to_query
    try:
        with pytest.raises(ValueError, match="SLA cannot size its projection for Kandinsky5Attention"):
            dit_accel.apply(model, dit_accel.SLA(topk=0.5))
        assert processors == {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    finally:
        for m in model.modules():
            if type(m).__name__ == "Kandinsky5Attention":
                m.to_query = m.to_q_renamed
                del m.to_q_renamed
    assert torch.equal(_run(model, kwargs), dense)


# ------------------------------------------------------------------ (b) Motif-Video decoder layers
def test_motif_decoder_layers_are_sparse_over_video_with_the_encoder_output_exact():
    import diffusers

    from dit_accel.patterns import gna_mask
    from tests.utils import ReferenceAttention

    entry = T.TRANSFORMERS["motif"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = diffusers.MotifVideoTransformer3DModel(**dict(entry.config, num_single_layers=2,
                                                              num_decoder_layers=1)).eval()
    kwargs = T.tiny_transformer_inputs("motif", model, batch=2, text_valid=[entry.text, 3])
    grid = entry.grid
    n = grid[0] * grid[1] * grid[2]
    lengths = []
    hook = model.single_transformer_blocks[-1].attn.register_forward_pre_hook(
        lambda m, a, kw: lengths.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True)
    method = dit_accel.GNA(kernel_size=(2, 5, 5))
    try:
        dense = _run(model, kwargs)
        with ReferenceAttention(gna_mask(grid, method.kernel_size), "last") as ref_mode:
            ref = _run(model, kwargs)
    finally:
        hook.remove()
    assert lengths == [n, n]  # the decoder block's text slot holds the encoder output, as long as the video
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == len(rows) == 3 and not handle.warnings
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3


# ------------------------------------------------------------------ (c) settings that fit the grid of the call
def _check_recommended(model, kwargs, grid, reference_pattern, position="none"):
    """recommended('gna') on ``model`` at ``grid`` runs (clamped, with a note) and matches the masked reference."""
    from dit_accel.pipelines.presets import recommended
    from tests.utils import ReferenceAttention

    method, _ = recommended(model, "gna")
    assert method.fit
    dense = _run(model, kwargs)
    with ReferenceAttention(reference_pattern, position) as ref_mode:
        ref = _run(model, kwargs)
    with pytest.warns(dit_accel.DitAccelWarning, match="exceeds the grid extent.*clamped"):
        with dit_accel.apply(model, method, backend="torch") as handle:  # (no dense_steps: one bare call)
            out = _run(model, kwargs)
            rows = handle.stats()
    assert ref_mode.calls == len(rows)
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3


def test_chronoedit_recommended_gna_fits_its_two_latent_frames():
    from dit_accel.patterns import gna_mask

    model = T.build_tiny_transformer("chronoedit")
    grid = (2, 20, 20)  # ChronoEdit's default: the input image and the edit, 2 latent frames
    kwargs = T.tiny_transformer_inputs("chronoedit", model, grid=grid)
    with pytest.raises(ValueError, match="exceeds the grid extent 2"):  # the published window as it is
        dit_accel.GNA(kernel_size=(7, 16, 16)).plan(grid)
    _check_recommended(model, kwargs, grid, gna_mask(grid, (2, 16, 16)))


def test_cosmos_recommended_gna_fits_one_frame_text_to_image():
    import diffusers

    from dit_accel.patterns import gna_mask

    entry = T.TRANSFORMERS["cosmos"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = diffusers.CosmosTransformer3DModel(**dict(entry.config, max_size=(4, 64, 64))).eval()
    grid = (1, 26, 26)  # text-to-image: one latent frame
    kwargs = T.tiny_transformer_inputs("cosmos", model, grid=grid)
    pattern = gna_mask(grid[1:], (24, 24))  # one frame: the 2-D window is the whole pattern
    _check_recommended(model, kwargs, grid, pattern)


def test_gna_at_density_fits_a_one_frame_grid():
    grid = (1, 16, 16)
    method = dit_accel.GNA().at_density(grid, 0.3)
    with pytest.warns(dit_accel.DitAccelWarning, match="clamped"):
        plan = method.plan(grid)
    assert not plan.is_dense and 0.1 < plan.token_density < 0.6


def test_latte_recommended_never_returns_a_method_latte_refuses():
    from dit_accel.pipelines.presets import recommended

    model = T.build_tiny_transformer("latte")
    with pytest.raises(ValueError, match="'radial' does not apply to LatteTransformer3DModel: Radial is a rule"):
        recommended(model, "radial")
    with pytest.raises(ValueError, match="'radial' does not apply to LatteTransformer3DModel"):
        dit_accel.apply(model, dit_accel.Radial())
    assert not any(type(getattr(m, "processor", None)).__name__ == "SparseAttnProcessor" for m in model.modules())
    kwargs = T.tiny_transformer_inputs("latte", model, grid=(32, 32))  # Latte 512x512: 32x32 tokens
    for name in ("gna", "tile", "sla"):
        method, _ = recommended(model, name)
        with dit_accel.apply(model, method, backend="torch") as handle:
            out = _run(model, kwargs)
            assert torch.isfinite(out).all()
            assert all(r["dense_calls"] == 0 and r["sparse_calls"] >= 1 for r in handle.stats()), name
