"""Model families' presets and token layouts, trust round 12: what a user of a family's transformer hits. Tiny
models on the CPU; each test that fixes a fault names what was wrong before. The layout tests hold sparse runs to a
masked-dense reference written here, on the family's own token layout: where the image or video tokens sit (the
test places them, not the preset), which pairs sliding tiles allow (brute force over token coordinates), and which
keys a sample's padding hides."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines.presets import (PRESETS, GridInfo, Preset, Published, published_settings, recommended,
                                         register_preset)


# ------------------------------------------------------------------ the independent reference
def sliding_tile_pairs(grid, tile, window) -> torch.Tensor:
    """Bool ``[N, N]`` over raster-order tokens of ``grid``: key tile within ``w // 2`` tiles of the query tile, the
    window's centre moved inside the grid at its borders (odd windows, extents that are tile multiples)."""
    coords = list(itertools.product(*(range(n) for n in grid)))
    allowed = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, q in enumerate(coords):
        for j, k in enumerate(coords):
            ok = True
            for qd, kd, n, t, w in zip(q, k, grid, tile, window):
                tiles, half = n // t, w // 2
                centre = min(max(qd // t, half), tiles - 1 - half)
                ok &= abs(kd // t - centre) <= half
            allowed[i, j] = ok
    return allowed


class SpanAttention(TorchFunctionMode):
    """While active, every SDPA call of ``length`` tokens (queries and keys) runs fp32 softmax attention in which the
    tokens ``[start, start + N)`` follow ``pairs`` among themselves, every pair with another token is allowed, and
    sample ``b`` sees only the keys ``keys[b]`` (bool ``[B, length]``); with ``alone``, calls of the N image tokens
    alone follow ``pairs`` too (SD3.5's image-only ``attn2``). Other calls pass through."""

    def __init__(self, length, start, pairs, keys, alone=False):
        super().__init__()
        self.length, self.calls, self.pairs, self.alone = length, 0, pairs, alone
        n = pairs.shape[0]
        self.allowed = torch.ones(length, length, dtype=torch.bool)
        self.allowed[start:start + n, start:start + n] = pairs
        self.keys = keys

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key", "value")))
        s = q.shape[2]
        alone = self.alone and s == k.shape[2] == self.pairs.shape[0]
        if not alone and (s != self.length or k.shape[2] != self.length):
            return func(*args, **kwargs)
        self.calls += 1
        keep = self.pairs[None] if alone else self.allowed[None] & self.keys[:, None, :]  # [B, S, S]
        scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~keep[:, None], float("-inf"))
        return (torch.softmax(scores, -1) @ v.float()).to(q.dtype)


def _against_reference(model, kwargs, method, length, start, pairs, keys, layers, alone=False):
    """The sparse run of ``method`` equals :class:`SpanAttention`'s; both differ from the dense run."""
    with torch.no_grad():
        dense = model(**kwargs)[0]
        with SpanAttention(length, start, pairs, keys, alone) as ref_mode:
            ref = model(**kwargs)[0]
        with dit_accel.apply(model, method, backend="torch") as handle:
            out = model(**kwargs)[0]
            rows = handle.stats()
    assert ref_mode.calls == layers
    assert [r["sparse_calls"] for r in rows] == [1] * layers and not any(r["dense_calls"] for r in rows)
    assert not pairs.all()
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3


def _build(class_name, seed=0, **config):
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, class_name)(**config)
        for p in model.parameters():  # zero-initialised output layers would hide the attention
            if p.abs().sum() == 0:
                p.data.normal_(0, 0.05)
    return model.eval()


# ------------------------------------------------------------------ layouts against the reference
def test_flux_kontext_batch_of_two_with_a_reference_of_another_size():
    """FluxKontextPipeline, two images per prompt: [text, image, reference image] per sample, the reference (4x5,
    ids at index 1) smaller than the generated image (6x8). Tiles of 2x2 tokens, 3 tile rows by 1 tile column."""
    model = T.build_tiny_transformer("flux")
    grid, text = (6, 8), T.TRANSFORMER_TEXT["flux"]
    kwargs = T.tiny_transformer_inputs("flux", model, grid=grid, batch=2)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    ref_ids = torch.stack([torch.ones_like(rows), rows, cols], -1).reshape(-1, 3).float()
    ref = torch.randn(2, 20, model.config.in_channels, generator=torch.Generator().manual_seed(3))
    kwargs.update(img_ids=torch.cat([kwargs["img_ids"], ref_ids]),
                  hidden_states=torch.cat([kwargs["hidden_states"], ref], 1))
    length = text + 48 + 20
    method = dit_accel.Tile(tile=(2, 2), window=(3, 1))
    _against_reference(model, kwargs, method, length, text, sliding_tile_pairs(grid, (2, 2), (3, 1)),
                       torch.ones(2, length, dtype=torch.bool), layers=2)


def test_hunyuan_video_i2v_token_replace_batch_of_two_prompts_of_other_lengths():
    """HunyuanVideo I2V (``image_condition_type="token_replace"``: the first frame's tokens are the image, in the
    grid) with a batch of two prompts, the second padded after 3 of 6 tokens: [video, text], padded keys hidden."""
    model = _build("HunyuanVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
                   attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                   patch_size_t=1, guidance_embeds=False, text_embed_dim=16, pooled_projection_dim=8,
                   rope_axes_dim=(4, 6, 6), image_condition_type="token_replace")
    grid, text = (3, 4, 6), 6
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(2, text, dtype=torch.long)
    mask[1, 3:] = 0
    kwargs = dict(hidden_states=torch.randn(2, 4, 3, 8, 12, generator=g), timestep=torch.full((2,), 500.0),
                  encoder_hidden_states=torch.randn(2, text, 16, generator=g), encoder_attention_mask=mask,
                  pooled_projections=torch.randn(2, 8, generator=g), return_dict=False)
    keys = torch.ones(2, 72 + text, dtype=torch.bool)
    keys[1, 72 + 3:] = False
    method = dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 3))
    _against_reference(model, kwargs, method, 72 + text, 0, sliding_tile_pairs(grid, (1, 2, 2), (1, 1, 3)), keys,
                       layers=2)


