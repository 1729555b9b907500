"""Round 25 (trust): the patched ComfyUI models against a masked-dense reference of ComfyUI's own attention at
unusual settings: odd, non-square grids, one latent frame, one token per frame row or column, cfg's batched
positive and negative, prompts of other lengths, the calls of multi-call samplers and their sigmas, half-precision
models, and each of ComfyUI's attention functions. Each comparison is shown able to fail (a mask one pair off is
told apart), and a ComfyUI whose attention a custom node replaced in the model's own module is refused, not run
unchanged without a word."""

import dataclasses
import importlib
import logging
import types

import pytest
import torch

import dit_accel
from dit_accel.comfyui import patch_model
from dit_accel.patterns.gna import gna_mask
from dit_accel.patterns.radial import radial_mask
from dit_accel.patterns.tile import tile_mask

from tests.comfyui.models import ALL_CASES, masked_reference, sample, with_override

TOL = dict(rtol=1e-5, atol=2e-5)  # fp32 model, fp64 reference: the sum order of fp32 matmuls (batch 2: 3e-5 seen)


def _tile(grid):
    """A Tile that is sparse on every grid below, and its mask from the pattern's one definition."""
    if len(grid) == 3:
        return dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 3)), tile_mask(grid, (1, 2, 2), (1, 1, 3))
    return dit_accel.Tile(tile=(2, 2), window=(1, 3)), tile_mask(grid, (2, 2), (1, 3))


# ComfyUI 0.3.64's own models fail at cfg > 1 with these cases' padded prompts (HunyuanVideo's mask is built for
# batch 1) or their attention_mask (LTX-Video's): those run at cfg 1
_CFG1 = {"hunyuan-video", "hunyuan-image21", "ltx-video"}


def _compare(comfy, model, case, method, mask, cfg=2.0, lengths=None):
    """``(ours, reference)`` of one sample at ``cfg`` (2: positive and negative batched in one call)."""
    cfg, seen = 1.0 if case.name in _CFG1 else cfg, []
    ref = sample(comfy, with_override(model, masked_reference(mask, case.text, seen, lengths)), case, cfg=cfg)
    assert seen, "the reference saw no call of the layout: it compared nothing"
    return sample(comfy, patch_model(model, method, backend="torch"), case, cfg=cfg), ref


def _off_by_one_pair(mask):
    """``mask`` with its first disallowed pair allowed: a reference that must not match."""
    wrong = mask.clone()
    i, j = (~mask).nonzero()[0].tolist()
    wrong[i, j] = True
    return wrong


# (case, latent): odd, non-square (3 x 5 x 7 after the patch), one frame, one token per frame row (W = 1) or column
VIDEO = [("wan21-t2v", (1, 16, 3, 9, 14)), ("wan21-t2v", (1, 16, 1, 10, 13)), ("wan21-t2v", (1, 16, 3, 8, 2)),
         ("wan22-ti2v", (1, 48, 1, 2, 14)), ("wan21-humo", (1, 16, 1, 8, 8)), ("hunyuan-video", (1, 16, 3, 8, 2))]
VIDEO_MORE = [("cosmos-predict2", (1, 16, 3, 8, 2)), ("cosmos1", (1, 16, 1, 8, 2)), ("ltx-video", (1, 128, 3, 5, 7)),
              ("ltx-video", (1, 128, 1, 4, 1)), ("mochi", (1, 12, 3, 8, 2))]
IMAGE = [("flux", (1, 16, 9, 14)), ("flux", (1, 16, 10, 2)), ("chroma", (1, 16, 9, 14)),
         ("qwen-image", (1, 16, 1, 9, 14)), ("qwen-image", (1, 16, 1, 10, 2)), ("sd3", (1, 16, 9, 14)),
         ("auraflow", (1, 4, 10, 2)), ("hidream", (1, 16, 9, 14)), ("lumina2", (1, 16, 9, 14)),
         ("omnigen2", (1, 16, 10, 2)), ("chroma-radiance", (1, 3, 19, 28)), ("hunyuan-image21", (1, 64, 5, 7))]


def _grid(case):
    grid = case.grid()
    return grid[1:] if case.name == "qwen-image" else grid  # (B, C, 1, H, W): an image


