"""Round 19: the leftovers of earlier rounds (each test failed before its fix)."""
import os

import pytest

from dit_accel.cli.main import build_parser


@pytest.mark.parametrize("flag, text", [("--dense-layers", "1x2"), ("--dense-layers", "0 x 3")])
def test_a_layer_list_with_an_x_is_refused_not_read_as_two_layers(capsys, flag, text):
    """Before: ``--dense-layers 1x2`` ran layers 1 and 2 dense (``x`` separates a grid's sizes, 6x8x8), for a typo
    of 1,2 or 12."""
    with pytest.raises(SystemExit) as exc:
        build_parser("generate").parse_args(["generate", "--model", "tiny-wan", flag, text])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "separate them by commas" in err
    assert build_parser("generate").parse_args(["generate", flag, "1,2"]).dense_layers == [1, 2]


def test_calibrate_seeds_refuse_an_empty_item():
    """Before: ``--seeds 0,,1`` dropped the empty item (two seeds where three were meant, a value left out)."""
    import argparse

    from dit_accel.cli.calibrate import _int_list

    assert _int_list("0,1") == [0, 1]
    for text in ("0,,1", "1x2"):
        with pytest.raises(argparse.ArgumentTypeError):
            _int_list(text)


# ------------------------------------------------------------------ save_pretrained: model, gates and LoRA as one set
def test_save_pretrained_of_a_vsa_model_with_a_lora_keeps_its_gates(tmp_path):
    """Before: the weights folder (the LoRA) came in a second commit after the model and its gates, and that commit
    removed the gates file (same name) the first had written: the saved copy ran VSA without its gates, 0.30 off
    the model that was saved."""
    import torch
    from peft import LoraConfig

    import dit_accel
    from dit_accel.checkpoints.vsa_gates import GATES_FILE
    from dit_accel.models import tiny as T
    from tests.pipelines.test_vsa_gates import GRID, _gated_checkpoint, _load

    _gated_checkpoint(tmp_path / "ckpt")
    model = _load(tmp_path / "ckpt")
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"], init_lora_weights=False))
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID)
    method = dit_accel.VSA(topk=2)
    with dit_accel.apply(model, method, backend="torch"), torch.no_grad():
        want = model(**kwargs)[0]
        model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / GATES_FILE).is_file()
    again = _load(tmp_path / "saved")
    with dit_accel.apply(again, method, backend="torch", weights=tmp_path / "saved") as handle, torch.no_grad():
        assert len(handle.vsa_gates) == 2
        torch.testing.assert_close(again(**kwargs)[0], want, rtol=0, atol=0)


def save_lora_model(folder, seed: int) -> None:
    """The tiny Wan transformer of ``seed`` with a LoRA of ``seed``, saved to ``folder`` while Tile is applied."""
    import torch
    from peft import LoraConfig

    import dit_accel
    from dit_accel.models.tiny import build_tiny_transformer

    model = build_tiny_transformer("wan", seed=seed)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    with dit_accel.apply(model, dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), backend="torch"):
        model.save_pretrained(folder)


# write points of a save: 6 lay between the model's commit and the weights folder's (where a kill left the new model
# beside the older LoRA), 12 lies after the one commit's point, in its renames (15 write points in all)
KILL_POINTS = (6, 12)


