"""Model loading, plans and the shapes model's scoring, trust round 19: what a user passing their own folders, plan
files and tensors hits. Each test names what was wrong before its fix."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.models.loading import ModelLoadError, load_pipeline
from dit_accel.models.tiny_shapes import TRAINED_MODELS


# ------------------------------------------------------------------ Plan.run on a sequence that is not its grid
GRID = (4, 8, 8)  # 256 video tokens


@pytest.mark.parametrize("method", [dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1)),
                                    dit_accel.SLA(topk=0.5, block_q=64, block_k=64), dit_accel.Dense()],
                         ids=["tile", "sla", "dense"])
def test_plan_run_refuses_a_sequence_that_is_not_its_grid_plus_the_text(method):
    """Before: ``method.plan(grid).run(q, k, v)`` on 264 tokens (8 of them text) without ``num_text`` returned 256 of
    the 264 rows for a Tile plan (the text rows dropped) and ran SLA and Dense on whatever length came (248 tokens on
    a 256-token grid, or ``num_text=-8``), all without a word. Now the lengths are checked against the grid."""
    plan = method.plan(GRID)
    q = torch.randn(1, 2, 264, 16)
    with pytest.raises(ValueError, match=r"Plan.run: the plan of .* is for grid \(4, 8, 8\) \(256 video tokens\); "
                                         r"k holds 264 tokens with num_text=0, so 264 video tokens: pass num_text=8"):
        plan.run(q, q, q)
    with pytest.raises(ValueError, match=r"k holds 248 tokens with num_text=0, so 248 video tokens: pass the whole "
                                         r"sequence, or build the plan for the grid of these tokens"):
        plan.run(q[:, :, :248], q[:, :, :248], q[:, :, :248])
    with pytest.raises(ValueError, match=r"Plan.run: num_text=-8 is invalid: the text tokens in the sequence, a "
                                         r"whole number from 0 to 264"):
        plan.run(q, q, q, num_text=-8)
    with pytest.raises(ValueError, match=r"Plan.run: q, k, v must be tensors of shape \(B, H, S, D\)"):
        plan.run(q[0], q[0], q[0], num_text=8)
    out, _ = plan.run(q, q, q, num_text=8)
    assert out.shape == q.shape
    out, _ = plan.run(q[:, :, :256], q, q, num_text=8, text_queries=False)
    assert out.shape == (1, 2, 256, 16)


@pytest.mark.parametrize("shape", [(2, 264), (2, 1, 264, 264), (2, 1, 1, 260), (3, 1, 1, 264)],
                         ids=["per-sample-2d", "per-query", "other-length", "other-batch"])
def test_plan_run_names_a_key_mask_of_another_shape(shape):
    """Before: a key mask that is not one row of keys per sample ((B, S), a (B, 1, S, S) attention mask, another
    length or batch) failed inside the text branch with a raw "shape '[2, 264]' is invalid for input of size 139392"
    or "The size of tensor a (8) must match the size of tensor b (2)". Now the argument and its shape are named."""
    plan = dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1)).plan(GRID)
    q = torch.randn(2, 2, 264, 16)
    with pytest.raises(ValueError, match=rf"Plan.run: key_mask must be a tensor of shape \(B or 1, 1, 1, S\) = "
                                         rf"\(2, 1, 1, 264\) \(one row of keys per sample\); got "
                                         rf"{re.escape(str(shape))}"):
        plan.run(q, q, q, num_text=8, key_mask=torch.ones(shape, dtype=torch.bool))
    for rows in (1, 2):
        out, _ = plan.run(q, q, q, num_text=8, key_mask=torch.ones(rows, 1, 1, 264, dtype=torch.bool))
        assert out.shape == q.shape


@pytest.mark.parametrize("which", ["batch", "heads", "head-dim"])
def test_plan_run_names_q_k_v_of_other_batches_heads_or_head_dims(which):
    """Before: k and v of another batch, head count or head dim than q failed inside the kernels with a raw "shape
    '[2, 1024, 16]' is invalid for input of size 16384" (Tile) or "The size of tensor a (4) must match the size of
    tensor b (2)" (SLA). Now the shapes are named."""
    plan = dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1)).plan(GRID)
    q = torch.randn(2, 4, 264, 16)
    kv = {"batch": q[:1], "heads": q[:, :2], "head-dim": q[..., :8]}[which]
    with pytest.raises(ValueError, match=r"Plan.run: q, k, v must share their batch and heads \(B, H\), q and k "
                                         r"their head dim, and k and v their length; got \(2, 4, 264, 16\), "):
        plan.run(q, kv, kv, num_text=8)


