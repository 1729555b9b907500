"""apply() beside what users do (round 11): a pipeline whose second transformer is not ``transformer_2``, a failed
apply() and its capture folder, plans (VSA entries, entries for another grid rank, on a bare transformer, as one
layer's method), head counts named ``num_heads``, and the tiny model family's training run. Tiny models on the CPU;
each test names what was wrong before its fix."""

import contextlib

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.plans.per_head import PerHead
from tests.utils import ReferenceAttention, method_mask

TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))  # on tiny-wan's (4, 8, 8) transformer grid
WAN_GRID = T.TRANSFORMER_GRIDS["wan"]


# ------------------------------------------------------------------ Ideogram 4's unconditional transformer
class _GuidedPipeline:
    """Ideogram 4's denoising loop in miniature: the conditional pass on ``transformer``, the unconditional one on
    ``unconditional_transformer``, both inside the pipeline's ``__call__``; ``reference(step)`` is entered around
    each step's calls (the expected output, written out step by step)."""

    def __init__(self, transformer, unconditional_transformer):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer, self.unconditional_transformer = transformer, unconditional_transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler()

    @torch.no_grad()
    def __call__(self, steps, reference=lambda step: contextlib.nullcontext()):
        inputs = T.tiny_transformer_inputs("wan", self.transformer)
        x = inputs["hidden_states"]
        self.scheduler.set_timesteps(steps)
        for step, t in enumerate(self.scheduler.timesteps):
            call = dict(inputs, hidden_states=x, timestep=t.expand(x.shape[0]))
            with reference(step):
                cond = self.transformer(**call)[0]
                uncond = self.unconditional_transformer(**call)[0]
            x = self.scheduler.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
        return x


def test_the_unconditional_transformer_reads_the_step_of_the_pipeline_calling_it():
    """Before: the step of a call was read from the calling pipeline's scheduler only for ``transformer`` and
    ``transformer_2``. Ideogram 4's ``unconditional_transformer`` fell back to the applied pipeline's scheduler: a
    second pipeline over the same transformers with its own scheduler (as docs/reliability.md advises per thread)
    ran its unconditional pass sparse at step 0 under dense_steps=1 (3 sparse calls per layer, 0 dense), and
    apply() to the bare unconditional transformer refused every pipeline call for want of a scheduler. Now every
    call of that transformer has the step of the pipeline making it: the masked-dense reference, step by step."""
    first = _GuidedPipeline(T.build_tiny_transformer("wan", seed=0), T.build_tiny_transformer("wan", seed=1))
    second = _GuidedPipeline(first.transformer, first.unconditional_transformer)  # the same models, its own scheduler
    mask = method_mask(TILE, WAN_GRID)
    want = second(3, lambda step: ReferenceAttention(mask, "none") if step else contextlib.nullcontext())
    with dit_accel.apply(first, TILE, backend="torch", dense_steps=1) as handle:
        got = second(3)
        rows = handle.stats()
    assert [(row["sparse_calls"], row["dense_calls"]) for row in rows] == [(2, 1)] * 4
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with dit_accel.apply(first.unconditional_transformer, TILE, backend="torch", dense_steps=1) as handle:
        first(3)
        assert [(row["sparse_calls"], row["dense_calls"]) for row in handle.stats()] == [(2, 1)] * 2


