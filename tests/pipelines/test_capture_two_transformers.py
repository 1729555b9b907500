"""``apply(pipe, capture=DIR)`` on a pipeline whose handle holds two transformers that both run at every step (Ideogram
4's ``unconditional_transformer``, MiniMax-H3's ``transformer_ref``): layer indices restart at 0 in each transformer,
so each transformer writes its own files (``pipe.transformer`` the plain ``layerLLL_stepSSS.pt``, the other one the
same names after its prefix) holding the q/k/v that the model computed, recorded here without dit_accel; a
one-transformer capture keeps its names; ``bench fidelity`` reads each transformer's layers as rows of their own."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dit_accel
from dit_accel.calibrate.sampling import QKVSampler
from dit_accel.eval.fidelity import bench_fidelity, fidelity_table
from dit_accel.models import tiny as T
from dit_accel.pipelines.capture import check_capture_dir

GRID = (2, 4, 4)  # 32 video tokens; the tiny Wan transformer has two self-attention layers (blocks.N.attn1)
TOKENS = 2 * 4 * 4
STEPS = 3
LAYERS = 2


def _pipe(second=None):
    """A pipeline-like object: ``transformer`` and, under the attribute ``second``, another tiny Wan transformer of
    other weights (so their q/k/v differ), and the scheduler that gives the step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = {"transformer": T.build_tiny_transformer("wan", seed=0)}
    if second:
        parts[second] = T.build_tiny_transformer("wan", seed=1)
    return SimpleNamespace(**parts, scheduler=FlowMatchEulerDiscreteScheduler())


@torch.no_grad()
def _denoise(pipe, second=None):
    """Guided denoising that calls ``transformer`` and then the second transformer at every step."""
    inputs = T.tiny_transformer_inputs("wan", pipe.transformer, grid=GRID)
    x = inputs["hidden_states"]
    pipe.scheduler.set_timesteps(STEPS)
    for t in pipe.scheduler.timesteps:
        call = dict(inputs, hidden_states=x, timestep=t.expand(x.shape[0]))
        out = pipe.transformer(**call)[0]
        if second:
            other = getattr(pipe, second)(**call)[0]
            out = other + 2.0 * (out - other)
        x = pipe.scheduler.step(out, t, x).prev_sample
    return x


@contextlib.contextmanager
def _recorded(pipe, second=None):
    """``{(prefix, layer, step): (q, k, v)}`` of every self-attention call (queries and keys: the video tokens) of
    each transformer, in call order per transformer forward, from torch's SDPA itself: an oracle that knows nothing
    of dit_accel (run without it)."""
    seen, where = {}, {}
    prefixes = {"transformer": ""}
    if second:
        prefixes[second] = f"{second}."
    calls = {prefix: 0 for prefix in prefixes.values()}
    sdpa = F.scaled_dot_product_attention

    def record(*args, **kwargs):
        call = {**dict(zip(("query", "key", "value"), args)), **kwargs}
        q, k, v = call["query"], call["key"], call["value"]
        if q.shape[-2] == k.shape[-2] == TOKENS:
            prefix = where["now"]
            layer = where["layer"]
            where["layer"] += 1
            seen[(prefix, layer, calls[prefix])] = tuple(t.detach().clone() for t in (q, k, v))
        return sdpa(*args, **kwargs)

    def entering(prefix):
        def hook(module, args):
            where.update(now=prefix, layer=0)
        return hook

    def leaving(prefix):
        def hook(module, args, output):
            calls[prefix] += 1
        return hook

    handles = []
    for attr, prefix in prefixes.items():
        handles.append(getattr(pipe, attr).register_forward_pre_hook(entering(prefix)))
        handles.append(getattr(pipe, attr).register_forward_hook(leaving(prefix)))
    F.scaled_dot_product_attention = record
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = sdpa
        for handle in handles:
            handle.remove()


def _names(prefix):
    return [f"{prefix}layer{layer:03d}_step{step:03d}.pt" for layer in range(LAYERS) for step in range(STEPS)]