@pytest.mark.parametrize("cases", [VIDEO, VIDEO_MORE, IMAGE], ids=["wan-hunyuan", "cosmos-ltx-mochi", "image"])
def test_unusual_grids_equal_the_reference_with_cfg_batched(comfy, models, cases):
    """Every family's own layout at grids of odd, unequal sides, one frame, and one token per row or column, cfg 2
    (ComfyUI runs the positive and negative prompts as one call of batch 2). Lumina 2's and OmniGen2's image-alone
    refiner calls are told apart from the caption refiner's by their length."""
    for name, latent in cases:
        case = dataclasses.replace(ALL_CASES[name], latent=latent)
        grid, n = _grid(case), 1
        for g in grid:
            n *= g
        method, mask = _tile(grid)
        assert not mask.all(), (name, grid)
        lengths = {n, n + 6} if name in ("lumina2", "omnigen2") else None  # (their caption refiner's 6 tokens)
        ours, ref = _compare(comfy, models(name), case, method, mask, lengths=lengths)
        torch.testing.assert_close(ours, ref, **TOL, msg=lambda m: f"{name} {grid}: {m}")


@pytest.mark.parametrize("name, latent", [("wan21-t2v", (1, 16, 3, 9, 14)), ("flux", (1, 16, 9, 14)),
                                          ("hunyuan-video", (1, 16, 1, 10, 14))], ids=["wan", "flux", "hunyuan"])
def test_the_comparison_tells_a_mask_one_pair_off(comfy, models, name, latent):
    """The tests above can fail: a reference with one more allowed pair is not what the node runs."""
    case = dataclasses.replace(ALL_CASES[name], latent=latent)
    method, mask = _tile(_grid(case))
    ours, _ = _compare(comfy, models(name), case, method, mask)
    _, wrong = _compare(comfy, models(name), case, method, _off_by_one_pair(mask))
    assert (ours - wrong).abs().max() > 10 * TOL["atol"]


def _resized_conds(h, w, frames):
    """The conditioning of Wan's variants (tests/comfyui/models.py) at a latent of ``frames`` x ``h`` x ``w``."""
    latent_formats = importlib.import_module("comfy.latent_formats")
    g = torch.Generator().manual_seed(30)
    text = torch.randn(1, 8, 4096, generator=g)
    clip = types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, 5, 1280, generator=g))
    control = torch.randn(1, 32, frames + 1, h, w, generator=g)
    control[:, 16:, :1] = latent_formats.Wan21().process_out(torch.zeros(1, 16, 1, h, w))  # a reference image
    mask = torch.rand(1, 64, frames + 1, h, w, generator=g)
    mask[:, :, :1] = 0
    image = {"clip_vision_output": clip, "concat_latent_image": torch.randn(1, 16, frames, h, w, generator=g)}
    return {
        "wan21-vace": {"vace_frames": [control], "vace_mask": [mask], "vace_strength": [1.0]},
        "wan21-camera": dict(image, camera_conditions=torch.randn(1, 24, frames, 8 * h, 8 * w, generator=g)),
        "wan22-animate": dict(image, concat_latent_image=torch.randn(1, 16, frames + 1, h, w, generator=g),
                              pose_video_latent=torch.randn(1, 16, frames, h, w, generator=g)),
        "wan22-fun-ref": {"concat_latent_image": torch.randn(1, 32, frames, h, w, generator=g),
                          "concat_mask": torch.ones(1, 4, frames, h, w), "concat_mask_index": 16,
                          "reference_latents": [torch.randn(1, 16, 1, h, w, generator=g)]},
        "wan21-phantom": {"time_dim_concat": torch.randn(1, 16, 2, h, w, generator=g)},
    }, text


@pytest.mark.parametrize("names", [("wan21-vace", "wan22-animate"), ("wan21-camera", "wan22-fun-ref", "wan21-phantom")],
                         ids=["leading-frames", "camera-reference-subjects"])
def test_wans_variants_at_an_odd_grid(comfy, models, names):
    """VACE's and Animate's leading reference frame, Wan 2.2 Fun's reference image before the video and Phantom's
    subject frames after it, Fun Camera's conditions: each at a 3 x 5 x 7 grid, cfg 2, exactly the reference."""
    h, w, frames = 10, 14, 3
    conds, text = _resized_conds(h, w, frames)
    method, mask = _tile((frames, 5, 7))
    for name in names:
        extra, lead = conds[name], 1 if name in ("wan21-vace", "wan22-animate") else 0
        case = dataclasses.replace(ALL_CASES[name], latent=(1, 16, frames + lead, h, w),
                                   cond=lambda extra=extra: [[text, dict(extra)]])
        ours, ref = _compare(comfy, models(name), case, method, mask)
        torch.testing.assert_close(ours, ref, **TOL, msg=lambda m: f"{name}: {m}")


