"""Round 12 (second wave), the CLI's user experience: refusals that came only after the model had loaded (minutes on a
real model) and did not name the flag, each with the test that failed before."""

from __future__ import annotations

import pytest

from dit_accel.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"dit-accel {command}: "), err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """A check that is meant to come before the model: loading one fails the test."""
    from dit_accel.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


def _shapes_folder() -> str:
    from dit_accel.models.tiny_shapes import TRAINED_MODELS

    return str(TRAINED_MODELS["tiny-shapes"])


# ----------------------------------------------------------------------------- sizes off the pipeline's multiple
@pytest.mark.parametrize("model", ["tiny-shapes", "folder"])
def test_generate_refuses_a_size_off_wans_multiple_before_loading(model, tmp_path, capsys, no_model_load):
    """Before: ``generate --height 50 --width 54`` on a Wan folder loaded the model, then failed with Diffusers'
    "`height` and `width` have to be divisible by 16 but are 50 and 54.", which names neither flag."""
    model = _shapes_folder() if model == "folder" else model
    assert main(["generate", "--model", model, "--height", "50", "--width", "54", "--out",
                 str(tmp_path / "x.mp4")]) == 2
    line = _one_line(capsys, "generate")
    assert "--height 50 --width 54: WanPipeline takes only heights and widths that are multiples of 16" in line
    assert line.endswith("give --height 48 or 64, --width 48 or 64")
    assert list(tmp_path.iterdir()) == []


def test_only_the_flag_off_the_multiple_is_named(tmp_path, capsys, no_model_load):
    assert main(["generate", "--model", "tiny-shapes", "--width", "40", "--out", str(tmp_path / "x.mp4")]) == 2
    line = _one_line(capsys, "generate")
    assert "--width 40: WanPipeline" in line and "--height" not in line and line.endswith("give --width 32 or 48")


def test_eval_and_calibrate_refuse_it_before_loading(tmp_path, capsys, no_model_load):
    """Before: both loaded the model (and eval ran its dense row's set-up) before the pipeline refused the size."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\n")
    assert main(["eval", "--model", "tiny-shapes", "--height", "56", "--out", str(tmp_path / "e")]) == 2
    assert _one_line(capsys, "eval").endswith("--height 56: WanPipeline takes only heights and widths that are "
                                              "multiples of 16 (its VAE and patches); give --height 48 or 64")
    assert main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "20", "--width",
                 "8", "--out", str(tmp_path / "plan.json")]) == 2
    assert _one_line(capsys, "calibrate").endswith("give --width 16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def _pipeline_refuses(pipe, height: int, width: int) -> bool:
    """Whether the pipeline's own call refuses the size (independently of dit_accel's check): one step, tiny."""
    import inspect

    import torch

    call = {"height": height, "width": width, "num_inference_steps": 2, "output_type": "np",
            "generator": torch.Generator().manual_seed(0), "max_sequence_length": 16}
    if "num_frames" in inspect.signature(pipe.__call__).parameters:
        call["num_frames"] = 5
    try:
        pipe("a cat", **call)
    except ValueError as err:
        assert any(w in str(err) for w in ("divisible", "multiples")), err
        return True
    return False


@pytest.mark.parametrize("model, multiple", [("tiny-wan", 16), ("tiny-cogview4", 16), ("tiny-sd3", 4),
                                             ("tiny-minimax-h3", 16), ("tiny-wan-vace", 16), ("tiny-flux", None),
                                             ("tiny-qwenimage", None)])
def test_the_check_after_loading_agrees_with_each_tiny_familys_pipeline(model, multiple):
    """Refused where the pipeline itself refuses (naming the flags and sizes it takes, which it then takes); a
    pipeline that rounds a size itself (FLUX, Qwen-Image) is not refused."""
    from dit_accel.models.loading import size_error
    from dit_accel.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    off = 32 + 2
    problem = size_error(pipe, {"height": off, "width": 32})
    assert (problem is not None) == (multiple is not None) == _pipeline_refuses(pipe, off, 32)
    if multiple is not None:
        below, above = off // multiple * multiple, (off // multiple + 1) * multiple
        assert problem.startswith(f"--height {off}: {type(pipe).__name__} takes only heights and widths that are "
                                  f"multiples of {multiple}") and problem.endswith(f"give --height {below} or {above}")
        assert not _pipeline_refuses(pipe, below, 32) and size_error(pipe, {"height": below, "width": 32}) is None


def test_finetune_refuses_it_before_loading(tmp_path, capsys, no_model_load):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\n")
    assert main(["finetune", "--model", "tiny-shapes", "--method", "sla", "--height", "50", "--prompts", str(prompts),
                 "--output", str(tmp_path / "ft")]) == 2
    assert _one_line(capsys, "finetune").endswith("--height 50: WanPipeline takes only heights and widths that are "
                                                  "multiples of 16 (its VAE and patches); give --height 48 or 64")
    assert not (tmp_path / "ft").exists()


# ----------------------------------------------------------------------------- --plan-any-grid with plan-trained weights
def _plan_weights() -> str:
    from dit_accel.models.tiny_shapes import shapes_model

    return str(shapes_model("tiny-shapes-63").plan_weights)


@pytest.fixture(scope="module")
def sla_weights(tmp_path_factory):
    """A tiny-wan SLA(topk=0.4) weights folder (tiny-wan's grid-sized SLA setting), LoRA on to_q."""
    import dit_accel
    from peft import LoraConfig

    from dit_accel.checkpoints.finetuned import save_trained_weights
    from dit_accel.models.tiny import build_tiny_transformer

    folder = tmp_path_factory.mktemp("sla_weights")
    model = build_tiny_transformer("wan")
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False)
    with dit_accel.apply(model, dit_accel.SLA(topk=0.4), backend="torch") as handle:
        model.add_adapter(lora)
        save_trained_weights(folder, transformer=model, method=dit_accel.SLA(topk=0.4), lora_config=lora,
                             sla_projections=handle.sla_projections())
    return str(folder)


