"""apply() as a demanding Diffusers user calls it (round 19): keyword combinations, the step of a conditioned call,
stats, capture under Ring context parallelism. Tiny models on the CPU, one process (the Ring test: one torchrun
launch of 2, this file being the worker); each test names what was wrong before its fix."""

from pathlib import Path

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T

TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3))
GNA = dit_accel.GNA(kernel_size=(2, 3, 3))


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if getattr(m, "processor", None) is not None}


# ------------------------------------------------------------------ dense_layers beside layer_methods
def test_a_layer_given_a_method_and_made_dense_is_refused_naming_both():
    """Before: apply(model, TILE, dense_layers=[1], layer_methods={1: GNA}) ran layer 1 dense without a word: the
    GNA the user asked for never ran, and stats() listed the layer as 'dense'. Now a ValueError naming the layer and
    both arguments, before the model changes; a Dense() given to a dense layer says the same thing twice and runs."""
    model = T.build_tiny_transformer("wan")
    before = _processors(model)
    with pytest.raises(ValueError, match=r"layer_methods gives layer \{1: gna\} a method, but dense_layers makes it "
                                         r"dense .* drop layer 1 from dense_layers or from layer_methods"):
        dit_accel.apply(model, TILE, dense_layers=[1], layer_methods={1: GNA}, backend="torch")
    with pytest.raises(ValueError, match=r"layers \{0: gna, 1: tile\}"):
        dit_accel.apply(model, TILE, dense_layers=2, layer_methods={0: GNA, 1: TILE}, backend="torch")
    assert _processors(model) == before
    with dit_accel.apply(model, TILE, dense_layers=[1], layer_methods={1: dit_accel.Dense()}, backend="torch") as h:
        _run(model, T.tiny_transformer_inputs("wan", model))
        assert [(r["method"], r["sparse_calls"]) for r in h.stats()] == [("tile", 1), ("dense", 0)]


# ------------------------------------------------------------------ backend="triton" where triton runs nowhere
def test_triton_forced_on_a_machine_where_it_runs_nowhere_is_refused_at_apply(monkeypatch):
    """Before: on a machine without a usable GPU and without TRITON_INTERPRET=1, apply(pipe, TILE,
    backend="triton") (or DIT_ACCEL_BACKEND=triton) was taken, and the run failed at its first attention call, after
    the model loaded and the prompt was encoded. Now apply refuses it, naming the argument and the fix, and the
    model is unchanged. (The machine is stood in for: triton_reason says why it cannot run on either device.)"""
    from dit_accel.kernels import backends

    why = {"cuda": "no CUDA device is available to torch; use backend='torch' on this machine.",
           "cpu": "triton needs a CUDA device; on CPU it only runs through its interpreter: set TRITON_INTERPRET=1"}
    monkeypatch.setattr(backends, "triton_reason", lambda device: why[torch.device(device).type])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = T.build_tiny_transformer("wan")
    before = _processors(model)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run in this environment: triton needs a CUDA "
                                         r"device; on CPU it only runs through its interpreter"):
        dit_accel.apply(model, TILE, backend="triton")
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"environment variable DIT_ACCEL_BACKEND='triton' cannot run"):
        dit_accel.apply(model, TILE)
    assert _processors(model) == before
    monkeypatch.delenv("DIT_ACCEL_BACKEND")
    monkeypatch.setattr(backends, "triton_reason", lambda device: None if device == "cpu" else why["cuda"])
    dit_accel.apply(model, TILE, backend="triton").remove()  # (the interpreter on: taken, as before)


# ------------------------------------------------------------------ an empty capture selection
@pytest.mark.parametrize("name", ["capture_layers", "capture_steps"])
def test_an_empty_capture_selection_is_refused_before_a_folder_is_made(name, tmp_path):
    """Before: apply(model, TILE, capture=DIR, capture_layers=[]) (a filtered list that came out empty) was taken:
    the folder was made and the whole run captured nothing, without a word. Now a ValueError naming the argument
    and what to pass, before the folder is made or the model changes."""
    model = T.build_tiny_transformer("wan")
    before = _processors(model)
    folder = tmp_path / "capture"
    with pytest.raises(ValueError, match=rf"{name}=\[\] names no (layer|step), so nothing would be captured"):
        dit_accel.apply(model, TILE, backend="torch", capture=folder, **{name: []})
    assert not folder.exists() and _processors(model) == before


