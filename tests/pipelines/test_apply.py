"""dit_accel.apply on tiny random transformers of every supported class (CPU, fp32).

The reference for a sparse run is independent of dit_accel's path:
``tests.utils.ReferenceAttention`` catches every SDPA call of the *unmodified*
model and replaces it with the fp32 dense oracle under a token mask in which
video-video pairs follow the pattern's raster mask (``gna_mask``/``tile_mask``/
``radial_mask``), every pair involving a text token is allowed, and padded text
keys are excluded.
"""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask
from dit_accel.pipelines.hooks import SparseAttnProcessor
from dit_accel.pipelines.presets import PRESETS, SUPPORTED, preset_for
from tests.utils import ReferenceAttention, method_mask

SPARSE = {name: dit_accel.GNA(kernel_size=(3, 5) if len(T.TRANSFORMER_GRIDS[name]) == 2 else (2, 5, 5))
          for name in T.TRANSFORMER_NAMES}
PADDED = {"hunyuan", "mochi"}  # models whose text padding mask the test exercises
PADDED |= {"motif"}  # models-video-b
PADDED |= {"qwenimage", "hunyuanimage"}  # image families with a text padding mask
PADDED |= {"hunyuan15"}  # models-video-c
PADDED |= {"qwenimage21", "zimage"}  # models-image-b
PADDED |= {"chroma"}  # an additive (float) square text mask
PADDED |= {"bria_fibo", "krea2", "joyimage_plus", "ernie_image"}  # Diffusers 0.42.1 classes: a bool text key mask
PADDED |= {"nucleusmoe_image", "prx"}  # the image's queries against keys with a bool text key mask
PADDED |= {"bria_fibo2"}  # its text mask sets the gist counts (7 and 3 text tokens: 8 gist tokens each)


def _inputs(name, model, batch=2, grid=None):
    valid = [T.TRANSFORMER_TEXT[name], 3] if name in PADDED and batch == 2 else None
    return T.tiny_transformer_inputs(name, model, grid=grid, batch=batch, text_valid=valid)


@pytest.fixture(scope="module")
def models():
    return {name: T.build_tiny_transformer(name) for name in T.TRANSFORMER_NAMES}


def _run(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs)[0]
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image: a list of per-sample latents