def _check_files(folder, want):
    for (prefix, layer, step), (q, k, v) in want.items():
        data = torch.load(folder / f"{prefix}layer{layer:03d}_step{step:03d}.pt", weights_only=True)
        assert (data["layer"], data["step"], data["grid"]) == (layer, step, GRID)
        assert data["layer_name"] == f"{prefix}blocks.{layer}.attn1"
        for name, expected in (("q", q), ("k", k), ("v", v)):
            torch.testing.assert_close(data[name], expected, rtol=0, atol=0, msg=lambda m: f"{prefix}{layer} {m}")


@pytest.mark.parametrize("second", ["unconditional_transformer", "transformer_ref"])
def test_both_transformers_of_a_step_keep_their_own_captures(tmp_path, second):
    pipe = _pipe(second)
    with _recorded(pipe, second) as want:
        reference = _denoise(pipe, second)
    assert len(want) == 2 * LAYERS * STEPS  # the oracle saw every self-attention call of both transformers
    folder = tmp_path / "cap"
    with dit_accel.apply(pipe, dit_accel.Dense(), capture=folder, backend="torch"):
        out = _denoise(pipe, second)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert sorted(p.name for p in folder.iterdir()) == sorted(_names("") + _names(f"{second}."))
    _check_files(folder, want)
    # (the two transformers' calls differ: a file of one could not pass for the other's)
    assert not torch.equal(want[("", 0, 0)][0], want[(f"{second}.", 0, 0)][0])
    with pytest.raises(ValueError, match=r"already holds 12 capture files"):
        check_capture_dir(folder)


def test_fidelity_reads_each_transformer_as_its_own_layers(tmp_path):
    pipe, second = _pipe("unconditional_transformer"), "unconditional_transformer"
    folder = tmp_path / "cap"
    with dit_accel.apply(pipe, dit_accel.Dense(), capture=folder, capture_layers=[1], backend="torch"):
        _denoise(pipe, second)
    res = bench_fidelity(folder, {"dense": dit_accel.Dense()}, log=lambda _: None)
    assert res["files"] == 2 * STEPS
    assert [(s["prefix"], s["layer"], s["layer_name"], s["steps"]) for s in res["per_layer"]] == [
        ("", 1, "blocks.1.attn1", STEPS), (f"{second}.", 1, f"{second}.blocks.1.attn1", STEPS)]
    assert all(s["rel_l2"] < 1e-6 for s in res["per_layer"])
    assert f"| {second}.1 " in fidelity_table(res)
    only = tmp_path / "other"  # a folder of the other transformer's files alone is a capture folder too
    only.mkdir()
    for path in folder.glob(f"{second}.*"):
        (only / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=r"already holds 3 capture files"):
        check_capture_dir(only)
    assert [s["prefix"] for s in bench_fidelity(only, {"dense": dit_accel.Dense()}, log=lambda _: None)[
        "per_layer"]] == [f"{second}."]


def test_one_transformer_capture_keeps_its_names_and_reads_as_before(tmp_path):
    pipe = _pipe()
    with _recorded(pipe) as want:
        _denoise(pipe)
    folder = tmp_path / "cap"
    with dit_accel.apply(pipe, dit_accel.Dense(), capture=folder, backend="torch"):
        _denoise(pipe)
    assert sorted(p.name for p in folder.iterdir()) == sorted(_names(""))
    _check_files(folder, want)
    res = bench_fidelity(folder, {"dense": dit_accel.Dense()}, log=lambda _: None)
    assert [(s["prefix"], s["layer"], s["steps"]) for s in res["per_layer"]] == [("", 0, STEPS), ("", 1, STEPS)]
    assert [r["file"] for r in res["rows"]] == sorted(_names(""))


def test_calibration_sampler_names_the_transformer_its_sample_came_from(tmp_path):
    """QKVSampler samples the transformers as one model (first call per (layer, step)); its files say whose."""
    sampler = QKVSampler([(0, 2)], per_bucket=2, folder=str(tmp_path))
    view = sampler.for_transformer("transformer_ref.")
    assert sampler.for_transformer("") is sampler
    q = torch.randn(1, 2, 4, 8)
    view.save(0, "transformer_ref.blocks.0.attn1", (1, 2, 2), 0, q, q, q)
    assert not sampler.wants(0, 0) and not view.wants(0, 0) and view.wants(0, 1)
    sampler.save(0, "blocks.0.attn1", (1, 2, 2), 1, q, q, q)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer000_step001.pt", "transformer_ref.layer000_step000.pt"]
    assert len(sampler.samples[(0, 0)]) == 2