# ------------------------------------------------------------------ a failed apply() and its capture folder
def test_a_failed_apply_leaves_no_capture_folder_behind(tmp_path):
    """Before: apply(model, plan_of_another_model, capture="caps/run1") raised its ValueError but left the folders
    caps/ and caps/run1/ created (the capture folder was made before the plan was checked against the model). Now a
    failed apply() removes the folders it made, and keeps one the user made."""
    from dit_accel.plans.sparse_plan import SparsePlan

    model = T.build_tiny_transformer("wan")
    mine = tmp_path / "mine"
    mine.mkdir()
    for capture, kwargs in ((tmp_path / "caps" / "run1", {}), (mine, {}), (tmp_path / "new", dict(dense_layers=[5]))):
        with pytest.raises(ValueError, match="3 attention layers|dense_layers has layer indices 5"):
            dit_accel.apply(model, SparsePlan((), num_layers=3) if not kwargs else TILE, capture=capture, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and not any(mine.iterdir())
    assert not model._forward_pre_hooks



def test_capture_layers_beside_a_capture_observer_are_refused_not_ignored():
    """Before: apply(model, TILE, capture=observer, capture_layers=[0]) took capture_layers and ignored it: the
    observer (an object with wants/save, as calibration passes) was asked about, and saved, layer 1 too. Now it is a
    ValueError saying that the observer chooses its layers and steps, and the model stays as it was."""

    class Observer:
        def __init__(self):
            self.saved = []

        def wants(self, layer, step):
            return True

        def save(self, layer, name, grid, step, q, k, v, heads=None):
            self.saved.append((layer, step))

    model, observer = T.build_tiny_transformer("wan"), Observer()
    for kwargs in (dict(capture_layers=[0]), dict(capture_steps=[0])):
        with pytest.raises(ValueError, match=r"^capture_layers/capture_steps choose what a capture folder saves; the "
                                             r"observer Observer chooses its own layers and steps"):
            dit_accel.apply(model, TILE, backend="torch", capture=observer, **kwargs)
    assert not model._forward_pre_hooks and not observer.saved
    with dit_accel.apply(model, TILE, backend="torch", capture=observer), torch.no_grad():  # (an observer alone: taken)
        model(**T.tiny_transformer_inputs("wan", model))
    assert observer.saved == [(0, 0), (1, 0)]


# ------------------------------------------------------------------ a plan of VSA on a sparse-distilled checkpoint
def test_a_plan_that_runs_vsa_runs_the_checkpoints_gates(tmp_path):
    """Before: apply(model, plan) with VSA in the plan's phases ignored the checkpoint's to_gate_compress gates (only a
    VSA config given as the method loaded them): the model ran the fine branch alone, 0.3 away from the gated
    reference, with a warning that the plan "does not use" the gates. Now its VSA layers run the gates, as the float64
    reference computed by hand (tests/pipelines/test_vsa_gates.py) does."""
    from dit_accel.plans.sparse_plan import Phase, SparsePlan
    from tests.pipelines.test_vsa_gates import GRID, _gated_checkpoint, _load, _reference

    gates = _gated_checkpoint(tmp_path)
    model = _load(tmp_path)
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID)
    vsa = dit_accel.VSA(topk=2)
    want = _reference(model, kwargs, gates, 2, vsa.tile)
    plan = SparsePlan((Phase(0, None, default=vsa),), num_layers=2)
    with dit_accel.apply(model, plan, backend="torch") as handle, torch.no_grad():
        handle.set_step(0, 1)
        got = model(**kwargs)[0]
        assert handle.vsa_gates == {"blocks.0.attn1": str(tmp_path), "blocks.1.attn1": str(tmp_path)}
        assert not any("does not use" in w for w in handle.warnings)
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ a plan's entries and the model's grid
@pytest.mark.parametrize("entry, said", [
    (dit_accel.Radial(), r"^dit_accel: method 'radial' needs a video's \(T, H, W\) token grid, but the sparse calls of "
                         r"FluxTransformer2DModel see a 2-D \(H, W\) token grid\..* \(the plan runs it: calibrate a "
                         r"plan for this model\)$"),
    (dit_accel.VSA(), r"^dit_accel: method 'vsa' needs a video's .* \(the plan runs it"),
    (PerHead((dit_accel.Tile(tile=(1, 4, 4), window=1), dit_accel.Dense())),
     r"^dit_accel: Tile's tile=\(1, 4, 4\) is for a 3-D token grid, but the sparse calls of FluxTransformer2DModel"
     r".* \(the plan runs it"),
])
def test_a_plan_whose_entries_need_another_grid_is_refused_by_apply(entry, said):
    """Before: apply(flux, plan) with Radial, VSA or a 3-D tile in the plan's phases (or in a PerHead's heads)
    passed apply() (only a plain config was checked against the model's grid) and failed at the first transformer
    call, in the middle of a pipeline run, with the handle left applied. Now apply() refuses it, naming the plan,
    and the model stays as it was; the same config given as the method was refused this way already."""
    from dit_accel.plans.sparse_plan import Phase, SparsePlan

    model = T.build_tiny_transformer("flux")
    processors = {name: id(p) for name, p in model.attn_processors.items()}
    with pytest.raises(ValueError, match=said):
        dit_accel.apply(model, SparsePlan((Phase(0, 2), Phase(2, None, {1: entry}))))
    if isinstance(entry, PerHead):
        with pytest.raises(ValueError, match=r"^dit_accel: Tile's tile=\(1, 4, 4\) is for a 3-D token grid.* \(head 0 "
                                             r"of the PerHead config runs it\)$"):
            dit_accel.apply(model, entry)
    assert {name: id(p) for name, p in model.attn_processors.items()} == processors and not model._forward_pre_hooks