def _clean(model):
    assert not any(isinstance(getattr(m, "processor", None), SparseAttnProcessor) for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs
    assert not any(n.endswith("dit_accel_sla_proj") for n, _ in model.named_modules())


@pytest.mark.parametrize("name", T.TRANSFORMER_NAMES)
def test_dense_and_full_window_reproduce_dense(models, name):
    model = models[name]
    kwargs = _inputs(name, model)
    ref = _run(model, kwargs)
    grid = T.TRANSFORMER_GRIDS[name]
    for method in (dit_accel.Dense(), dit_accel.GNA(kernel_size=grid)):
        with dit_accel.apply(model, method, backend="torch") as handle:
            out = _run(model, kwargs)
            rows = handle.stats()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert all(r["sparse_calls"] == 0 and r["dense_calls"] > 0 and r["density"] is None for r in rows)
    _clean(model)


@pytest.mark.parametrize("name", T.TRANSFORMER_NAMES)
def test_sparse_matches_masked_reference_and_remove_restores(models, name):
    model = models[name]
    kwargs = _inputs(name, model)
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    dense = _run(model, kwargs)
    method, grid = SPARSE[name], T.TRANSFORMER_GRIDS[name]
    with ReferenceAttention(gna_mask(grid, method.kernel_size), PRESETS[type(model).__name__].text_position,
                            text_only=getattr(model, "context_refiner", ())) as ref_mode:
        ref = _run(model, kwargs)
    handle = dit_accel.apply(model, method, backend="torch")
    out = _run(model, kwargs)
    assert ref_mode.calls == len(handle.layers) * (2 if name == "mochi" else 1)  # Mochi: one SDPA per sample
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    from dit_accel.patterns import gna_layout

    expected = gna_layout(grid, method.kernel_size)[1].density()
    for row in handle.stats():
        assert row["method"] == "gna" and row["dense_calls"] == 0 and row["sparse_calls"] >= 1
        assert row["density"] == pytest.approx(expected)
    handle.remove()
    assert torch.equal(_run(model, kwargs), dense)
    assert processors == {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(processors[n] is m.processor for n, m in model.named_modules() if hasattr(m, "processor"))
    _clean(model)


@pytest.mark.parametrize("method", [
    pytest.param(dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), id="tile-1x8x8-w3x1x1"),
    pytest.param(dit_accel.Radial(block_size=64, decay=1.0, sink_frames=()), id="radial-b64"),
])
def test_tile_and_radial_match_reference_on_wan(models, method):
    model, grid = models["wan"], (7, 8, 8)  # 7 frames: radial drops far frame pairs
    kwargs = _inputs("wan", model, batch=1, grid=grid)
    pattern = method_mask(method, grid)
    assert not pattern.all()
    with ReferenceAttention(pattern, "none"):
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        plan, rows = handle.plan(method, grid), handle.stats()
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert rows[0]["density"] == pytest.approx(plan.layout.density()) and plan.layout.density() < 1


def test_resolution_change_rebuilds_layout(models):
    model, method = models["wan"], dit_accel.GNA(kernel_size=(2, 3, 3))
    handle = dit_accel.apply(model, method, backend="torch")
    try:
        for grid in ((4, 8, 8), (3, 6, 10)):
            kwargs = _inputs("wan", model, batch=1, grid=grid)
            out = _run(model, kwargs)
            handle.remove()
            with ReferenceAttention(gna_mask(grid, method.kernel_size), "none"):
                ref = _run(model, kwargs)
            handle = dit_accel.apply(model, method, backend="torch")
            torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
        _run(model, _inputs("wan", model, batch=1, grid=(4, 8, 8)))
        _run(model, _inputs("wan", model, batch=1, grid=(3, 6, 10)))
        assert {key[1] for key in handle.plans} == {(4, 8, 8), (3, 6, 10)}
    finally:
        handle.remove()


def test_two_handles_do_not_interfere_and_apply_twice_replaces(models):
    a, b = T.build_tiny_transformer("wan", seed=0), T.build_tiny_transformer("wan", seed=0)
    kwargs = _inputs("wan", a, batch=1)
    m1, m2 = dit_accel.GNA(kernel_size=(2, 3, 3)), dit_accel.GNA(kernel_size=(3, 5, 7))
    with dit_accel.apply(a, m1, backend="torch"):
        alone1 = _run(a, kwargs)
    with dit_accel.apply(a, m2, backend="torch"):
        alone2 = _run(a, kwargs)
    ha, hb = dit_accel.apply(a, m1, backend="torch"), dit_accel.apply(b, m2, backend="torch")
    assert torch.equal(_run(a, kwargs), alone1) and torch.equal(_run(b, kwargs), alone2)
    hb.remove()
    h2 = dit_accel.apply(a, dit_accel.Dense())  # replaces ha cleanly
    assert ha.removed
    assert torch.equal(_run(a, kwargs), _run(b, kwargs))
    h2.remove()
    _clean(a)
    _clean(b)


def test_dense_layers_layer_methods_and_steps_on_bare_transformer(models):
    model = models["hunyuan"]  # 2 attention layers: double- then single-stream block
    kwargs = _inputs("hunyuan", model)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)
    handle = dit_accel.apply(model, SPARSE["hunyuan"], dense_steps=1, dense_last_steps=1, dense_layers=[1],
                             backend="torch", scheduler=sched)
    try:
        sample = torch.zeros(1)
        for t in sched.timesteps:
            _run(model, kwargs)
            _run(model, kwargs)  # classifier-free guidance: a second call in the same step
            sched.step(torch.zeros(1), t, sample)
        rows = handle.stats()
        assert [r["layer"] for r in rows] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
        assert (rows[0]["sparse_calls"], rows[0]["dense_calls"]) == (4, 4)  # steps 1, 2 sparse; 0 and 3 dense
        assert (rows[1]["sparse_calls"], rows[1]["dense_calls"]) == (0, 8)
        assert rows[1]["method"] == "dense"
    finally:
        handle.remove()

    # set_step on a bare transformer; layer_methods override; dense_layers as "first N"
    handle = dit_accel.apply(model, dit_accel.Dense(), dense_steps=2, layer_methods={1: SPARSE["hunyuan"]},
                             backend="torch")
    try:
        with pytest.raises(ValueError, match="set_step"):
            _run(model, kwargs)
        for step in range(3):
            handle.set_step(step, 3)
            _run(model, kwargs)
        rows = handle.stats()
        assert rows[0]["sparse_calls"] == 0 and (rows[1]["sparse_calls"], rows[1]["dense_calls"]) == (1, 2)
    finally:
        handle.remove()
    with dit_accel.apply(model, SPARSE["hunyuan"], dense_layers=1, backend="torch") as handle:
        _run(model, kwargs)
        assert [r["sparse_calls"] for r in handle.stats()] == [0, 1]


