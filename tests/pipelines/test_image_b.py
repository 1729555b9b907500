"""The image families of models-image-b (issue 28) beyond the generic tests: Tile and SLA, Qwen-Image 2.1's
KV-cached calls, HiDream's square and pre-patched inputs, and the call modes each preset refuses.

References are ``tests.utils.ReferenceAttention`` on the unmodified model (independent of dit_accel's path)."""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask, tile_mask
from dit_accel.pipelines.presets import PRESETS
from tests.utils import ReferenceAttention


@pytest.fixture(scope="module")
def models():
    return {name: T.build_tiny_transformer(name) for name in ("qwenimage21", "zimage", "hidream", "lumina2", "flux3")}


def _run(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs)[0]
    return torch.stack(out) if isinstance(out, list) else out


def _check_against(model, name, method, pattern, kwargs, calls=1):
    """``method`` on ``model`` matches the masked reference and differs from dense; returns the handle's rows."""
    dense = _run(model, kwargs)
    with ReferenceAttention(pattern, PRESETS[type(model).__name__].text_position,
                            text_only=getattr(model, "context_refiner", ())) as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == calls * len(rows)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert all(r["sparse_calls"] == calls and r["dense_calls"] == 0 for r in rows)
    return rows


@pytest.mark.parametrize("name", ["qwenimage21", "zimage"])
def test_tile_matches_the_masked_reference(models, name):
    grid = T.TRANSFORMER_GRIDS[name]
    method = dit_accel.Tile(tile=(4, 4), window=(1, 3))
    pattern = tile_mask(grid, method.tile, method.window)
    assert not pattern.all()
    kwargs = T.tiny_transformer_inputs(name, models[name], batch=2, text_valid=[T.TRANSFORMER_TEXT[name], 3])
    _check_against(models[name], name, method, pattern, kwargs)


def test_sla_on_qwenimage21_target_call(models):
    """SLA through the image-queries call: every block kept reproduces dense; a small top-k is sparse (density
    below 1, another result) and finite."""
    model = models["qwenimage21"]
    kwargs = T.tiny_transformer_inputs("qwenimage21", model, batch=2, text_valid=[7, 3])
    dense = _run(model, kwargs)
    with dit_accel.apply(model, dit_accel.SLA(topk=1.0), backend="torch") as handle:
        full = _run(model, kwargs)
        assert handle.summary()["sparse_calls"] == handle.summary()["layers"]
    torch.testing.assert_close(full, dense, atol=1e-5, rtol=1e-5)
    with dit_accel.apply(model, dit_accel.SLA(topk=0.3), backend="torch") as handle:
        sparse = _run(model, kwargs)
        rows = handle.stats()
    assert torch.isfinite(sparse).all() and (sparse - dense).abs().max() > 1e-3
    assert all(r["sparse_calls"] == 1 and r["density"] < 1 for r in rows)