def test_cogvideox_15_i2v_two_frame_patch_with_the_image_in_channels():
    """CogVideoX 1.5 image-to-video: the image latent concatenated in channels (not tokens), a temporal patch of 2
    latent frames, rotary positions: [text, video] over a (3, 4, 6) grid from 6 latent frames."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    model = _build("CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=8,
                   out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=12,
                   sample_height=8, sample_frames=21, patch_size=2, patch_size_t=2, temporal_compression_ratio=4,
                   max_text_seq_length=8, use_rotary_positional_embeddings=True, ofs_embed_dim=8)
    grid, text = (3, 4, 6), 8
    g = torch.Generator().manual_seed(4)
    rope = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (4, 6)), grid_size=(4, 6), temporal_size=3,
                                   grid_type="slice", max_size=(4, 6))
    kwargs = dict(hidden_states=torch.randn(2, 6, 8, 8, 12, generator=g), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(2, text, 16, generator=g), image_rotary_emb=rope,
                  ofs=torch.full((2,), 2.0), return_dict=False)
    method = dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 3))
    _against_reference(model, kwargs, method, text + 72, text, sliding_tile_pairs(grid, (1, 2, 2), (1, 1, 3)),
                       torch.ones(2, text + 72, dtype=torch.bool), layers=2)


def test_sd35_cfg_batch_non_square_image_first_and_its_image_only_attention():
    """StableDiffusion3Pipeline with guidance: [unconditional, conditional] in one batch of 2, prompts padded to one
    length (no mask), a 4x6 latent grid: [image, text] in the joint blocks, the image alone in SD3.5's dual attention
    (``attn2``). Tiles of 2x2 tokens, each query sees its own tile."""
    model = T.build_tiny_transformer("sd3")
    grid, text = (4, 6), T.TRANSFORMER_TEXT["sd3"]
    kwargs = T.tiny_transformer_inputs("sd3", model, grid=grid, batch=2)
    method = dit_accel.Tile(tile=(2, 2), window=(1, 1))
    _against_reference(model, kwargs, method, 24 + text, 0, sliding_tile_pairs(grid, (2, 2), (1, 1)),
                       torch.ones(2, 24 + text, dtype=torch.bool), layers=3, alone=True)


# ------------------------------------------------------------------ faults fixed
def _grid_111(model, args):
    return GridInfo((1, 1, 1), 0)


def _preset(**fields):
    return Preset("MyRound12Transformer3DModel", attention=(r"blocks\.\d+\.attn1",), text_position="none",
                  read_grid=_grid_111, min_diffusers="0.35.0", grid_dims=3, **fields)


@pytest.mark.parametrize("fields, problem", [
    (dict(defaults={"tlie": {"method": {"tile": (1, 8, 8)}, "apply": {}}}),
     r"defaults\['tlie'\] is invalid \(method='tlie' is not a registered method"),
    (dict(defaults={"sta": {"method": {"tile": (1, 8, 8)}, "apply": {}}}), r"defaults\['sta'\] is invalid \(an alias"),
    (dict(defaults={"tile": {"method": {"tyle": (1, 8, 8)}, "apply": {}}}),
     r"Tile has no option 'tyle'; valid options: tile, window, block_size, fit"),
    (dict(defaults={"tile": {"tile": (1, 8, 8)}}), r"expected \{'method': \{config fields\}, 'apply'"),
    (dict(defaults={"tile": {"method": {}, "apply": {"dense_stepz": 3}}}),
     r"apply keywords \['dense_stepz'\]; allowed: dense_steps, dense_last_steps"),
    (dict(defaults={"tile": {"method": {"tile": (8, 8), "window": (3, 3)}, "apply": {}}}),
     r"Tile's tile=\(8, 8\) is for a 2-D token grid, but the sparse calls of MyRound12Transformer3DModel see a "
     r"video's"),
    (dict(refused_methods={"radail": "a rule over frames"}), r"refused_methods\['radail'\] is invalid"),
    (dict(refused_methods={"radial": ""}), r"refused_methods\['radial'\]='' is invalid \(the reason"),
    (dict(published=(Published("Mine 1", "radail", {}, {}, "", (4, 8, 8), ""),)),
     r"published\[0\] \(Mine 1, 'radail'\) is invalid \(method='radail' is not a registered method"),
    (dict(published=(Published("Mine 1", "sta", {}, {}, "", (4, 8, 8), ""),)), r"'sta' is an alias"),
    (dict(published=(Published("Mine 1", "radial", {"decay": 2.0}, {}, "", (4, 8, 8), ""),)),
     r"published\[0\] \(Mine 1, 'radial'\) is invalid \(.*decay"),
    (dict(published=(Published("Mine 1", "radial", {}, {"dense_step": 3}, "", (4, 8, 8), ""),)),
     r"apply keywords \['dense_step'\]"),
    (dict(published=(Published("", "radial", {}, {}, "", (4, 8, 8), ""),)), r"published\[0\].family='' is invalid"),
    (dict(published=({"family": "Mine 1", "method": "radial"},)), r"a tuple of dit_accel.pipelines.presets.Published"),
])
def test_register_preset_refuses_settings_it_would_never_use(fields, problem):
    """Before: ``register_preset`` stored any ``defaults``/``refused_methods``/``published``. A misspelt method name
    was never looked up: ``recommended(model, "tile")`` quietly gave Tile's own (6, 8, 8) tiles instead of the
    preset's, a published setting was never found, and a method the preset meant to refuse ran. A malformed entry
    failed every later ``recommended`` with a bare
    ``KeyError: 'apply'`` or ``TypeError: Tile.__init__() got an unexpected keyword argument``. Now register_preset
    names the class, the entry and what is allowed, and the registry is left as it was."""
    before = dict(PRESETS)
    try:
        with pytest.raises(ValueError, match=problem) as err:
            register_preset(_preset(**fields))
        assert str(err.value).startswith("Preset 'MyRound12Transformer3DModel': ") and "\n" not in str(err.value)
    finally:
        leaked = [k for k in PRESETS if k not in before]
        for k in leaked:
            PRESETS.pop(k)
    assert not leaked


def test_register_preset_keeps_well_formed_defaults_and_recommended_uses_them():
    preset = _preset(defaults={"tile": {"method": {"tile": (1, 8, 8), "window": (3, 1, 1)}, "apply": {"dense_steps": 2}}},
                     refused_methods={"radial": "no time axis worth a rule"},
                     published=(Published("Mine 1", "gna", {"kernel_size": (3, 5, 5)}, {"dense_steps": 4}, "", (4, 8, 8),
                                          "my paper"),))
    try:
        register_preset(preset)
        config, kwargs = recommended("MyRound12Transformer3DModel", "tile")
        assert (config.tile, config.window, kwargs) == ((1, 8, 8), (3, 1, 1), {"dense_steps": 2})
        with pytest.raises(ValueError, match="no time axis worth a rule"):
            recommended("MyRound12Transformer3DModel", "radial")
        config, kwargs = recommended("MyRound12Transformer3DModel", "gna")
        assert (config.kernel_size, kwargs) == ((3, 5, 5), {"dense_steps": 4})
    finally:
        PRESETS.pop("MyRound12Transformer3DModel", None)


def test_the_apply_keywords_a_preset_default_may_carry_are_applys():
    import inspect

    from dit_accel.pipelines.presets import SETTING_APPLY_KEYS

    assert set(SETTING_APPLY_KEYS) <= set(inspect.signature(dit_accel.apply).parameters)
    assert {k for p in PRESETS.values() for e in p.defaults.values() for k in e["apply"]} <= set(SETTING_APPLY_KEYS)


def test_the_shipped_presets_pass_the_check_register_preset_makes():
    """The shipped presets are registered without ``register_preset``: their defaults and refused methods meet its
    check too (a misspelt method there would be as silent)."""
    from dit_accel.pipelines.presets import _check_settings

    for preset in PRESETS.values():
        _check_settings(preset)


def test_recommended_of_a_wan_22_pipeline_is_wan_22s_published_setting():
    """Before: ``recommended(pipe, "radial")`` (``family_of(pipe)`` takes a pipeline) said "no preset for WanPipeline;
    supported: <every transformer class>", though its transformer is supported; and the transformer alone reads
    as Wan 2.1, so the way the message pointed to gave Wan 2.1's setting (decay 0.2, 128-token blocks) for Wan 2.2
    A14B (published: decay 0.8, 64-token blocks). Now a pipeline reads as its transformer, with the pipeline's
    family: Wan 2.2's setting, the one ``dit-accel generate`` uses."""
    import diffusers

    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                 transformer=T.build_tiny_transformer("wan"),
                                 transformer_2=T.build_tiny_transformer("wan", seed=1), boundary_ratio=0.875)
    config, kwargs = recommended(pipe, "radial")
    assert (config.decay, config.block_size, kwargs) == (0.8, 64, {"dense_steps": 11, "dense_layers": 1})
    assert [p.family for p in published_settings(pipe, "radial")] == ["Wan 2.2"]
    assert recommended(pipe, "tile") == recommended(pipe.transformer, "tile")
    one = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                transformer=pipe.transformer)
    assert recommended(one, "radial") == recommended(pipe.transformer, "radial") != recommended(pipe, "radial")