# ------------------------------------------------------------------ scheduler= given as a class
def test_a_scheduler_class_is_refused_naming_the_class_and_the_object_to_pass():
    """Before: apply(model, TILE, dense_steps=1, scheduler=FlowMatchEulerDiscreteScheduler) (the class, not the
    pipeline's scheduler object) was refused as "scheduler=type has no `timesteps`", which names neither the class
    given nor what to pass. Now the message names the class and says to pass the scheduler object."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = T.build_tiny_transformer("wan")
    with pytest.raises(TypeError, match=r"scheduler=FlowMatchEulerDiscreteScheduler is a class; pass the scheduler "
                                        r"object .* scheduler=pipe.scheduler"):
        dit_accel.apply(model, TILE, dense_steps=1, scheduler=FlowMatchEulerDiscreteScheduler)
    assert not model.blocks[0].attn1.processor.__class__.__name__.startswith("Sparse")


# ------------------------------------------------------------------ capture under Ring context parallelism
def test_ring_capture_of_two_calls_of_one_step_finishes_and_saves_each_layer_once(tmp_path):
    """Before: under Ring, only the first ring rank recorded a captured (layer, step) as saved, so at the second call
    of a step (classifier-free guidance's second pass, or any bare call, which is step 0) the other rank still wanted
    it and made the capture's ring gather alone: the ranks' collectives no longer matched and the run hung (here it
    fails at the process group's timeout). Now every ring rank records it, and both calls run. One torchrun launch
    of 2 CPU processes (this file is the worker)."""
    import json

    from tests.torchrun import torchrun

    out = tmp_path / "out.json"
    torchrun(2, Path(__file__), out, tmp_path / "capture", timeout=400)
    result = json.loads(out.read_text())
    assert result["files"] == ["layer000_step000_heads0-4.pt", "layer001_step000_heads0-4.pt"]
    assert result["same"]


def _ring_capture_worker(out: str, folder: str) -> None:
    """Each rank: tiny Wan under Ring over 2 ranks, captured, called twice at step 0; rank 0 writes what it saw."""
    import datetime
    import json

    import torch.distributed as dist

    from tests.pipelines import cp_worker as W  # (patches torch.accelerator.device_count: in the worker only)

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    model = W.build("wan")
    inputs = W.inputs("wan", model)
    model.enable_parallelism(config=W.cp_config(1, 2))
    with dit_accel.apply(model, dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), backend="torch", capture=folder):
        first, second = W.run(model, inputs), W.run(model, inputs)
    dist.barrier()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"files": sorted(p.name for p in Path(folder).iterdir()),
                                         "same": bool(torch.equal(first, second))}))
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys
    import warnings

    warnings.simplefilter("ignore")  # (the bare calls' capture note; the ranks' logs stay short)
    _ring_capture_worker(*sys.argv[1:3])


# ------------------------------------------------------------------ per-token timesteps with a conditioning frame
def test_a_first_call_with_a_conditioning_frame_first_is_counted_at_its_own_step():
    """Before: LTXConditionPipeline at strength < 1 (no set_begin_index) whose video starts with a conditioning frame
    passes per-token timesteps min(t, (1 - mask) * 1000): 0 on that frame's tokens. Its first call was located by the
    first token's timestep, found nowhere in the schedule and counted as step 0, so dense_steps=2 ran step 4 of 8
    dense, without a word (SkyReels-V2's diffusion forcing over a prefix video: every call). Now the generated
    tokens' timestep (the first sample's largest) places it at step 4: sparse."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = T.build_tiny_transformer("ltx")
    inputs = T.tiny_transformer_inputs("ltx", model)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(8)
    n, frame = inputs["hidden_states"].shape[1], 8 * 8  # (the first of 4 latent frames: the conditioning one)
    timestep = torch.full((1, n), float(scheduler.timesteps[4]))
    timestep[:, :frame] = 0.0
    with dit_accel.apply(model, TILE, dense_steps=2, scheduler=scheduler, backend="torch") as handle:
        _run(model, {**inputs, "timestep": timestep})
        assert [(r["sparse_calls"], r["dense_calls"]) for r in handle.stats()] == [(1, 0), (1, 0)]


# ------------------------------------------------------------------ a method class in place of a config
def test_a_method_class_is_refused_naming_the_class_and_its_config():
    """Before: apply(model, dit_accel.SLA) (the class, not SLA()) was refused as "must be a dit_accel method config
    (...); got type. Try dit_accel.Tile(...)": it named no class and pointed to another method. Now the message names
    the class and the config to build from it, for ``method`` and for a ``layer_methods`` entry."""
    model = T.build_tiny_transformer("wan")
    with pytest.raises(TypeError, match=r"method=SLA is the method's class; pass a config made from it, "
                                        r"dit_accel\.SLA\(\.\.\.\) \(its defaults: dit_accel\.SLA\(\)\)"):
        dit_accel.apply(model, dit_accel.SLA)
    with pytest.raises(TypeError, match=r"layer_methods\[0\]=GNA is the method's class"):
        dit_accel.apply(model, TILE, layer_methods={0: dit_accel.GNA})


# ------------------------------------------------------------------ a call the method could not run, in stats
class _CausalProcessor:
    """Wan self-attention through one causal SDPA call: a call dit_accel cannot make sparse."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        b, n, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(b, n, attn.heads, -1).transpose(1, 2)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


def test_a_call_the_method_could_not_run_gives_its_reason_in_stats_and_summary():
    """Before: a layer whose SDPA call dit_accel could not make sparse (causal here; a mask or dropout likewise) ran
    dense with a warning, but stats() gave it no dense_reason and summary()["dense_reasons"] was empty, as for a
    dense step of the schedule: the numbers read as if the method had run where it was asked to. Now the call's
    reason is counted."""
    model = T.build_tiny_transformer("wan")
    model.blocks[1].attn1.set_processor(_CausalProcessor())
    with pytest.warns(dit_accel.DitAccelWarning, match="cannot make sparse"):
        with dit_accel.apply(model, TILE, backend="torch") as handle:
            _run(model, T.tiny_transformer_inputs("wan", model))
            rows, summary = handle.stats(), handle.summary()
    assert (rows[0]["sparse_calls"], rows[0]["dense_reason"]) == (1, None)
    assert (rows[1]["sparse_calls"], rows[1]["dense_calls"]) == (0, 1)
    assert rows[1]["dense_reason"] == "dense (an SDPA call it cannot make sparse)"
    assert summary["dense_reasons"] == ["dense (an SDPA call it cannot make sparse)"]