def test_qwenimage21_kv_cached_steps_match_the_reference(models):
    """The pipeline's KV cache: the first step prefills the prompt ("extract"), later steps run only the target's
    queries against the cached prefix ("cached"); both are sparse among the target's tokens."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    model = models["qwenimage21"]
    method = dit_accel.GNA(kernel_size=(3, 5))
    grid = T.TRANSFORMER_GRIDS["qwenimage21"]
    base = T.tiny_transformer_inputs("qwenimage21", model, batch=2, text_valid=[7, 3])

    def steps(ctx):
        cache, outs = QwenImage21KVCache(len(model.transformer_blocks)), []
        for mode in ("extract", "cached"):
            with ctx():
                outs.append(_run(model, dict(base, kv_cache=cache, kv_cache_mode=mode)))
        return outs

    with ReferenceAttention(gna_mask(grid, method.kernel_size), "first") as ref_mode:
        ref = steps(lambda: torch.no_grad())
    assert ref_mode.calls == 2 * len(model.transformer_blocks)
    handle = dit_accel.apply(model, method, backend="torch")
    try:
        got = steps(lambda: torch.no_grad())
        assert handle.summary()["sparse_calls"] == 2 * handle.summary()["layers"]
        assert handle.summary()["dense_calls"] == 0
    finally:
        handle.remove()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_hidream_square_latents_have_no_pad_and_prepatched_latents_work(models):
    model = models["hidream"]
    method = dit_accel.GNA(kernel_size=(3, 5))
    square = T.tiny_transformer_inputs("hidream", model, grid=(10, 10), batch=2)
    _check_against(model, "hidream", method, gna_mask((10, 10), method.kernel_size), square)
    info = PRESETS["HiDreamImageTransformer2DModel"].read_grid(model, square)
    assert info.grid == (10, 10) and info.num_text == 7 + 2 * 7  # T5 + two Llama layers, no pad

    # Pre-patched (B, max_seq, C * p * p) latents with their mask, as the model patches them itself.
    kwargs = T.tiny_transformer_inputs("hidream", model, grid=(10, 13), batch=2)
    x, masks, sizes, ids = model.patchify(kwargs["hidden_states"])
    prepatched = dict(kwargs, hidden_states=x, hidden_states_masks=masks, img_sizes=sizes, img_ids=ids)
    info = PRESETS["HiDreamImageTransformer2DModel"].read_grid(model, prepatched)
    assert info.grid == (10, 13) and info.num_text == x.shape[1] - 130 + 21
    _check_against(model, "hidream", method, gna_mask((10, 13), method.kernel_size), prepatched)
    bad = masks.clone()
    bad[1, 0] = 0
    with dit_accel.apply(model, method, backend="torch"):
        with pytest.raises(ValueError, match="hidden_states_masks .* do not mark the 10x13 image tokens"):
            _run(model, dict(prepatched, hidden_states_masks=bad))
        sizes2 = sizes.clone()
        sizes2[1] = torch.tensor([13, 10])
        with pytest.raises(ValueError, match=r"packs latents of sizes \[\(10, 13\), \(13, 10\)\]"):
            _run(model, dict(prepatched, img_sizes=sizes2))


def test_refused_call_modes_say_what_works(models):
    lumina = models["lumina2"]
    with dit_accel.apply(lumina, dit_accel.GNA(kernel_size=(3, 5)), backend="torch"):
        with pytest.raises(ValueError, match=r"prompts of different valid lengths \[7, 3\].*one prompt per call"):
            _run(lumina, T.tiny_transformer_inputs("lumina2", lumina, batch=2, text_valid=[7, 3]))
        _run(lumina, T.tiny_transformer_inputs("lumina2", lumina, batch=2, text_valid=[3, 3]))

    zimage = models["zimage"]
    kwargs = T.tiny_transformer_inputs("zimage", zimage, batch=2)
    with dit_accel.apply(zimage, dit_accel.GNA(kernel_size=(3, 5)), backend="torch"):
        mixed = dict(kwargs, x=[kwargs["x"][0], torch.randn(4, 1, 20, 20)])
        with pytest.raises(ValueError, match="one .C, F, H, W. latent size for the whole batch"):
            _run(zimage, mixed)
        with pytest.raises(ValueError, match="Z-Image Omni call"):
            _run(zimage, dict(kwargs, x=[[x] for x in kwargs["x"]]))


def test_qwenimage21_flex_processor_is_refused(models):
    from diffusers.models.transformers.transformer_qwenimage21 import (
        QwenImage21AttnProcessor,
        QwenImage21FlexAttnProcessor,
    )

    model = T.build_tiny_transformer("qwenimage21")
    model.set_attn_processor(QwenImage21FlexAttnProcessor())
    kwargs = T.tiny_transformer_inputs("qwenimage21", model)
    with dit_accel.apply(model, dit_accel.GNA(kernel_size=(3, 5)), backend="torch"):
        with pytest.raises(ValueError, match=r"QwenImage21FlexAttnProcessor.*set QwenImage21AttnProcessor"):
            _run(model, kwargs)
    model.set_attn_processor(QwenImage21AttnProcessor())
    with dit_accel.apply(model, dit_accel.GNA(kernel_size=(3, 5)), backend="torch") as handle:
        _run(model, kwargs)
        assert handle.summary()["sparse_calls"] == handle.summary()["layers"]


@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "text-last"])
def test_plan_run_of_the_image_queries_alone_is_the_image_rows_of_the_joint_run(text_first):
    grid, num_text = (6, 7), 5
    plan = dit_accel.GNA(kernel_size=(3, 3)).plan(grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 42 + num_text, 16, generator=g) for _ in range(3))
    key_mask = torch.ones(2, 1, 1, 42 + num_text, dtype=torch.bool)
    key_mask[1, ..., (slice(2, 5) if text_first else slice(44, 47))] = False  # padded text keys of sample 1
    full, density = plan.run(q, k, v, num_text=num_text, text_first=text_first, key_mask=key_mask, backend="torch")
    image = slice(num_text, None) if text_first else slice(0, 42)
    alone, density_alone = plan.run(q[:, :, image], k, v, num_text=num_text, text_first=text_first,
                                    key_mask=key_mask, backend="torch", text_queries=False)
    assert alone.shape == (2, 2, 42, 16) and density_alone == density
    torch.testing.assert_close(alone, full[:, :, image], atol=1e-6, rtol=1e-6)