def test_plan_run_of_a_per_head_config_of_alike_heads_checks_the_head_count():
    """Before: ``PerHead((Tile(...),) * 2).plan(grid)`` (every head the same method: built as that method's plan) ran
    on q of 1 or 4 heads without a word, where a per-head config of different heads refused them ("per_head holds 2
    head methods but the layer has 4 heads"). Now both refuse another head count."""
    from dit_accel.plans.per_head import PerHead

    plan = PerHead((dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1)),) * 2).plan(GRID)
    for heads in (1, 4):
        q = torch.randn(1, heads, 264, 16)
        with pytest.raises(ValueError, match=rf"Plan.run: this plan runs a per_head config of 2 head methods \(all "
                                             rf"alike\), but q holds {heads} heads: give one method per head"):
            plan.run(q, q, q, num_text=8)
    q = torch.randn(1, 2, 264, 16)
    assert plan.run(q, q, q, num_text=8)[0].shape == q.shape


# ------------------------------------------------------------------ a pipeline folder whose parts do not agree
def _copy(tmp_path, edit):
    """A copy of the shipped tiny-shapes folder with ``edit(folder)`` applied."""
    folder = tmp_path / "shapes"
    shutil.copytree(TRAINED_MODELS["tiny-shapes"], folder)
    edit(folder)
    return folder


def _edit_config(key, value, component="transformer"):
    def edit(folder):
        path = folder / component / "config.json"
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config))
    return edit


def test_a_config_naming_more_layers_than_the_weights_hold_is_one_line(tmp_path):
    """Before: a transformer config.json saying ``num_layers: 5`` beside weights of 4 layers loaded (Diffusers logged
    "newly initialized"), then ``pipe.to`` failed with a raw "NotImplementedError: Cannot copy out of meta tensor".
    Now one ModelLoadError names the component folder and the tensors the weights lack."""
    folder = _copy(tmp_path, _edit_config("num_layers", 5))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder))
    assert str(err.value).startswith(f"{folder / 'transformer'}: its weights lack 27 tensors that its config.json "
                                     "makes (blocks.4.")
    assert str(err.value).endswith("the config and the weights are of different models (a config edited by hand, or "
                                   f"files of two downloads): copy or download {folder / 'transformer'} again")


def test_a_config_naming_fewer_layers_than_the_weights_hold_is_refused(tmp_path):
    """Before: ``num_layers: 3`` beside weights of 4 layers loaded a 3-layer model (Diffusers logged the unused
    weights), and every run after it ran without the last block, silently. Now it is refused, naming the counts."""
    folder = _copy(tmp_path, _edit_config("num_layers", 3))
    with pytest.raises(ModelLoadError, match=r"transformer: its weights hold 4 layers of blocks, and its config.json "
                                             r"makes 3 \(blocks.3 and up would be dropped, and the model would run "
                                             r"without them\)"):
        load_pipeline(str(folder))


def test_a_config_value_of_the_wrong_type_names_the_component_file_and_key(tmp_path):
    """Before: ``"num_layers": "4"`` (a number in quotes) raised a raw ``TypeError: 'str' object cannot be
    interpreted as an integer``, naming no file. Now a ModelLoadError names the component, the file and the key."""
    folder = _copy(tmp_path, _edit_config("num_layers", "4"))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder))
    assert str(err.value) == (
        f"could not load the transformer of the pipeline in {folder}: 'str' object cannot be interpreted as an "
        f"integer; in {folder / 'transformer' / 'config.json'}, num_layers: '4' is text, not a number (numbers are "
        "written without quotes)")


def test_a_component_config_that_is_no_json_object_is_named(tmp_path):
    """Before: a transformer config.json holding a JSON list said "We couldn't connect to 'https://huggingface.co'
    ... [1, 2] is not the path to a directory containing a config.json file", offline, for a local folder. Now the
    file is named with what it holds."""
    folder = _copy(tmp_path, lambda f: (f / "transformer" / "config.json").write_text("[1, 2]"))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder))
    assert str(err.value) == (f"{folder / 'transformer' / 'config.json'} holds a JSON list, not the transformer's "
                              f"config (a JSON object of its settings): copy or download {folder / 'transformer'} "
                              "again")