def test_sla_projections_capture_and_timing(models, tmp_path):
    model = models["flux"]
    kwargs = _inputs("flux", model, batch=1)
    method = dit_accel.SLA(topk=0.5)
    handle = dit_accel.apply(model, method, backend="torch", capture=tmp_path, capture_layers=[1], timing=True)
    try:
        projections = handle.sla_projections()
        assert sorted(projections) == ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]
        assert all(float(p.weight.detach().abs().sum()) == 0 for p in projections.values())
        out0 = _run(model, kwargs)
        for p in projections.values():
            torch.nn.init.normal_(p.weight, std=0.5)
        out1 = _run(model, kwargs)
        assert (out1 - out0).abs().max() > 1e-4  # the projection feeds the output
        rows = handle.stats()
        assert all(r["sparse_calls"] == 2 and 0 < r["density"] <= 1 and r["time_ms"] > 0 for r in rows)
        saved = torch.load(tmp_path / "layer001_step000.pt")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["layer001_step000.pt"]
        assert saved["grid"] == T.TRANSFORMER_GRIDS["flux"] and saved["layer"] == 1 and saved["step"] == 0
        assert saved["q"].shape == (1, 2, 130, 16) and saved["layer_name"] == "single_transformer_blocks.0.attn"
    finally:
        handle.remove()
    _clean(model)


def test_still_zero_projections_skip_the_linear_branch_and_a_write_between_calls_is_used(models, monkeypatch):
    """The transformer call reads every SLA layer's projection once (eager CPU): zero ones skip the linear branch,
    bit for bit what computing it gives, and a weight written through ``.data`` (no version bump) before the
    next call makes that layer compute it, matching a run that never skips."""
    from dit_accel.kernels.sla import naive as sla_naive
    from dit_accel.pipelines import transformer_hook

    model = models["wan"]
    kwargs = _inputs("wan", model, batch=1)
    linear_calls = []
    branch = sla_naive._linear_branch_torch
    monkeypatch.setattr(sla_naive, "_linear_branch_torch", lambda *a: linear_calls.append(1) or branch(*a))
    with dit_accel.apply(model, dit_accel.SLA(topk=0.4), backend="torch") as handle:
        projections = list(handle.sla_projections().values())
        skipped = _run(model, kwargs)
        assert linear_calls == []
        with monkeypatch.context() as never_inert:  # the same run with the branch computed on every layer
            never_inert.setattr(transformer_hook, "inert_projections", lambda projs: [False] * len(projs))
            never_inert.setattr("dit_accel.kernels.sla.api.is_inert", lambda proj: False)
            assert torch.equal(_run(model, kwargs), skipped)
            assert len(linear_calls) == len(projections)
            linear_calls.clear()
            projections[1].weight.data.copy_(torch.randn_like(projections[1].weight))
            computed = _run(model, kwargs)
            linear_calls.clear()
        written = _run(model, kwargs)
    assert linear_calls == [1]  # only the written layer
    assert torch.equal(written, computed) and not torch.equal(written, skipped)
    _clean(model)