def test_gna_strides_dilations_causal_and_radial_at_odd_grids(comfy, models):
    """GNA with a stride, a dilation and a causal time axis, and Radial at 64-token blocks over 9 frames (its
    decaying band crosses frame and block edges), on a text-free and a [video, text] layout."""
    grid = (3, 5, 7)
    gna = dit_accel.GNA(kernel_size=(2, 3, 3), stride=(1, 1, 2), dilation=(1, 1, 2), is_causal=(True, False, False))
    wan = dataclasses.replace(ALL_CASES["wan21-t2v"], latent=(1, 16, 3, 9, 14))
    mask = gna_mask(grid, (2, 3, 3), (1, 1, 2), (1, 1, 2), (True, False, False))
    torch.testing.assert_close(*_compare(comfy, models("wan21-t2v"), wan, gna, mask), **TOL)
    flux = dataclasses.replace(ALL_CASES["flux"], latent=(1, 16, 9, 14))
    mask = gna_mask((5, 7), (3, 3), (1, 2), (1, 2))
    torch.testing.assert_close(*_compare(comfy, models("flux"), flux, dit_accel.GNA(kernel_size=(3, 3), stride=(1, 2),
                                                                                    dilation=(1, 2)), mask), **TOL)
    radial = dit_accel.Radial(block_size=64, decay=0.5)
    for name in ("wan21-t2v", "mochi"):
        case = dataclasses.replace(ALL_CASES[name], latent=(1, ALL_CASES[name].latent[1], 9, 10, 14))
        mask = radial_mask((9, 5, 7), 64, 0.5, (0,))
        assert 0.3 < mask.float().mean() < 0.7
        torch.testing.assert_close(*_compare(comfy, models(name), case, radial, mask), **TOL)


def test_prompts_of_other_lengths_run_as_comfyui_runs_them(comfy, models, sparse_calls):
    """A negative prompt of another length: every covered family's text is a CONDRegular in ComfyUI 0.3.64, which
    batches only conditionings of one shape, so the two prompts run as separate calls of batch 1, each with its own
    number of text tokens, both sparse and exact (Mochi: [video, valid text]; HunyuanVideo: [video, text] masked)."""
    for name in ("flux", "sd3", "hunyuan-video", "mochi", "qwen-image"):
        case = ALL_CASES[name]
        context, extra = case.cond()[0]
        short = dict(extra)
        if "attention_mask" in short:  # (3 valid tokens of 4: Mochi's valid count differs too)
            short["attention_mask"] = torch.tensor([[1, 1, 1, 0]])
        negative = [[torch.randn(1, 4, context.shape[2], generator=torch.Generator().manual_seed(7)), short]]
        noise = torch.randn(case.latent, generator=torch.Generator().manual_seed(5))
        method, mask = _tile(_grid(case))

        def run(model):
            return comfy.sample.sample(model, noise, 2, 2.0, "euler", "simple", [[context, extra]], negative,
                                       torch.zeros(case.latent), seed=0, disable_pbar=True)

        batches = []
        ref = run(with_override(models(name), masked_reference(mask, case.text, batches=batches)))
        sparse_calls.clear()
        ours = run(patch_model(models(name), method, backend="torch"))
        n = len(mask)
        assert set(batches) == {1} and len(set(sparse_calls) - {n}) == 2, (name, batches, sparse_calls)  # (SD3.5's
        # attn2 holds the image alone)
        torch.testing.assert_close(ours, ref, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpmpp_2m"])
def test_each_call_of_a_multi_call_sampler_sees_its_step_and_its_own_sigma(comfy, models, monkeypatch, sampler):
    """cfg 2 (one batched call per evaluation), a sampler that evaluates the model once or twice per step: every call
    of step i counts as step i (Heun's second one at the next step's sigma too, as Diffusers' step_index // order),
    dense_steps names steps, dense_above_sigma the call's own sigma; and the output is the reference's with the
    same calls dense."""
    from dit_accel.comfyui import override

    case, model = ALL_CASES["wan21-t2v"], models("wan21-t2v")
    method, mask = _tile(case.grid())
    seen, method_for = [], override.Patch.method_for

    def spy(self, layer, state):
        chosen = method_for(self, layer, state)
        if layer == 0:
            seen.append((state.step, round(state.sigma, 6), chosen[0] is not None))
        return chosen

    monkeypatch.setattr(override.Patch, "method_for", spy)
    noise = torch.randn(case.latent, generator=torch.Generator().manual_seed(5))
    cond = case.cond()
    negative = [[torch.flip(c, dims=(1,)), e] for c, e in cond]

    def run(patched):
        return comfy.sample.sample(patched, noise, 4, 2.0, sampler, "simple", cond, negative, torch.zeros(case.latent),
                                   seed=0, disable_pbar=True)

    ours = run(patch_model(model, method, backend="torch", dense_steps=1, dense_above_sigma=0.93))
    steps = [s for s, _, _ in seen]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2, 3}
    if sampler != "dpmpp_2m":  # two calls in each step but the last (whose next sigma is 0)
        assert steps == [0, 0, 1, 1, 2, 2, 3]
    for step, sigma, sparse in seen:
        assert sparse == (step >= 1 and sigma <= 0.93), seen
    assert seen[0][1] == 1.0 and any(sparse for *_, sparse in seen)  # (from the schedule's top; some calls sparse)
    dense_at = {sig for _, sig, sparse in seen if not sparse}
    assert not dense_at & {sig for _, sig, sparse in seen if sparse}  # (so a call's sigma says which ran)

    def reference(func, *args, **kwargs):  # the pattern where the node ran sparse, ComfyUI's own where dense
        sigma = round(float(kwargs["transformer_options"]["sigmas"][0]), 6)
        return (func(*args, **kwargs) if sigma in dense_at else masked_reference(mask, "none")(func, *args, **kwargs))

    torch.testing.assert_close(ours, run(with_override(model, reference)), **TOL)


