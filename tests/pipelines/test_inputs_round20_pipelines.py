"""apply() and context parallelism as a demanding user meets them (round 20): a nested ``with`` block, capture
observers and stats() backends under Ring, the calibration sampler's files under Ulysses, ``--cp`` on a pipeline's
other transformers, uneven shares, caches that run on no pipeline. Tiny models on the CPU, one process (the Ring test: one torchrun launch of 2, this file being the worker); each test
names what was wrong before its fix."""

import types
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


# ------------------------------------------------------------------ apply() inside another handle's with block
def test_apply_inside_the_with_block_of_a_handle_on_the_same_model_is_refused():
    """Before: ``with apply(m, TILE): with apply(m, GNA): ...`` replaced the outer handle (a warning at the inner
    apply), and after the inner block the rest of the outer block ran the original model, dense, without another
    word. Now the inner apply() is a RuntimeError naming the outer handle and the fix, and the outer block's calls
    are bit for bit those of a plain apply(m, TILE)."""
    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)
    with dit_accel.apply(model, TILE, backend="torch"):
        want = _run(model, inputs)
    with dit_accel.apply(model, TILE, backend="torch") as outer:
        with pytest.raises(RuntimeError, match=r"apply\(\) inside the `with` block of AccelHandle\(Tile.* Leave "
                                               r"that with block first"):
            with dit_accel.apply(model, GNA, backend="torch"):
                pass
        assert not outer.removed
        assert torch.equal(_run(model, inputs), want)
        assert outer.stats()[0]["sparse_calls"] == 1
    with dit_accel.apply(model, GNA, backend="torch"):  # after the block: applies as always
        pass
    first = dit_accel.apply(model, TILE, backend="torch")  # outside a with block: replaced, as documented
    with pytest.warns(dit_accel.DitAccelWarning, match="was removed first"):
        dit_accel.apply(model, GNA, backend="torch").remove()
    assert first.removed


# ------------------------------------------------------------------ the calibration sampler's files under Ulysses
def test_the_sampler_names_its_files_by_the_heads_of_a_ulysses_rank(tmp_path):
    """Before: QKVSampler(folder=...) as capture under Ulysses wrote every rank's heads to the same
    ``layer000_step000.pt``, so the file held the last rank's heads as if they were the layer's. Now each rank's file
    carries its head range, as Capture's files do."""
    from dit_accel.calibrate.sampling import QKVSampler

    q = torch.randn(1, 2, 16, 8)
    for h0 in (0, 2):  # two Ulysses ranks of a 4-head model
        sampler = QKVSampler([(0, 1)], per_bucket=1, folder=str(tmp_path))
        sampler.save(0, "blocks.0.attn1", (1, 4, 4), 0, q + h0, q, q, heads=(h0, h0 + 2))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["layer000_step000_heads0-2.pt", "layer000_step000_heads2-4.pt"]
    saved = torch.load(tmp_path / names[1], weights_only=True)
    assert saved["heads"] == (2, 4) and torch.equal(saved["q"], q + 2)


# ------------------------------------------------------------------ --cp and a pipeline's other transformers
def _stub_enable(monkeypatch):
    """cli.parallel.enable without a process group: the Diffusers call recorded, not made."""
    from dit_accel.pipelines import parallel

    made = []
    monkeypatch.setattr(parallel, "enable_context_parallel", lambda transformer, config: made.append(transformer))
    monkeypatch.setattr(parallel, "check_process_group", lambda config: None)  # (no process group here)
    return made


def test_cp_says_that_a_transformer_it_does_not_split_runs_whole_on_every_rank(monkeypatch):
    """Before: ``generate --cp`` on a pipeline with a ``transformer_ref`` (MiniMax-H3's ref2va) split
    ``transformer`` and ran ``transformer_ref`` whole on every rank without a word: the run looked split where those
    calls were not. Now a DitAccelWarning names it and says what it costs."""
    from dit_accel.cli import parallel

    made = _stub_enable(monkeypatch)
    main, ref = T.build_tiny_transformer("wan"), T.build_tiny_transformer("wan", seed=1)
    pipe = types.SimpleNamespace(transformer=main, transformer_ref=ref)
    with pytest.warns(dit_accel.DitAccelWarning, match=r"--cp splits SimpleNamespace's transformer across the ranks, "
                                                      r"not transformer_ref \(WanTransformer3DModel\): every rank "
                                                      r"runs that transformer whole"):
        parallel.enable(pipe, types.SimpleNamespace(ulysses_degree=1, ring_degree=2))
    assert made == [main]