def test_errors_name_the_argument(models):
    model = models["wan"]
    with pytest.raises(TypeError, match="method_from_name"):
        dit_accel.apply(model, "tile")
    with pytest.raises(ValueError, match="backend"):
        dit_accel.apply(model, dit_accel.Dense(), backend="cuda")
    with pytest.raises(ValueError, match="dense_steps"):
        dit_accel.apply(model, dit_accel.Dense(), dense_steps=-1)
    with pytest.raises(ValueError, match="dense_layers"):
        dit_accel.apply(model, dit_accel.Dense(), dense_layers=[5])
    _clean(model)
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        dit_accel.apply(torch.nn.Linear(2, 2), dit_accel.Dense())
    assert set(SUPPORTED) >= {"WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel",
                              "MochiTransformer3DModel", "LTXVideoTransformer3DModel", "FluxTransformer2DModel"}
    with pytest.raises(ValueError, match=r"diffusers>=0\.35\.0"):
        preset_for(model, diffusers_version="0.31.0")
    # Grid-dependent validation happens in the pre-hook, before any attention.
    with dit_accel.apply(model, dit_accel.GNA(kernel_size=(9, 3, 3)), backend="torch") as handle:
        with pytest.raises(ValueError, match=r"WanTransformer3DModel: .*exceeds the grid extent"):
            _run(model, _inputs("wan", model, batch=1))
        assert all(r["sparse_calls"] == r["dense_calls"] == 0 for r in handle.stats())
    with pytest.raises(ValueError, match=r"'radial' needs a video's \(T, H, W\) token grid, but the sparse calls of "
                                         "FluxTransformer2DModel see a 2-D"):  # (at apply: the preset's grid rank)
        dit_accel.apply(models["flux"], dit_accel.Radial())
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend also sets Diffusers' process-wide backend, which
    # reset_attention_backend() leaves behind: restore it or later tests run on flex.
    previous = _AttentionBackendRegistry._active_backend
    model.set_attention_backend("flex")
    try:
        with pytest.raises(ValueError, match="native"):
            dit_accel.apply(model, dit_accel.Dense())
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(previous)
    _clean(model)


def test_gradients_reach_lora_style_params_and_sla_projection(models):
    model = models["flux"]
    kwargs = _inputs("flux", model, batch=1)
    with dit_accel.apply(model, dit_accel.SLA(topk=0.5), backend="torch") as handle:
        proj = handle.sla_projections()["transformer_blocks.0.attn"]
        q_weight = model.transformer_blocks[0].attn.to_q.weight
        model.zero_grad()
        model(**kwargs)[0].square().mean().backward()
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
        assert q_weight.grad is not None and q_weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    _clean(model)


def test_weights_folder_loads_lora_and_projections_and_remove_unloads(tmp_path):
    from peft import LoraConfig

    from dit_accel.checkpoints.finetuned import save_trained_weights

    model = T.build_tiny_transformer("wan", seed=3)
    kwargs = _inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    method = dit_accel.SLA(topk=0.5)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    with dit_accel.apply(model, method, backend="torch") as handle:
        model.add_adapter(lora)
        for p in handle.sla_projections().values():
            torch.nn.init.normal_(p.weight, std=0.3)
        trained = _run(model, kwargs)
        save_trained_weights(tmp_path, transformer=model, method=method, lora_config=lora,
                             sla_projections=handle.sla_projections())
    model.unload_lora()
    assert torch.equal(_run(model, kwargs), dense)
    with dit_accel.apply(model, method, backend="torch", weights=tmp_path):
        torch.testing.assert_close(_run(model, kwargs), trained, atol=1e-5, rtol=1e-5)
    assert torch.equal(_run(model, kwargs), dense)
    assert not getattr(model, "peft_config", None)
    # fuse_lora: the same output without LoRA matmuls; remove() gives back the weights bit for bit
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with dit_accel.apply(model, method, backend="torch", weights=tmp_path) as handle:
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert handle.fuse_lora() == len(layers) == 2 * len(model.blocks) * 2  # to_q, to_v of attn1 and attn2
        assert handle.fuse_lora() == 0 and all(m.merged for m in layers)
        calls = []
        for m in layers:
            m.lora_A[dit_accel.checkpoints.finetuned.ADAPTER_NAME].register_forward_hook(lambda *a: calls.append(1))
        torch.testing.assert_close(_run(model, kwargs), trained, atol=1e-5, rtol=1e-5)
        assert not calls  # fused: no adapter runs
        with pytest.raises(RuntimeError, match="fuse_lora"):
            model.fuse_lora()  # Diffusers' own fuse stays refused over dit_accel's adapters
    assert torch.equal(_run(model, kwargs), dense)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with dit_accel.apply(model, method, backend="torch") as handle:
        assert handle.fuse_lora() == 0  # no weights= LoRA
    _clean(model)