@pytest.mark.parametrize("kwargs, error, problem", [
    ({"device": "gpu"}, ValueError, r"device='gpu' is invalid: a torch device such as 'cpu', 'cuda' or 'cuda:1'"),
    ({"device": "xpu"}, ValueError, r"device='xpu' cannot be used here \(.*\); pass device='cpu'"),
    ({"offload": "no"}, TypeError, r"offload='no' is invalid: expected True or False"),
    ({"seed": "x"}, ValueError, r"seed='x' is invalid: the random seed, an int"),
])
@pytest.mark.parametrize("model", ["tiny-shapes", "tiny-wan"])
def test_load_pipeline_checks_where_it_loads_before_loading(model, kwargs, error, problem, monkeypatch):
    """Before: a device the machine lacks failed with a raw "Torch not compiled with CUDA enabled" (or "... XPU
    enabled", "Expected one of cpu, cuda, ... at start of device string: gpu") only after the whole model had loaded
    (minutes for a real one); ``offload="no"`` turned offloading on; ``seed="x"`` was a raw "invalid literal for
    int()". Now each is refused, naming the argument, before anything loads."""
    import dit_accel.models.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded before the arguments were checked")

    monkeypatch.setattr(loading, "_from_folder", no_loading)
    monkeypatch.setattr(loading, "build_tiny_pipeline", no_loading)
    with pytest.raises(error, match=problem):
        load_pipeline(model, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")
def test_load_pipeline_refuses_cuda_where_there_is_none_before_loading(monkeypatch):
    """Before: ``load_pipeline("tiny-shapes", device="cuda")`` on a machine without CUDA loaded the model, then
    failed in ``pipe.to`` with a raw ``AssertionError: Torch not compiled with CUDA enabled``."""
    import dit_accel.models.loading as loading

    monkeypatch.setattr(loading, "_from_folder", lambda *a, **k: pytest.fail("loaded before the device was checked"))
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device {device} but no CUDA device is visible here; pass "
                                             r"device='cpu'"):
            load_pipeline("tiny-shapes", device=device)


# ------------------------------------------------------------------ the shapes model's scoring
def test_score_video_refuses_frames_outside_zero_to_one():
    """Before: frames as floats in [0, 255] (or [-1, 1]) were scored as [0, 1] ones: a red circle moving left at
    0..255 was judged with the background's grey as a saturated object, and the scores were wrong without a word.
    Now such frames are refused with what to do; uint8 and [0, 1] floats score as before."""
    from dit_accel.models.clips import render_clip
    from dit_accel.models.groundtruth import score_video

    video = render_clip("red", "circle", "left", seed=0)
    prompt = "a red circle moving left"
    assert score_video(video, prompt)["all_ok"]
    for frames in (video * 255, video * 2 - 1):
        low, high = f"{frames.min():g}", f"{frames.max():g}"
        with pytest.raises(ValueError, match=rf"frames hold values from {low} to {high}; expected floats in "
                                             r"\[0, 1\] \(a pipeline's output_type='np'\): divide \[0, 255\] frames"):
            score_video(frames, prompt)
    assert score_video((video * 255).round().astype(np.uint8), prompt)["all_ok"]


class _NoPipe:
    def __call__(self, *args, **kwargs):
        raise AssertionError("generated before the arguments were checked")


@pytest.mark.parametrize("kwargs, problem", [
    ({"prompts": "a red circle moving left"}, r"prompts='a red circle moving left' is invalid: a non-empty list of "
                                              r"prompts such as \['a red circle moving right'\]"),
    ({"prompts": ["a red circle moving left", "a cat"]},
     r"prompts\[1\]: prompt 'a cat' does not follow 'a \{colour\} \{shape\} moving \{direction\}'"),
    ({"seeds": ()}, r"seeds=\(\) is invalid: a non-empty list of whole numbers >= 0"),
    ({"batch_size": 0}, r"batch_size=0 is invalid: the prompts per pipeline call, a whole number >= 1"),
])
def test_evaluate_checks_its_arguments_before_generating(kwargs, problem):
    """Before: ``evaluate(pipe, prompts="a red circle moving left")`` generated one video per character of the
    string, a prompt off the grammar was refused only after every video was made, ``seeds=()`` after the pipeline
    was loaded, and ``batch_size=0`` was a raw "range() arg 3 must not be zero". Now each is refused first."""
    from dit_accel.models.tiny_shapes import evaluate

    with pytest.raises(ValueError, match=problem):
        evaluate(_NoPipe(), **kwargs)


