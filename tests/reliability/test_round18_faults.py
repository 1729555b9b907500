"""Round 18: what a failure half way leaves behind in apply/remove, fuse_lora, save_pretrained and fine-tuning.

Each case injects a fault (a KeyboardInterrupt or an error) by monkeypatching one step, and checks that the model
(and the user's files) end as they were, or that a second call finishes what the interrupted one left.
"""

import warnings

import pytest
import torch

import dit_accel
from dit_accel import weights as W
from dit_accel.models.tiny import build_tiny_pipeline, build_tiny_transformer, tiny_transformer_inputs
from dit_accel.pipelines import handle as Hd
from dit_accel.pipelines import transformer_hook as TH
from tests.utils import first_output as _run

pytestmark = pytest.mark.usefixtures("one_thread")

SLA = dit_accel.SLA(topk=0.5)
GNA = dit_accel.GNA(kernel_size=(2, 3, 3))


# (fixtures `folder`, a weights folder of LoRA on to_q/to_v + SLA projections, and `model`, the tiny Wan
# transformer it is for: tests/reliability/conftest.py)


def _applied(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dit_accel.apply(model, SLA, backend="torch", **kw)


def _state(model) -> dict:
    """What remove() must give back: processors (by type), hooks, peft adapters, instance attributes, tensors."""
    return {"processors": {n: type(m.processor).__name__ for n, m in model.named_modules() if hasattr(m, "processor")},
            "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks)),
            "peft": sorted(getattr(model, "peft_config", None) or {}), "dict": sorted(model.__dict__),
            "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _assert_state(model, before) -> None:
    after = _state(model)
    for key in ("processors", "hooks", "peft", "dict"):
        assert after[key] == before[key], key
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())


def _once(owner, name, monkeypatch, error=KeyboardInterrupt):
    """``owner.name`` raises ``error`` at its first call, then runs as before."""
    real = getattr(owner, name)
    calls = [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            raise error(f"injected into {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, step)


# ------------------------------------------------------------------ remove() cut short
@pytest.mark.parametrize("where", ["unwrap", "unload"])
def test_a_remove_cut_short_stays_live_and_a_second_remove_restores_the_model(model, folder, where, monkeypatch):
    """Before: a remove() cut short (Ctrl-C while leaving a with block, an error of peft's) marked the handle
    removed, so a second remove() did nothing: the wrappers (or the LoRA) stayed on the model for good."""
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    before = _state(model)
    handle = _applied(model, weights=folder)
    if where == "unwrap":
        _once(TH.TransformerHook, "unwrap", monkeypatch)
    else:
        _once(Hd, "_unload_adapters", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        with handle:
            pass
    assert not handle.removed  # what it could not undo is still its own: remove() again finishes it
    handle.remove()
    assert handle.removed
    _assert_state(model, before)
    assert torch.equal(_run(model, kwargs), dense)


# ------------------------------------------------------------------ fuse_lora() cut short
def test_a_fuse_lora_cut_short_unfuses_the_layers_it_had_fused(model, folder, monkeypatch):
    """Before: a fuse_lora() that failed at its third layer left two layers fused and the rest not."""
    from peft.tuners.lora import layer as lora_layer

    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    handle = _applied(model, weights=folder)
    trained = _run(model, kwargs)
    before = _state(model)
    real, calls = lora_layer.Linear.merge, [0]

    def merge(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt("injected into merge")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lora_layer.Linear, "merge", merge)
    with pytest.raises(KeyboardInterrupt):
        handle.fuse_lora()
    monkeypatch.undo()
    assert not [n for n, m in model.named_modules() if getattr(m, "merged_adapters", None)]
    _assert_state(model, before)
    assert torch.equal(_run(model, kwargs), trained)
    assert handle.fuse_lora() == 8  # and it fuses whole when asked again (to_q, to_v of 4 modules)
    handle.remove()


# ------------------------------------------------------------------ with on a removed handle
def test_with_on_a_removed_handle_is_refused_not_run_dense(model):
    """Before: the second ``with handle:`` of one apply() (the first one's exit removed it) ran the original,
    dense model without a word."""
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    handle = dit_accel.apply(model, GNA, backend="torch")
    with handle:
        sparse = _run(model, kwargs)
    with pytest.raises(RuntimeError, match=r"`with` on a removed handle.*dit_accel.apply") as err:
        with handle:
            pytest.fail("the block ran")
    assert "\n" not in str(err.value)
    with dit_accel.apply(model, GNA, backend="torch"):
        assert torch.equal(_run(model, kwargs), sparse)


# ------------------------------------------------------------------ save_pretrained over an earlier save
def test_save_pretrained_replaces_an_earlier_saves_weights_folder(model, folder, tmp_path):
    """Before: saving a GNA-applied model over a folder that held an SLA save kept that save's method file, LoRA
    and projections beside the new weights: ``apply(load_method(DIR), weights=DIR)`` ran SLA with another model's
    LoRA on it without a word."""
    out = tmp_path / "saved"
    handle = _applied(model, weights=folder)
    model.save_pretrained(out)
    handle.remove()
    assert (out / W.LORA_FILE).is_file() and dit_accel.load_method(out) == SLA
    other = build_tiny_transformer("wan", seed=4)
    with dit_accel.apply(other, GNA, backend="torch"):
        other.save_pretrained(out)
    assert dit_accel.load_method(out) == GNA
    assert not (out / W.LORA_FILE).exists() and not (out / W.SLA_FILE).exists()
    with dit_accel.apply(other, dit_accel.load_method(out), weights=out, backend="torch") as handle:
        assert handle.lora_adapter is None and not getattr(other, "peft_config", None)


# ------------------------------------------------------------------ a failed fine-tuning run's undo cut short
def _tensors(pipe) -> dict:
    return {f"{key}.{name}": (t.dtype, t.detach().clone()) for key, c in pipe.components.items()
            if isinstance(c, torch.nn.Module) for name, t in [*c.named_parameters(), *c.named_buffers()]}


def test_a_failed_runs_undo_cut_short_still_gives_back_the_cast_and_the_flags(tmp_path, monkeypatch):
    """Before: when removing the run's handle from a pipeline passed in failed (a second Ctrl-C), the rest of the
    undo was skipped: the pipeline stayed cast to bf16 (its fp32 weights lost) and frozen."""
    from dit_accel.training import FinetuneConfig, finetune
    from dit_accel.training import loop

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n")
    pipe = build_tiny_pipeline("tiny-wan")
    before = _tensors(pipe)
    grads = {n: p.requires_grad for n, p in pipe.transformer.named_parameters()}
    processors = {k: type(v) for k, v in pipe.transformer.attn_processors.items()}

    def failing(self, step, first):
        _once(self.handle, "remove", monkeypatch)  # the undo's first step is cut short
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(loop._Trainer, "step", failing)
    config = FinetuneConfig(model=pipe, method=SLA, output=str(tmp_path / "out"), prompts=str(prompts), steps=1,
                            lr=1e-3, rank=2, seed=0, progress=False, eval_batches=0, gradient_accumulation_steps=1,
                            mixed_precision="bf16", frames=9, height=64, width=128, max_sequence_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            finetune(config)
    after = _tensors(pipe)
    assert after.keys() == before.keys()
    changed = [k for k, (dtype, t) in before.items() if after[k][0] != dtype or not torch.equal(after[k][1], t)]
    assert not changed, changed[:3]
    assert {n: p.requires_grad for n, p in pipe.transformer.named_parameters()} == grads
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == processors
    assert not pipe.transformer._forward_pre_hooks and not getattr(pipe.transformer, "peft_config", None)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ a failed apply() whose undo is cut short
def test_a_failed_apply_whose_undo_is_cut_short_still_gives_back_the_earlier_handle(model, folder, monkeypatch):
    """Before: when apply() failed after installing (here: its save guard) and taking away the new handle was cut
    short (a second Ctrl-C), the earlier handle was never put back: its processors stayed taken off and its calls
    waited for a removal that never ended (the next call hung)."""
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    old = dit_accel.apply(model, GNA, backend="torch")
    sparse = _run(model, kwargs)
    before = _state(model)

    def guard_fails(self):
        raise RuntimeError("injected into _guard_save")

    monkeypatch.setattr(Hd.AccelHandle, "_guard_save", guard_fails)
    _once(Hd, "_unload_adapters", monkeypatch)  # taking the new handle's LoRA away is cut short once
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        _applied(model, weights=folder)
    monkeypatch.undo()
    assert not old.removed and not old._gate._closing
    _assert_state(model, before)  # the earlier handle's wrappers and hooks, no LoRA left
    assert torch.equal(_run(model, kwargs), sparse)
    old.remove()


# ------------------------------------------------------------------ load_weights() after fuse_lora()
@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    """A second weights folder of the same shape, other values."""
    from tests.reliability.conftest import write_weights_folder

    return write_weights_folder(tmp_path_factory.mktemp("weights_b"), lora_seed=11)


def _failing_lora_load(monkeypatch):
    """``_load_lora`` loads, then raises: a load_weights() that fails after its LoRA went in."""
    real = W._load_lora

    def load_then_fail(transformer, path):
        real(transformer, path)
        raise RuntimeError("injected after the LoRA loaded")

    monkeypatch.setattr(W, "_load_lora", load_then_fail)


def test_load_weights_after_fuse_lora_runs_the_new_weights_alone(model, folder, other_folder, monkeypatch):
    """Before: the LoRA that fuse_lora() merged stayed in the weights when load_weights() loaded another folder, so
    both LoRAs ran (0.40 off the output of the new folder alone, tiny Wan)."""
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    with _applied(build_tiny_transformer("wan", seed=3), weights=other_folder) as fresh:
        want = _run(fresh.transformer, kwargs)
    handle = _applied(model, weights=folder)
    first = _run(model, kwargs)
    assert handle.fuse_lora() == 8
    fused_state = _state(model)
    _failing_lora_load(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        handle.load_weights(other_folder)
    monkeypatch.undo()
    _assert_state(model, fused_state)  # a failed load: fused as before, bit for bit
    assert torch.equal(_run(model, kwargs), _run(model, kwargs))
    handle.load_weights(other_folder)
    assert any(getattr(m, "merged_adapters", None) for m in model.modules())  # fused again
    torch.testing.assert_close(_run(model, kwargs), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, first, atol=1e-3)
    handle.remove()
    assert torch.equal(_run(model, kwargs), dense)


def test_a_failed_load_weights_keeps_the_lora_an_earlier_load_gave_the_handle(model, folder, other_folder,
                                                                              monkeypatch):
    """Before: loading a second folder deletes the handle's adapter (one name, "dit_accel") before loading the new
    one; when the load then failed, the handle was left without its LoRA (the first folder's model lost, silently)."""
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    handle = _applied(model, weights=folder)
    first = _run(model, kwargs)
    before = _state(model)
    _failing_lora_load(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        handle.load_weights(other_folder)
    monkeypatch.undo()
    _assert_state(model, before)
    assert torch.equal(_run(model, kwargs), first)
    handle.remove()
    assert not getattr(model, "peft_config", None)


def test_loading_a_second_folder_replaces_the_first_without_a_warning_of_two_adapters(model, folder, other_folder):
    """Before: load_weights() of a second folder warned that it loaded adapter ['dit_accel'] "beside the active
    adapters ['dit_accel']", both active, and that remove() would leave ['dit_accel'] active: none of it true."""
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    with _applied(build_tiny_transformer("wan", seed=3), weights=other_folder) as fresh:
        want = _run(fresh.transformer, kwargs)
    handle = _applied(model, weights=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dit_accel.DitAccelWarning)
        handle.load_weights(other_folder)
    assert not [w for w in handle.warnings if "beside the active adapters" in w]
    assert list(model.peft_config) == ["dit_accel"] and torch.equal(_run(model, kwargs), want)
    handle.remove()
    assert not getattr(model, "peft_config", None)


def test_save_pretrained_into_a_finetune_output_leaves_its_weights_folder(model, folder, tmp_path):
    """The other side: a weights folder that `dit-accel finetune` (not save_pretrained) wrote is the user's own, and
    a save without a LoRA of its own beside it leaves it as it is."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(folder, out)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    with dit_accel.apply(model, GNA, backend="torch"):
        model.save_pretrained(out)
    assert all((out / name).read_bytes() == data for name, data in files.items())