@pytest.mark.parametrize("class_name", SUPPORTED)
def test_preset_defaults_are_valid_method_configs(class_name):
    from dit_accel.pipelines.presets import recommended

    preset = PRESETS[class_name]
    assert preset.text_position in ("none", "first", "last") and preset.attention
    for method_name in preset.defaults:
        method, kwargs = recommended(class_name, method_name)
        assert method.name == method_name
        assert set(kwargs) <= {"dense_steps", "dense_last_steps", "dense_layers"}


def test_wrapped_calls_run_on_the_native_backend_inside_a_global_backend_context():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, attention_backend

    from dit_accel.pipelines.hooks import native_scope as _native_scope

    with attention_backend("flex"):
        with _native_scope():
            assert _AttentionBackendRegistry._active_backend.value == "native"
        assert _AttentionBackendRegistry._active_backend.value == "flex"


def _tiny_wan_call(model):
    inputs = T.tiny_transformer_inputs("wan", model)
    inputs.pop("return_dict", None)
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_dense_is_a_pure_pass_through_under_a_global_diffusers_backend():
    """Dense() leaves the user's global attention backend in charge: bit-identical to no apply() at all,
    although that backend itself differs from the native one."""
    from diffusers.models.attention_dispatch import attention_backend

    model = T.build_tiny_transformer("wan")
    native = _tiny_wan_call(model)
    with attention_backend("_native_math"):
        plain = _tiny_wan_call(model)
        with dit_accel.apply(model, dit_accel.Dense()):
            dense = _tiny_wan_call(model)
    assert torch.equal(dense, plain)
    assert not torch.equal(plain, native)  # the check would be vacuous if the backends agreed bit for bit


def test_a_processor_set_after_apply_is_respected_and_kept_by_remove():
    model = T.build_tiny_transformer("wan")
    dense = _tiny_wan_call(model)
    handle = dit_accel.apply(model, dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)))
    sparse = _tiny_wan_call(model)
    assert not torch.allclose(sparse, dense)
    block = model.blocks[0].attn1
    user = type(block.processor.original)()  # the user's own processor instance
    block.set_processor(user)
    with pytest.warns(dit_accel.DitAccelWarning, match="blocks.0.attn1 was replaced after apply"):
        mixed = _tiny_wan_call(model)
    assert not torch.allclose(mixed, sparse) and not torch.allclose(mixed, dense)  # layer 0 dense, layer 1 sparse
    handle.remove()
    assert block.processor is user  # remove() does not overwrite the user's choice
    assert not isinstance(model.blocks[1].attn1.processor, SparseAttnProcessor)
    torch.testing.assert_close(_tiny_wan_call(model), dense, rtol=0, atol=0)


def test_a_plan_that_visits_every_block_says_it_saves_nothing():
    """Grid (3, 4, 4) = 48 tokens in one 64-token block: Tile still masks (each frame sees itself) but visits
    every block; the user is told once, and the result is still the method's, not dense."""
    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model, grid=(3, 4, 4))
    inputs.pop("return_dict", None)
    with torch.no_grad():
        dense = model(**inputs, return_dict=False)[0]
    with dit_accel.apply(model, dit_accel.Tile(tile=(1, 4, 4), window=(1, 3, 3))) as handle:
        with pytest.warns(dit_accel.DitAccelWarning, match=r"visits every key block of grid \(3, 4, 4\)"):
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
        assert handle.summary()["mean_density"] == 1.0
    assert not torch.allclose(out, dense)  # the token mask applied