# ------------------------------------------------------------------ plan files under the home folder
def test_a_plan_path_under_the_home_folder_is_read_and_written_there(tmp_path, monkeypatch):
    """Before: ``plan.save("~/plans/plan.json")`` wrote ``./~/plans/plan.json`` (a folder named "~" in the working
    folder), and ``SparsePlan.load("~/plans/plan.json")`` read from there, not from the home folder where the rest
    of dit_accel (``load_pipeline``, ``generate --out``) reads "~". Now "~" is the home folder."""
    from dit_accel.plans.sparse_plan import Phase, SparsePlan

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    plan = SparsePlan([Phase(0, None, {1: dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3))})], num_layers=2)
    assert plan.save("~/plans/plan.json") == home / "plans" / "plan.json"
    assert (home / "plans" / "plan.json").is_file() and not (work / "~").exists()
    assert SparsePlan.load("~/plans/plan.json").content_hash() == plan.content_hash()


# ------------------------------------------------------------------ folders that are not one pipeline
def test_a_transformer_saved_alone_says_what_it_holds(tmp_path):
    """Before: a folder holding a transformer saved on its own (``transformer.save_pretrained(folder)``: config.json
    and weights, no pipeline above it) said only "is not a Diffusers pipeline folder (no model_index.json)", as for
    any folder. Now it names the class it holds and how to run it in its pipeline."""
    folder = tmp_path / "my-transformer"
    shutil.copytree(TRAINED_MODELS["tiny-shapes"] / "transformer", folder)
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder))
    assert str(err.value) == (
        f"{folder} holds a WanTransformer3DModel alone (its config.json and weights), not a Diffusers pipeline (no "
        "model_index.json): pass the pipeline folder or hub id it belongs to; to run these weights in that pipeline, "
        f"load it in Python with WanTransformer3DModel.from_pretrained({str(folder)!r}) as its component and pass "
        "the pipeline to dit_accel.apply")


def test_a_folder_of_pipeline_folders_names_them(tmp_path):
    """Before: ``--model models`` (the folder that holds ``models/wan``, ``models/flux``) said "is not a Diffusers
    pipeline folder", naming none of the pipelines in it. Now it names them."""
    for name in ("wan", "flux"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(tmp_path))
    assert str(err.value) == (f"{tmp_path} is not a Diffusers pipeline folder (no model_index.json); the pipeline "
                              f"folders in it: {tmp_path / 'flux'}, {tmp_path / 'wan'}: pass one of them")


# ------------------------------------------------------------------ the locality training term
def test_attention_locality_refuses_windows_for_another_head_count():
    """Before: ``AttentionLocality(transformer, Tile(..., window=<2 per-head windows>))`` on a 4-head model was
    accepted, and the first forward inside the block failed with a raw "The size of tensor a (4) must match the size
    of tensor b (2) at non-singleton dimension 1" (here 3 windows on the tiny Wan's 2 heads). Now the constructor
    names the method and the model's heads."""
    from dit_accel.models import tiny as T
    from dit_accel.models.attention_locality import AttentionLocality

    model = T.build_tiny_transformer("wan")
    heads = model.blocks[0].attn1.heads
    three = dit_accel.Tile(tile=(1, 2, 2), window=((1, 1, 1), (1, 1, 3), (1, 3, 3)))
    assert heads != 3
    with pytest.raises(ValueError, match=rf"method Tile\(.*\) has windows for 3 heads, but the attn1 layers of "
                                         rf"WanTransformer3DModel have {heads}: give one window per head"):
        AttentionLocality(model, three)
    AttentionLocality(model, dit_accel.Tile(tile=(1, 2, 2), window=((1, 1, 1),) * heads))