def test_a_plan_on_a_bare_transformer_without_a_step_says_the_plan_needs_it():
    """Before: a SparsePlan applied to a bare transformer, called without a scheduler or set_step, was refused with
    "dense_steps/dense_last_steps/capture_steps and per-step methods (Tile.from_strategy) need the denoising step",
    naming none of what the user gave. Now the message names a SparsePlan among them."""
    from dit_accel.plans.sparse_plan import Phase, SparsePlan

    model = T.build_tiny_transformer("wan")
    with dit_accel.apply(model, SparsePlan((Phase(0, None, default=TILE),)), backend="torch"):
        with pytest.raises(ValueError, match=r"per-step methods \(a SparsePlan, Tile.from_strategy\) need the "
                                             r"denoising step: .* or call handle.set_step\(i, total\)"):
            model(**T.tiny_transformer_inputs("wan", model))


# ------------------------------------------------------------------ head counts named num_heads
@pytest.mark.parametrize("name", ["kandinsky5", "ideogram4"])
def test_head_counts_are_checked_on_models_whose_attention_says_num_heads(name):
    """Before: the head count was read from the attention module's ``heads`` only; Kandinsky 5/6, Krea 2 and Ideogram
    4 name it ``num_heads``, so on them a plan for 3 heads (num_heads=3) and a Tile with per-head windows for 1 head
    passed apply() on a 2-head model and ran (the one window on every head), unsaid. Now both are refused at apply,
    naming both head counts, and the model stays as it was."""
    from dit_accel.plans.sparse_plan import SparsePlan

    model = T.build_tiny_transformer(name)
    dims = len(T.TRANSFORMER_GRIDS[name])
    one_head = dit_accel.Tile(tile=(2,) * dims, window=((1,) * dims,))
    with pytest.raises(ValueError, match=r"^the plan is for 3 heads per attention layer; this model's layers have 2"):
        dit_accel.apply(model, SparsePlan((), num_heads=3))
    with pytest.raises(ValueError, match=rf"^Tile has windows for 1 heads per layer, but {type(model).__name__}'s "
                                         r"attention layers run 2 heads"):
        dit_accel.apply(model, one_head)
    assert not model._forward_pre_hooks


def test_a_plan_given_as_one_layers_method_is_refused_naming_what_to_do():
    """Before: layer_methods={0: plan} was refused as "must be a dit_accel method config (...); got SparsePlan. Try
    dit_accel.Tile(...)", which does not say that a plan is given as the method; and layer_methods={0:
    plan.as_method()} was taken, running the plan's layer numbers on layer 0 with none of its checks (layers, heads,
    grid, steps). Now both are one line saying to pass the plan as the method, and the model stays as it was."""
    from dit_accel.plans.sparse_plan import Phase, SparsePlan

    model = T.build_tiny_transformer("wan")
    plan = SparsePlan((Phase(0, None, default=TILE),), num_layers=5)  # (for another model: 5 layers)
    for given in (plan, plan.as_method()):
        with pytest.raises(TypeError, match=r"^layer_methods\[0\] is a SparsePlan: a plan is the schedule of every "
                                            r"layer .* pass it as the method, dit_accel.apply\(pipe, plan\)"):
            dit_accel.apply(model, TILE, layer_methods={0: given})
    assert not model._forward_pre_hooks


# ------------------------------------------------------------------ the tiny model family's training run
@pytest.mark.parametrize("flag, value, said", [
    ("--batch-size", "0", "--batch-size must be a whole number in [1, inf) (clips per step), got 0"),
    ("--steps", "-1", "--steps must be a whole number in [1, inf) (the training steps), got -1"),
    ("--ema-decay", "1.5", "--ema-decay must be a number in [0.0, 1.0) (the weight of the moving average's past; 1 "
                           "would never move), got 1.5"),
    ("--local-weight", "nan", "--local-weight must be a number in [0.0, inf) (the weight of the --local term), got nan"),
    ("--locality-queries", "0", "--locality-queries must be a whole number in [1, inf) (queries sampled per "
                                "attention call), got 0"),
])
def test_train_tiny_refuses_numbers_out_of_range_in_one_line_writing_nothing(flag, value, said, tmp_path, capsys):
    """Before: ``python -m dit_accel.models.train_tiny`` took any number: --batch-size 0 and --locality-queries 0 (with
    --locality) ended in a raw traceback (IndexError, ValueError) after the model was built; --steps -1 saved the
    untrained model and --ema-decay 1.5 a diverged average of the weights, exit 0, unsaid. Now each is the command's
    one-line usage error naming the flag and its range, exit 2, and no output folder is made."""
    from dit_accel.models import train_tiny

    out = tmp_path / "run"
    locality = ["--locality", '{"method": "tile", "tile": [1, 4, 4], "window": [1, 1, 1]}'] * (flag == "--locality-queries")
    with pytest.raises(SystemExit) as exit_:
        train_tiny.main(["--out", str(out), "--steps", "1", "--eval-seeds", *locality, flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err == [f"python -m dit_accel.models.train_tiny: error: {said}"], err
    assert not out.exists()