def test_plan_cache_keeps_the_most_recent_plans_only():
    from dit_accel.pipelines.hooks import PlanCache

    cache = PlanCache(max_plans=2)
    tile = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
    a, b, c = (cache.get(tile, g) for g in ((2, 8, 8), (3, 8, 8), (4, 8, 8)))
    assert [k[1] for k in cache.items()] == [(3, 8, 8), (4, 8, 8)]  # (2, 8, 8) was the least recent
    assert cache.get(tile, (4, 8, 8)) is c and cache.get(tile, (3, 8, 8)) is b  # hits move to the end
    again = cache.get(tile, (2, 8, 8))
    assert again is not a and again.density == a.density and [k[1] for k in cache.items()] == [(3, 8, 8), (2, 8, 8)]


def test_the_grid_is_read_once_per_fingerprint_of_the_call(monkeypatch):
    """The pre-hook reads the token grid again only when the preset's fingerprint of the call (the shapes its
    reader reads) changes: a new latent size or text length is read, a repeated call is not."""
    from dataclasses import replace

    reads = []
    wan = PRESETS["WanTransformer3DModel"]
    counting = replace(wan, read_grid=lambda model, args: reads.append(tuple(args["hidden_states"].shape))
                       or wan.read_grid(model, args))
    monkeypatch.setitem(PRESETS, "WanTransformer3DModel", counting)
    model = T.build_tiny_transformer("wan")
    handle = dit_accel.apply(model, dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)))

    def call(grid, text=None):
        inputs = T.tiny_transformer_inputs("wan", model, grid=grid)
        inputs.pop("return_dict", None)
        if text is not None:
            inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :text]
        with torch.no_grad():
            model(**inputs, return_dict=False)

    call((4, 8, 8))
    call((4, 8, 8))
    assert len(reads) == 1
    call((2, 8, 8))
    call((4, 8, 8))
    assert len(reads) == 3
    call((4, 8, 8), text=3)  # the same latents with fewer text tokens: a new fingerprint
    assert len(reads) == 4 and handle.summary()["sparse_calls"] == 5 * 2
    assert wan.grid_key is not None and PRESETS["FluxTransformer2DModel"].grid_key is None  # FLUX reads img_ids


def test_a_call_like_the_last_reuses_its_plans_and_a_new_geometry_or_backend_rebuilds(monkeypatch):
    """The pre-hook builds, checks and prepares the plans once per geometry (a denoising loop repeats it):
    a repeated call reuses them, a new grid, step or $DIT_ACCEL_BACKEND makes the context anew, and the
    results are those of a fresh apply()."""
    from dit_accel.plans.plan import LayoutPlan

    prepared, planned = [], []
    prepare, plan_of = LayoutPlan.prepare, dit_accel.Tile.plan
    monkeypatch.setattr(LayoutPlan, "prepare", lambda self, device, backend="auto": prepared.append(
        (self.grid, device, backend)) or prepare(self, device, backend))
    monkeypatch.setattr(dit_accel.Tile, "plan", lambda self, grid: planned.append(grid) or plan_of(self, grid))
    method = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
    model = T.build_tiny_transformer("wan")
    handle = dit_accel.apply(model, method)

    def call(grid):
        inputs = T.tiny_transformer_inputs("wan", model, grid=grid)
        inputs.pop("return_dict", None)
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    first = call((4, 8, 8))
    assert len(prepared) == 1 and planned == [(4, 8, 8)]
    assert torch.equal(call((4, 8, 8)), first) and len(prepared) == 1
    call((2, 8, 8))
    assert planned == [(4, 8, 8), (2, 8, 8)] and len(prepared) == 2
    handle.set_step(1, 4)  # a new step: the schedule is asked again (plans come from the plan cache)
    assert torch.equal(call((4, 8, 8)), first) and len(prepared) == 3 and len(planned) == 2
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "torch")
    assert torch.equal(call((4, 8, 8)), first) and len(prepared) == 4
    assert handle.summary()["sparse_calls"] == 5 * 2
    fresh = T.build_tiny_transformer("wan")
    dit_accel.apply(fresh, method)
    inputs = T.tiny_transformer_inputs("wan", fresh, grid=(4, 8, 8))
    inputs.pop("return_dict", None)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs, return_dict=False)[0], first)