def test_a_model_index_component_that_is_no_library_class_pair_is_named(tmp_path):
    """Before: a model_index.json whose ``"transformer"`` entry was written ``"diffusers"`` (not ``["diffusers",
    "WanTransformer3DModel"]``) said "could not load the pipeline in ...: too many values to unpack (expected 2)",
    naming neither the file nor the entry. Now both are named, with the form an entry takes."""
    def edit(folder):
        index = json.loads((folder / "model_index.json").read_text())
        index["transformer"] = "diffusers"
        (folder / "model_index.json").write_text(json.dumps(index))

    folder = _copy(tmp_path, edit)
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder))
    assert str(err.value) == (f"{folder / 'model_index.json'}: transformer is \"diffusers\"; a component is named by "
                              "[library, class], such as [\"diffusers\", \"WanTransformer3DModel\"] ([null, null] for "
                              "none): write the entry so, or download the folder again")


@pytest.mark.parametrize("num_layers, problem", [
    ("4", r"'org/shapes' \(in the local Hugging Face cache\): could not load the transformer of the pipeline in .*: "
          r"'str' object cannot be interpreted as an integer; in .*config.json, num_layers: '4' is text"),
    (3, r"snapshots/0123456789abcdef/transformer: its weights hold 4 layers of blocks, and its config.json makes 3"),
])
def test_a_cached_hub_snapshot_whose_config_and_weights_disagree_is_one_line(num_layers, problem, tmp_path,
                                                                               monkeypatch):
    """Before: a hub id whose cached snapshot has a quoted number in its transformer config raised the raw
    TypeError, and one whose config names fewer layers than its weights loaded a model without the rest, silently.
    Now both are one ModelLoadError naming the snapshot's file or folder."""
    import huggingface_hub.constants

    root = tmp_path / "models--org--shapes"
    _edit_config("num_layers", num_layers)(shutil.copytree(TRAINED_MODELS["tiny-shapes"],
                                                            root / "snapshots" / "0123456789abcdef"))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=problem):
        load_pipeline("org/shapes")


def test_load_tiny_shapes_refuses_a_dtype_it_would_not_load():
    """Before: ``load_tiny_shapes(dtype="bf16")`` loaded float32 weights (Diffusers logged "Passed `dtype` bf16 is
    not a `torch.dtype`. Defaulting to `torch.float32`"), silently. Now it names the argument and what it takes."""
    from dit_accel.models.tiny_shapes import load_tiny_shapes

    for dtype in ("bf16", "float16", torch.int8):
        with pytest.raises(ValueError, match=rf"dtype={re.escape(repr(dtype))} is invalid: a floating torch.dtype "
                                             r"such as torch.bfloat16 \(None: float32\)"):
            load_tiny_shapes(dtype=dtype)
    assert load_tiny_shapes(dtype=torch.bfloat16).transformer.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, problem", [
    ({"seed": "x"}, r"seed='x' is invalid: the start position's random seed, an int"),
    ({"seed": 2.7}, r"seed=2.7 is invalid"),  # (taken as seed 2, without a word)
    ({"frames": 2.5}, r"frames=2.5 is invalid: a whole number \(frames >= 2, height and width >= 8\)"),
])
def test_render_clip_names_a_seed_or_size_that_is_no_whole_number(kwargs, problem):
    """Before: ``render_clip(..., seed="x")`` raised a raw "invalid literal for int()", ``seed=2.7`` rendered seed
    2's clip, and ``frames=2.5`` a raw ``linspace() received an invalid combination of arguments``."""
    from dit_accel.models.clips import render_clip

    with pytest.raises(ValueError, match=problem):
        render_clip("red", "circle", "left", **kwargs)
    assert render_clip("red", "circle", "left", seed=np.int64(3), frames=np.int64(3)).shape == (3, 48, 48, 3)


@pytest.mark.parametrize("n", ["8", 8.0, None])
def test_balanced_prompts_names_a_count_that_is_no_whole_number(n):
    """Before: ``balanced_prompts("8")`` raised a raw "TypeError: not all arguments converted during string
    formatting" (8.0: "'float' object cannot be interpreted as an integer"). Now the argument is named."""
    from dit_accel.models.tiny_shapes import balanced_prompts

    with pytest.raises(ValueError, match=rf"n={re.escape(repr(n))} is invalid: a multiple of 4 from 4 to 32"):
        balanced_prompts(n)
    assert len(balanced_prompts(8)) == 8