def _typed(case, dtype, cast):
    """``case``'s tiny model with weights in ``dtype``, computing in ``cast`` (ComfyUI's manual cast) or ``dtype``."""
    comfy = importlib.import_module("comfy.supported_models")
    config = getattr(comfy, case.model)(dict(case.config))
    config.set_inference_dtype(dtype, cast)
    model = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * case.scale).to(p.dtype))
    cpu = torch.device("cpu")
    return importlib.import_module("comfy.model_patcher").ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_half_precision_models_equal_the_reference_in_their_dtype(comfy):
    """fp16 and bf16 models (q, k, v in that dtype), and fp16 weights computing in fp32 (ComfyUI's manual cast): the
    output is the reference rounded once to the call's dtype (0 apart on Wan, whose calls hold the video alone), and
    FLUX's joint calls (text merged by log-sum-exp) no farther from it than ComfyUI's own dense attention is from an
    fp64 dense one (the dtype's floor)."""
    wan, flux = ALL_CASES["wan21-t2v"], ALL_CASES["flux"]
    for dtype, cast in [(torch.float16, None), (torch.bfloat16, None), (torch.float16, torch.float32)]:
        model = _typed(wan, dtype, cast)
        method, mask = _tile(wan.grid())
        ours, ref = _compare(comfy, model, wan, method, mask, cfg=1.0)
        assert (ours - ref).abs().max() <= (0 if cast is None else 2e-5)
    model = _typed(flux, torch.float16, None)
    method, mask = _tile(flux.grid())
    ours, ref = _compare(comfy, model, flux, method, mask, cfg=1.0)
    dense = sample(comfy, with_override(model, masked_reference(torch.ones_like(mask), "first")), flux)
    floor = (sample(comfy, model, flux) - dense).abs().max()
    assert (ours - ref).abs().max() <= 1.5 * floor < (ours - sample(comfy, model, flux)).abs().max() / 5


@pytest.mark.parametrize("function", ["attention_basic", "attention_split", "attention_sub_quad",
                                      "attention_pytorch"])