def test_cp_splits_a_transformer_shared_by_two_names_once(monkeypatch):
    """Before: a pipeline whose ``transformer_2`` is its ``transformer`` (one module, shared weights) had
    ``enable_parallelism`` called twice on it under ``--cp``: Diffusers' RuntimeError "Parallelism is already applied",
    a raw traceback after the model loaded. Now the module is split once."""
    import warnings

    from dit_accel.cli import parallel

    made = _stub_enable(monkeypatch)
    main = T.build_tiny_transformer("wan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (and nothing to say: both names are split)
        parallel.enable(types.SimpleNamespace(transformer=main, transformer_2=main),
                        types.SimpleNamespace(ulysses_degree=1, ring_degree=2))
    assert made == [main]


# ------------------------------------------------------------------ caches that run on no pipeline
@pytest.mark.parametrize("cache, said", [("magcache", "magcache: MagCache needs the model's magnitude ratios: pass "
                                                      "magcache:mag_ratios=flux"),
                                         ("fastercache", "fastercache: refused: Diffusers' FasterCache splits")],
                         ids=["magcache", "fastercache"])
def test_a_cache_that_runs_on_no_pipeline_is_refused_before_the_model_loads(cache, said, tmp_path, capsys,
                                                                            monkeypatch):
    """Before: ``generate --cache magcache`` (no ratios, no calibrate=true) and ``--cache fastercache`` (refused on
    every supported pipeline) were parsed as valid, and refused by enable_cache after the model loaded and the
    prompt was encoded. Now refused in one line before loading, naming what to pass."""
    from dit_accel.cli.main import main
    from dit_accel.models import loading

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(loading, "load_pipeline", loaded)
    assert main(["generate", "--model", "tiny-flux", "--cache", cache, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"dit-accel generate: error: --cache {said}" in err, err
    assert list(tmp_path.iterdir()) == []
    from dit_accel.pipelines.caches import CacheSpec

    assert CacheSpec.parse("magcache:calibrate=true").options == {"calibrate": True}  # (taken, as before)


# ------------------------------------------------------------------ uneven shares, parallelised before apply()
def test_apply_to_a_model_made_parallel_with_uneven_shares_is_refused_at_apply():
    """Before: a model made context-parallel with ``ulysses_anything=True`` (uneven shares, which dit_accel cannot
    run) before apply() was taken, and the run failed at its first attention call, after the model loaded and the
    prompt was encoded (the other order, apply() first, was refused in enable_parallelism). Now apply() refuses it,
    saying what to change, and the model stays as it was. (Diffusers' config is set on the processors directly:
    enable_parallelism needs a process group.)"""
    from diffusers import ContextParallelConfig, ParallelConfig

    model = T.build_tiny_transformer("wan")
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    processors = [m.processor for m in model.modules() if getattr(m, "processor", None) is not None]
    for processor in processors:
        processor._parallel_config = config
    with pytest.raises(ValueError, match=r"ulysses_anything / ring_anything \(uneven shares\) are not supported\. "
                                         r"Build the ContextParallelConfig without them"):
        dit_accel.apply(model, TILE, backend="torch")
    assert [m.processor for m in model.modules() if getattr(m, "processor", None) is not None] == processors
    assert all(p._parallel_config is config for p in processors)


# ------------------------------------------------------------------ capture observers under Ring
def test_ring_hands_each_captured_call_to_one_rank_once_and_names_the_backend_it_ran(tmp_path):
    """Before: under Ring an observer without ``skip`` (calibration's QKVSampler, a user's own) got ``save`` on every
    ring rank: the same sample kept (and its file written) once per rank; and an observer that wants every call
    had each ring rank decide alone. Now the first ring rank decides for the ring and is the only one handed the
    call. And stats() named the backend from the rank's share of the layer's input: "dense-masked" (the CPU's
    one-call path) where ring attention ran the block-sparse "torch" kernels shard by shard. Now the backend the
    ring's calls ran. One torchrun launch of 2 CPU processes (this file is the worker)."""
    import json

    from tests.torchrun import torchrun

    out = tmp_path / "out.json"
    torchrun(2, Path(__file__), out, timeout=400)
    result = json.loads(out.read_text())
    assert result["0"] == {"first": [[0, 0], [1, 0]], "every": [[0, 0], [1, 0], [0, 0], [1, 0]], "sampled": 2,
                           "backends": ["torch", "torch"]}
    assert result["1"] == {"first": [], "every": [], "sampled": 0, "backends": ["torch", "torch"]}
    assert result["same"]


class _FirstCall:
    """An observer of Capture's interface without ``skip``: the first call per (layer, step)."""

    def __init__(self):
        self.saved = []

    def wants(self, layer, step):
        return [layer, step] not in self.saved

    def save(self, layer, name, grid, step, q, k, v, heads=None):
        self.saved.append([layer, step])


class _EveryCall(_FirstCall):
    def wants(self, layer, step):
        return True


def _ring_observer_worker(out: str) -> None:
    """Each rank: tiny Wan under Ring over 2 ranks, with three observers in turn; every rank reports what it got."""
    import datetime
    import json

    import torch.distributed as dist

    from dit_accel.calibrate.sampling import QKVSampler
    from tests.pipelines import cp_worker as W  # (patches torch.accelerator.device_count: in the worker only)

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    model = W.build("wan")
    inputs = W.inputs("wan", model)
    model.enable_parallelism(config=W.cp_config(1, 2))
    method = dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1))
    first, every, sampler = _FirstCall(), _EveryCall(), QKVSampler([(0, 1)], per_bucket=1)
    outs = []
    for observer in (first, every, sampler):
        with dit_accel.apply(model, method, backend="torch", capture=observer):
            outs += [W.run(model, inputs), W.run(model, inputs)]
    with dit_accel.apply(model, method) as handle:  # backend auto: the CPU's one-call paths are the single call's
        W.run(model, inputs)
        backends = [row["backend"] for row in handle.stats()]
    mine = {"first": first.saved, "every": every.saved, "sampled": len(sampler.samples), "backends": backends}
    gathered = [None, None]
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        result = {str(rank): got for rank, got in enumerate(gathered)}
        result["same"] = all(torch.equal(o, outs[0]) for o in outs)
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys
    import warnings

    warnings.simplefilter("ignore")  # (the bare calls' capture note; the ranks' logs stay short)
    _ring_observer_worker(sys.argv[1])