def test_generate_runs_plan_trained_weights_at_another_size_with_plan_any_grid(tmp_path, capsys):
    """Before: at another size the refusal said "pass allow_other_grid=True (CLI: --plan-any-grid)", and
    ``--weights DIR --plan-any-grid`` was then refused: "--plan-any-grid applies to --plan: drop it"."""
    import json

    out = tmp_path / "x.png"
    assert main(["generate", "--model", "tiny-shapes-63", "--weights", _plan_weights(), "--plan-any-grid", "--frames",
                 "1", "--height", "16", "--width", "16", "--backend", "torch", "--no-compare-dense", "--quiet",
                 "--out", str(out)]) == 0
    record = json.loads((tmp_path / "x.png.json").read_text())
    assert record["schedule"]["allow_other_grid"] is True
    assert any("running it anyway (allow_other_grid)" in w for w in record["warnings"])


def test_plan_any_grid_with_weights_not_trained_under_a_plan_is_refused(sla_weights, tmp_path, capsys, no_model_load):
    assert main(["generate", "--model", "tiny-wan", "--weights", sla_weights, "--plan-any-grid", "--out",
                 str(tmp_path / "x.mp4")]) == 2
    assert _one_line(capsys, "generate").endswith(f"--plan-any-grid applies to a plan, and --weights {sla_weights} "
                                                  "was trained for SLA(topk=0.4, negligible=0.0, block_q=64, "
                                                  "block_k=64, feature_map='softmax', linear_tokens='marginal', "
                                                  "rounding='ceil', linear_eps=1e-06), not under a plan: drop "
                                                  "--plan-any-grid")
    assert main(["eval", "--model", "tiny-wan", "--weights", sla_weights, "--plan-any-grid", "--out",
                 str(tmp_path / "e")]) == 2
    assert "--plan-any-grid applies to --plan or a --weights folder trained under a plan" in _one_line(capsys, "eval")


def test_eval_takes_plan_any_grid_for_plan_trained_weights(tmp_path, no_model_load):
    from dit_accel.cli.eval import _weights_spec

    assert _weights_spec(_plan_weights(), "tiny-shapes-63", True).apply_kwargs == {"weights": _plan_weights(),
                                                                                  "allow_other_grid": True}
    with pytest.raises(AssertionError, match="the model was loaded"):  # past every check, to the loading
        main(["eval", "--model", "tiny-shapes-63", "--methods", "dense", "--weights", _plan_weights(),
              "--plan-any-grid", "--frames", "1", "--out", str(tmp_path / "e")])


# ----------------------------------------------------------------------------- weights in a --method-config row
def test_a_method_config_row_with_other_weights_is_refused_in_cli_words(sla_weights, tmp_path, capsys,
                                                                        no_model_load):
    """Before: the row failed after the model had loaded and the dense rows had run, with apply()'s Python advice:
    "Apply the saved method: dit_accel.apply(pipe, dit_accel.load_method('...'), weights=...)"."""
    import json

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"sla": {"topk": 0.2, "weights": sla_weights}}))
    assert main(["eval", "--model", "tiny-wan", "--methods", "sla", "--method-config", str(config), "--out",
                 str(tmp_path / "e")]) == 2
    line = _one_line(capsys, "eval")
    assert line.startswith("dit-accel eval: --method-config: row sla runs SLA(topk=0.2, ") and "dit_accel." not in line
    assert f"with weights {sla_weights}, which were trained for SLA(topk=0.4, " in line
    assert line.endswith(f"give that row the settings they were trained with, or pass the folder as --weights "
                         f"{sla_weights} instead (a row that runs its own method)")
    assert not (tmp_path / "e").exists()
    config.write_text(json.dumps({"sla": {"topk": 0.4, "weights": sla_weights}}))  # its own setting: it runs
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["eval", "--model", "tiny-wan", "--methods", "sla", "--method-config", str(config), "--out",
              str(tmp_path / "e")])