def test_chroma_additive_text_mask_every_row_matches_reference(models):
    """Chroma's pipeline mask reaches SDPA as the float ``m_i * m_j`` *added* to the scores (padded text keys
    1 lower, not removed). Every attention output row, image and text, valid and padded, of both blocks
    matches the reference that adds the same mask to the masked-dense scores: the image queries run sparse
    with the text keys' bias in the dense text branch, the text queries dense with their own mask rows."""
    model, method, grid = models["chroma"], SPARSE["chroma"], T.TRANSFORMER_GRIDS["chroma"]
    kwargs = _inputs("chroma", model)
    m = kwargs["attention_mask"]
    assert m.is_floating_point() and (m == 0).any() and (m[:, T.TRANSFORMER_TEXT["chroma"]:] == 1).all()

    def attention_outputs():
        got = []
        hooks = [mod.register_forward_hook(lambda _, __, out: got.extend(out if isinstance(out, tuple) else (out,)))
                 for name, mod in model.named_modules() if name.endswith(".attn")]
        try:
            _run(model, kwargs)
        finally:
            for h in hooks:
                h.remove()
        return got

    with ReferenceAttention(gna_mask(grid, method.kernel_size), "first"):
        ref = attention_outputs()
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = attention_outputs()
        rows = handle.stats()
    assert len(out) == len(ref) == 3  # the double block's image and text outputs, the single block's sequence
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows


def test_chroma_mask_not_one_on_the_image_runs_dense(models):
    """A transformer call whose ``attention_mask`` is not 1 on every image token cannot shift the bias off the
    image keys: it runs dense, says so, and equals the model without dit_accel."""
    from dit_accel import DitAccelWarning

    model, method = models["chroma"], SPARSE["chroma"]
    kwargs = _inputs("chroma", model)
    kwargs["attention_mask"] = kwargs["attention_mask"].clone()
    kwargs["attention_mask"][:, -1] = 0.5
    dense = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        with pytest.warns(DitAccelWarning, match="cannot make sparse"):
            out = _run(model, kwargs)
        rows = handle.stats()
    assert torch.equal(out, dense)
    assert all(r["sparse_calls"] == 0 and r["dense_calls"] == 1 for r in rows), rows


def test_reset_stats_forgets_the_calls_so_far_and_keeps_the_plans():
    model = T.build_tiny_transformer("wan")
    handle = dit_accel.apply(model, dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)), backend="torch")
    first = _tiny_wan_call(model)
    plans = dict(handle.plans)
    assert plans and all(row["sparse_calls"] >= 1 for row in handle.stats())
    handle.reset_stats()
    assert all(row["sparse_calls"] == row["dense_calls"] == 0 for row in handle.stats())
    assert torch.equal(_tiny_wan_call(model), first) and all(row["sparse_calls"] >= 1 for row in handle.stats())
    assert all(handle.plans[key] is plan for key, plan in plans.items())  # (built once, not again)
    handle.remove()
    with pytest.raises(RuntimeError, match="reset_stats"):
        handle.reset_stats()


def test_sla_projections_of_another_model_say_so_not_dense_layers(tmp_path):
    """SLA projections saved from a tiny Wan, applied to a tiny Flux: none of their names is a layer of Flux. Before,
    the error advised passing the same dense_layers to apply(), which could not help."""
    from dit_accel.checkpoints.finetuned import save_trained_weights

    wan, flux = T.build_tiny_transformer("wan", seed=3), T.build_tiny_transformer("flux", seed=3)
    method = dit_accel.SLA(topk=0.5)
    with dit_accel.apply(wan, method, backend="torch") as handle:
        save_trained_weights(tmp_path, transformer=wan, method=method, lora_config=None,
                             sla_projections=handle.sla_projections())
    before = {k: v.clone() for k, v in flux.state_dict().items()}
    with pytest.raises(ValueError, match=r"none of the \d+ tensors of sla_projections\.safetensors names an attention "
                                         r"layer of this model .*it was trained on another model"):
        dit_accel.apply(flux, method, backend="torch", weights=tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in flux.state_dict().items())
    _clean(flux)