def test_a_save_pretrained_killed_half_way_leaves_one_saves_model_and_lora(tmp_path):
    """Before: the model (with its gates) and the weights folder (the LoRA, the method) were two commits, so a kill
    between them left the new model beside the older save's LoRA, which apply(weights=) then ran on it. Now one
    commit: a kill before its point leaves the first save's model and LoRA, after it the second's (finished by the
    first dit_accel reader, as the gates were)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from dit_accel.checkpoints.finetuned import read_weights_info

    folder = tmp_path / "x"
    code = "import sys; from tests.test_inputs_round19_leftovers import save_lora_model as s; s(sys.argv[1], 2)"

    def killed_save(kill_at):
        env = dict(os.environ, PYTHONPATH=os.getcwd(), DIT_ACCEL_TEST_KILL_AT=str(kill_at))
        run = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == -9, (kill_at, run.stderr[-2000:])  # SIGKILL at the write point

    def state():  # read as dit_accel's readers do: a save killed after its commit point is finished first
        read_weights_info(folder)
        return (load_file(str(folder / "diffusion_pytorch_model.safetensors")),
                load_file(str(folder / "pytorch_lora_weights.safetensors")))

    save_lora_model(folder, 2)
    model_b, lora_b = state()
    for kill_at in KILL_POINTS:
        save_lora_model(folder, 1)
        model_a, lora_a = state()
        killed_save(kill_at)
        model, lora = state()
        same_a = all(torch_equal(model[k], model_a[k]) for k in model_a)
        same_b = all(torch_equal(model[k], model_b[k]) for k in model_b)
        assert same_a != same_b, kill_at
        assert all(torch_equal(lora[k], (lora_a if same_a else lora_b)[k]) for k in lora), kill_at


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_the_dense_cache_is_kept_per_gpu_model(monkeypatch):
    """Before: the dense cache key held the device type only, so a cache shared by two GPUs (a network home) gave an
    H100 run the dense times an A100 measured, and every speed-up of the report was against them."""
    import torch

    from dit_accel.eval import runner

    settings = runner.EvalSettings(model="tiny-wan", prompts=["a"], device="cuda")
    names = iter(["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    a100, h100, again = (runner.dense_cache_key(settings, "a", 0, model_sha256="state:x") for _ in range(3))
    assert a100 != h100 == again


def test_an_unfinished_finetune_run_given_as_weights_is_told_to_resume(tmp_path):
    """Before: ``weights=`` of an interrupted first run's output said "has no dit_accel_method.json; is it the output
    folder of `dit-accel finetune`?" of a folder that is one, not finished. Reported by the training helper."""
    import pytest

    from dit_accel.checkpoints.finetuned import RUN_FILE as FOLDER_RUN_FILE
    from dit_accel.checkpoints.finetuned import read_weights_info
    from dit_accel.training.config import CKPT_DIR, RUN_FILE

    assert RUN_FILE == FOLDER_RUN_FILE
    (tmp_path / RUN_FILE).write_text("{}")
    (tmp_path / CKPT_DIR).mkdir()
    with pytest.raises(ValueError, match=r"has not finished .* finetune --resume --output"):
        read_weights_info(tmp_path)


def test_a_plan_fits_a_subclass_of_the_transformer_class_it_was_calibrated_for():
    """Before: a plan calibrated for WanTransformer3DModel was refused on a user's subclass of it ("was calibrated for
    WanTransformer3DModel; this pipeline's transformer is MyWan"), which runs the same layers. Another class is still
    refused. Reported by the models helper."""
    import pytest
    import torch
    from diffusers import WanTransformer3DModel

    import dit_accel
    from dit_accel.models import tiny as T
    from dit_accel.plans.sparse_plan import Phase, SparsePlan

    class MyWan(WanTransformer3DModel):
        pass

    base = T.build_tiny_transformer("wan")
    model = MyWan(**T.TRANSFORMERS["wan"].config).eval()
    model.load_state_dict(base.state_dict())
    tile = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
    plan = SparsePlan((Phase(0, None, default=tile),), provenance={"model_class": "WanTransformer3DModel"})
    kwargs = T.tiny_transformer_inputs("wan", model, grid=(2, 8, 8))
    with torch.no_grad():
        with dit_accel.apply(model, plan, backend="torch") as handle:
            handle.set_step(0, 1)
            got = model(**kwargs)[0]
        with dit_accel.apply(base, tile, backend="torch"):
            want = base(**kwargs)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    other = SparsePlan((Phase(0, None, default=tile),), provenance={"model_class": "FluxTransformer2DModel"})
    with pytest.raises(ValueError, match="calibrated for FluxTransformer2DModel"):
        dit_accel.apply(model, other, backend="torch")
