"""Fine-tuning and weights folders: resuming on a pipeline with other weights, and more (round 12 of the input
audit)."""

import pytest
import torch

import dit_accel
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.plans.per_head import PerHead
from dit_accel.training import FinetuneConfig, finetune, load_method
from dit_accel.training.config import RUN_FILE
from tests.training import probe, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

SHAPE = dict(frames=9, height=64, width=128, max_sequence_length=16)  # token grid (3, 4, 8)


def _config(output, prompts, **kw):
    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(output), prompts=str(prompts),
                steps=1, lr=1e-3, rank=2, seed=0, progress=False, eval_batches=0, gradient_accumulation_steps=1,
                **SHAPE)
    return FinetuneConfig(**{**base, **kw})


def test_resume_on_a_pipeline_with_other_weights_is_refused_naming_both(prompts_file, tmp_path):
    """Before: a run on a pipeline passed as model= recorded no fingerprint of its weights ("model_sha256": null), so
    --resume on a pipeline holding other weights went on training adapters made for the first ones, silently."""
    out = tmp_path / "out"
    finetune(_config(out, prompts_file, model=build_tiny_pipeline("tiny-wan")))
    assert '"model_sha256": "sample:' in (out / RUN_FILE).read_text()
    other = build_tiny_pipeline("tiny-wan")
    with torch.no_grad():
        other.transformer.blocks[1].attn1.to_q.weight[3, 5] += 0.25  # one weight of another layer
    before = (out / RUN_FILE).read_bytes()
    with pytest.raises(ValueError, match=r"--resume: .* holds a different run \(the transformer weights of the "
                                         r"pipeline passed as model= are not those the run trained on \(fingerprint "
                                         r"sample:\w+ -> sample:\w+\)\)"):
        finetune(_config(out, prompts_file, model=other, steps=2, resume=True))
    assert (out / RUN_FILE).read_bytes() == before
    assert not getattr(other.transformer, "peft_config", None)
    # the same weights (a fresh copy), in bf16 as the run casts them, resume
    same = build_tiny_pipeline("tiny-wan")
    assert finetune(_config(out, prompts_file, model=same, steps=2, resume=True))["resumed_from"] == 1


@pytest.fixture(scope="module")
def tile_dense0(prompts_file, tmp_path_factory):
    """A Tile run with layer 0 dense (lr high enough that one step moves the output), and the trained output."""
    out = tmp_path_factory.mktemp("tile") / "out"
    result = finetune(_config(out, prompts_file, method=dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)),
                              dense_layers=[0], lr=5e-2))
    return out, probe(result["pipe"].transformer)


def test_weights_trained_with_dense_layers_refuse_to_run_those_layers_sparse(tile_dense0):
    """Before: apply(pipe, load_method(DIR), weights=DIR) on a folder trained with --dense-layers 0 ran layer 0 under
    Tile, silently (output off the trained model's by 0.16 where the LoRA moved it by 0.38); generate --weights
    passed the recorded layers, the documented one-liner did not."""
    out, trained = tile_dense0
    pipe = build_tiny_pipeline("tiny-wan")
    dense = probe(pipe.transformer)
    with pytest.raises(ValueError, match=r"trained with dense_layers=\[0\] \(dense attention there while the LoRA "
                                         r"learned\), but layer\(s\) \[0\] run tile here.*Pass dense_layers=\[0\] to "
                                         r"apply\(\)"):
        dit_accel.apply(pipe, load_method(out), weights=out)
    assert torch.equal(probe(pipe.transformer), dense)  # nothing stayed installed
    assert not getattr(pipe.transformer, "peft_config", None)
    with dit_accel.apply(pipe, load_method(out), weights=out, dense_layers=[0]):
        torch.testing.assert_close(probe(pipe.transformer), trained, rtol=0, atol=1e-6)


_PROVENANCE = dict(model_class="WanTransformer3DModel", model_id="tiny-wan", grids=[[3, 4, 8]], steps=6,
                   timesteps=[1000.0, 923.3425, 818.9233, 668.3267, 432.2251, 8.9286])