@pytest.mark.parametrize("call, problem", [
    (dict(text=0), r"text=0 is invalid: the number of text tokens, a positive int \(None: 6\)"),
    (dict(text=-2), r"text=-2 is invalid"),
    (dict(batch=0), r"batch=0 is invalid: the number of samples, a positive int"),
    (dict(batch=-1), r"batch=-1 is invalid"),
    (dict(batch=2.0), r"batch=2.0 is invalid"),
    (dict(text_valid=[9]), r"text_valid=\[9\] is invalid: one valid text length per sample \(1\), each from 1 to the "
                           r"text tokens \(6\)"),
    (dict(text_valid=[-1]), r"text_valid=\[-1\] is invalid"),
    (dict(text_valid=[0]), r"text_valid=\[0\] is invalid"),
    (dict(text_valid=4), r"text_valid=4 is invalid"),
    (dict(text=4, text_valid=[5]), r"text_valid=\[5\] is invalid: .* each from 1 to the text tokens \(4\)"),
    (dict(seed="1"), r"seed='1' is invalid: the random seed, an int"),
])
def test_tiny_transformer_inputs_refuses_sizes_it_would_not_honour(call, problem):
    """Before: ``tiny_transformer_inputs("hunyuan", model, text=0)`` gave the default 6 text tokens, ``batch=0`` an
    empty call, ``text_valid=[9]`` (of 6 tokens) a mask with every token valid and ``[-1]`` one with 5 valid (Python
    slicing), all without a word; a negative size or a float was a bare RuntimeError or TypeError from torch. Now
    one ValueError names the argument and what is allowed."""
    model = T.build_tiny_transformer("hunyuan")
    with pytest.raises(ValueError, match=problem):
        T.tiny_transformer_inputs("hunyuan", model, **call)
    kwargs = T.tiny_transformer_inputs("hunyuan", model, batch=2, text=4, text_valid=[4, 1])
    assert kwargs["encoder_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_build_tiny_transformer_names_a_seed_that_is_no_int():
    """Before: ``build_tiny_transformer("wan", seed="x")`` failed inside torch with "invalid literal for int() with
    base 10: 'x'", which names neither the argument nor the function."""
    with pytest.raises(ValueError, match=r"seed='x' is invalid: the random seed, an int"):
        T.build_tiny_transformer("wan", seed="x")