# ----------------------------------------------------------------------------- help texts
def test_finetune_help_offers_no_dense_method_and_no_denoising_step_flags(capsys):
    """Before: ``finetune --help`` said "dense runs through the same path as a baseline" and listed --dense-steps and
    --dense-last-steps, all three refused when given ("--method dense has nothing to adapt to")."""
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "as a baseline" not in text and "--dense-steps" not in text and "--dense-last-steps" not in text
    assert "dense has nothing to adapt to" in text and "--dense-layers" in text


# ----------------------------------------------------------------------------- flags the pipeline class refuses
def _index_only_folder(tmp_path, class_name: str) -> str:
    """A folder whose model_index.json names ``class_name`` and holds nothing else: loading it fails, so a refusal
    that names the flag can only have come before loading."""
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    return str(folder)


@pytest.mark.parametrize("argv, said", [
    (["--frames", "9"], "--frames 9: FluxPipeline generates images; drop --frames"),
    (["--negative-prompt", "blurry"], "--negative-prompt: FluxPipeline uses a negative prompt only with "
                                      "true_cfg_scale > 1")])
def test_flags_a_pipeline_class_refuses_are_refused_before_loading(argv, said, tmp_path, capsys):
    """Before: a FLUX folder given --frames (or a negative prompt it would ignore) loaded the whole model first (minutes
    on FLUX.1-dev), and only then said so."""
    assert main(["generate", "--model", _index_only_folder(tmp_path, "FluxPipeline"), *argv, "--out",
                 str(tmp_path / "x.png")]) == 2
    assert said in _one_line(capsys, "generate")


def test_an_image_for_a_text_to_video_folder_is_refused_before_loading(tmp_path, capsys, no_model_load):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "i.png")
    assert main(["generate", "--model", "tiny-shapes", "--image", str(tmp_path / "i.png"), "--out",
                 str(tmp_path / "x.mp4")]) == 2
    assert _one_line(capsys, "generate").endswith("WanPipeline takes no input image: use an image-to-video pipeline "
                                                  "such as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers, or drop --image")


@pytest.mark.parametrize("saved, flags, refused", [
    (dict(tile=(1, 2, 2), window=3), ["--window", "3,3,3"], None),
    (dict(tile=(6, 8, 8), window=(3, 3, 3), fit=True), ["--tile", "6,8,8"], None),
    (dict(tile=(1, 2, 2), window=(3, 3, 3)), ["--fit-grid"], "--fit-grid"),
    (dict(tile=(1, 2, 2), window=(3, 3, 3)), ["--window", "1,3,3"], "--window"),
], ids=["window-spelt-out", "fit-folder-tile-repeated", "fit-added", "window-changed"])
def test_method_flags_beside_weights_are_compared_as_apply_compares_them(saved, flags, refused):
    """``generate --weights DIR`` compared the flags' method with ``to_dict() ==``: ``--window 3,3,3`` was refused
    beside a folder trained with ``--window 3``; ``--tile`` repeating a fit=True folder's tile said "--fit disagree"
    (no such flag); ``--fit-grid`` beside a folder without it named no option at all."""
    import dit_accel
    from dit_accel.cli.generate_args import _method_for_weights, _UsageError
    from dit_accel.cli.main import build_parser

    folder = dit_accel.Tile(**saved)
    args = build_parser("generate").parse_args(["generate", "--weights", "w", *flags])
    args.method = "tile"
    if refused is None:
        assert _method_for_weights(args, folder, None) is folder
    else:
        with pytest.raises(_UsageError, match=rf"^method options {refused} disagree with --weights w"):
            _method_for_weights(args, folder, None)


def test_a_method_config_row_reads_the_folders_method_as_apply_does(tmp_path, capsys, no_model_load):
    """The row's check compared the method file's raw dict: a VSA folder trained at the default sparsity (recorded
    as null) was refused beside ``{"vsa": {"sparsity": 0.8, ...}}``, the sparsity that runs, which apply() takes."""
    import json

    import dit_accel
    from peft import LoraConfig

    from dit_accel.checkpoints.finetuned import save_trained_weights
    from dit_accel.models.tiny import build_tiny_transformer

    folder = tmp_path / "vsa"
    model = build_tiny_transformer("wan")
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False)
    model.add_adapter(lora)
    save_trained_weights(folder, transformer=model, method=dit_accel.VSA(), lora_config=lora)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"vsa": {"sparsity": 0.8, "weights": str(folder)}}))
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["eval", "--model", "tiny-wan", "--methods", "vsa", "--method-config", str(config), "--out",
              str(tmp_path / "e")])