@pytest.mark.parametrize("entries", [
    None,  # no entries: every layer runs the phase's default, dense
    {0: PerHead((dit_accel.Dense(), dit_accel.Dense())), 1: dit_accel.Dense()},
    {0: dit_accel.Tile(tile=(1, 2, 2), window=(3, 2, 4)), 1: dit_accel.Dense()},  # the window covers (3, 4, 8)
], ids=["no-entries", "dense-heads", "tile-covering-the-grid"])
def test_a_plan_that_runs_dense_everywhere_is_refused_before_training(entries, prompts_file, tmp_path):
    """Before: finetune --plan on a plan that runs dense attention everywhere (a phase without entries, all heads
    dense, a Tile window covering the grid) trained the dense model: losses [0.0, 0.0], held-out 0.0 -> 0.0, and
    wrote a weights folder, where --method refuses a method that is dense on the grid."""
    from dit_accel import SparsePlan
    from dit_accel.plans.sparse_plan import Phase

    path = tmp_path / "plan.json"
    SparsePlan((Phase(0, None, entries or {}),), num_layers=2, num_heads=2, provenance=_PROVENANCE).save(path)
    pipe = build_tiny_pipeline("tiny-wan")
    dense = probe(pipe.transformer)
    with pytest.raises(ValueError, match=r"^--plan .*plan\.json runs dense attention at every layer, head and step "
                                         r"on token grid \(3, 4, 8\): fine-tuning would train the dense model"):
        finetune(_config(tmp_path / "out", prompts_file, model=pipe, method=None, plan=str(path)))
    assert not (tmp_path / "out").exists()
    assert torch.equal(probe(pipe.transformer), dense) and not getattr(pipe.transformer, "peft_config", None)


def test_an_output_inside_the_model_folder_is_refused_before_the_model_loads(prompts_file, tmp_path, capsys):
    """Before: --output inside the local --model folder trained and wrote there; the run's own files then changed the
    model's fingerprint (a hash of every file in its folder), so --resume was refused as "the files of --model ...
    changed", which they had not, and the run could only start again (--overwrite)."""
    from dit_accel.cli.main import main

    model = tmp_path / "model"
    build_tiny_pipeline("tiny-wan").save_pretrained(model)
    before = snapshot(model)
    capsys.readouterr()  # (save_pretrained's progress bar)
    code = main(["finetune", "--model", str(model), "--method", "sla", "--topk", "0.5", "--prompts",
                 str(prompts_file), "--output", str(model / "sla-ft"), "--steps", "1", "--quiet", "--frames", "9",
                 "--height", "64", "--width", "128", "--max-sequence-length", "16", "--eval-batches", "0",
                 "--gradient-accumulation-steps", "1", "--rank", "2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--output '{model / 'sla-ft'}' is inside the folder of --model {model}: the run's files would count " \
           "as the model's" in err and "Choose an --output outside the model's folder." in err
    assert snapshot(model) == before


def test_convert_overwrite_refuses_a_fine_tuning_run_folder(tile_dense0, tmp_path):
    """Before: convert_checkpoint(..., output=RUN, overwrite=True) (dit-accel convert --overwrite) into a fine-tuning
    run's folder replaced its trained weights and deleted its LoRA, and kept its run record, log and checkpoints, which
    described a training the folder no longer held; finetune --resume then wrote the run's weights back over the
    converted ones without a word."""
    from dit_accel.checkpoints.convert import convert_checkpoint
    from tests.training.test_inputs_round10_training import _turbo_state

    run, _ = tile_dense0
    path = tmp_path / "turbo.pth"
    torch.save(_turbo_state({}), path)
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"holds a fine-tuning run \(finetune_run\.json\): overwrite replaces a "
                                         r"weights folder only.*Give a new or empty folder"):
        convert_checkpoint(path, run, overwrite=True)
    assert snapshot(run) == before


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_the_pipeline_fingerprint_takes_tensors_it_cannot_read_by_name_and_shape():
    """The fingerprint is taken before anything else: a tensor type it cannot sample (a sparse or quantized one) or an
    offloaded (meta) tensor must not fail the run with a raw traceback; the readable weights still count."""
    from dit_accel.training.checkpoints import _pipe_fingerprint

    def fingerprint(pipe):
        return _pipe_fingerprint(FinetuneConfig(model=pipe), fresh=True)

    pipes = [build_tiny_pipeline("tiny-wan") for _ in range(3)]
    for pipe in pipes:
        pipe.transformer.register_buffer("odd", torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.ones(2), (3,)))
        pipe.transformer.register_buffer("offloaded", torch.empty(4, device="meta"))
    with torch.no_grad():
        pipes[2].transformer.blocks[0].attn1.to_k.weight[0, 0] += 1.0
    assert fingerprint(pipes[0]).startswith("sample:")
    assert fingerprint(pipes[0]) == fingerprint(pipes[1]) != fingerprint(pipes[2])