def test_each_of_comfyuis_attention_functions(comfy, models, monkeypatch, function):
    """ComfyUI picks its attention function at start (--use-split-cross-attention, --use-quad-cross-attention,
    --use-pytorch-cross-attention). The node replaces the self-attention calls it runs sparse and hands every other
    call (cross-attention, dense steps) to the chosen function: Dense is that function's output bit for bit, a
    pattern the reference's, and the declined calls ran it."""
    chosen = getattr(comfy.attention, function)
    monkeypatch.setattr(importlib.import_module("comfy.ldm.wan.model"), "optimized_attention", chosen)
    case, model = ALL_CASES["wan21-t2v"], models("wan21-t2v")
    own = sample(comfy, model, case, cfg=2.0)
    assert torch.equal(sample(comfy, patch_model(model, dit_accel.Dense()), case, cfg=2.0), own)
    ran = []

    def before(func, *args, **kwargs):  # an override set before the node: the calls it declines come through here
        ran.append(func.__name__)
        return func(*args, **kwargs)

    method, mask = _tile(case.grid())
    ours = sample(comfy, patch_model(with_override(model, before), method, backend="torch"), case, cfg=2.0)
    assert set(ran) == {function} and len(ran) == 2 * 2  # the 2 blocks' cross-attention, 2 steps
    reference = sample(comfy, with_override(model, masked_reference(mask, "none")), case, cfg=2.0)
    torch.testing.assert_close(ours, reference, **TOL)


def _own_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                   **kwargs):
    """A custom node's attention set in place of ComfyUI's: computes, never calls the override."""
    return comfy_attention().attention_pytorch.__wrapped__(q, k, v, heads, mask, attn_precision, skip_reshape,
                                                          skip_output_reshape)


def comfy_attention():
    return importlib.import_module("comfy.ldm.modules.attention")


@pytest.mark.parametrize("name, module", [("wan21-t2v", "comfy.ldm.wan.model"), ("flux", "comfy.ldm.flux.math")],
                         ids=["wan-model-module", "flux-helper-module"])
def test_an_attention_replaced_in_the_models_own_module_is_refused(comfy, models, monkeypatch, name, module):
    """A custom node that sets its attention in the model's module (``comfy.ldm.wan.model.optimized_attention``; FLUX's
    blocks call ``comfy.ldm.flux.math``'s) bypassed the override: the node patched, no call reached it, the log said
    nothing, and the sample was the unpatched model's. Refused now, naming the function; the MODEL is unchanged."""
    model = models(name)
    monkeypatch.setattr(importlib.import_module(module), "optimized_attention", _own_attention)
    with pytest.raises(ValueError) as err:
        patch_model(model, _tile(_grid(ALL_CASES[name]))[0])
    text = str(err.value)
    assert text.startswith("dit_accel: this ComfyUI's attention does not call transformer_options")
    assert f"{module}.optimized_attention, which this model's code calls, does not" in text
    assert "use ComfyUI's --use-sage-attention instead" in text and "\n" not in text
    assert not model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "dit_accel")


def test_an_attention_replaced_after_the_node_ran_is_said_in_the_log(comfy, models, monkeypatch, caplog):
    """Replaced after the node patched the model (a custom node run later in the workflow): the sampler ran the model
    without the method, and the log said nothing (a model call none of whose attention calls reached the node's own
    override was taken for a cache node's skipped call). Said once, naming the function."""
    case, model = ALL_CASES["wan21-t2v"], models("wan21-t2v")
    patched = patch_model(model, _tile(case.grid())[0], backend="torch")
    monkeypatch.setattr(importlib.import_module("comfy.ldm.wan.model"), "optimized_attention", _own_attention)
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, patched, case)
    said = [r.getMessage() for r in caplog.records if "reached dit_accel" in r.getMessage()]
    assert len(said) == 1 and "comfy.ldm.wan.model.optimized_attention was replaced" in said[0], said
    assert "Remove that node" in said[0]
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):  # ComfyUI's own: runs sparse, nothing to say
        sample(comfy, patch_model(model, _tile(case.grid())[0], backend="torch"), case)
    assert not [r for r in caplog.records if "reached dit_accel" in r.getMessage()]


def test_a_vace_call_of_reference_frames_alone_says_what_to_do(models):
    """A vace_context zero after its first channels in every frame left no video frame, and the refusal said only
    "no video grid": now it says why the frames read as references and what to do."""
    inner = models("wan21-vace").model.diffusion_model
    control = torch.randn(1, 1, 96, 2, 10, 14)
    control[:, :, 16:] = 0
    with pytest.raises(ValueError) as err:
        inner_family = importlib.import_module("dit_accel.comfyui.families").family_for(inner)
        inner_family.grid(inner, torch.zeros(1, 16, 2, 10, 14), {"vace_context": control})
    text = str(err.value)
    assert "(all 2: its vace_context is zero after the first 16 channels in each" in text
    assert text.endswith("give WanVaceToVideo a control video or more frames, or use ComfyUI's own attention for "
                         "this model (bypass the dit_accel node)")
