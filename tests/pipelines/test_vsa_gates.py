"""VSA checkpoint gates: a tiny Wan checkpoint in FastVideo's Diffusers key layout (``blocks.N.to_gate_compress``),
which Diffusers drops on load, runs end to end with its gates, against a reference computed by hand."""

import pytest
import torch
import torch.nn.functional as F

import dit_accel
from dit_accel.models import tiny as T
from tests.kernels.vsa_reference import VSAReference

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = (5, 6, 7)


def _gated_checkpoint(folder, key="blocks.{}.to_gate_compress.{}", layers=(0, 1), head_dim=None):
    """Save the tiny Wan transformer (with heads of ``head_dim``, if given) to ``folder`` and add random gates in the
    given key layout; returns them."""
    from safetensors.torch import load_file, save_file

    model = T.build_tiny_transformer("wan")
    if head_dim is not None:
        from diffusers import WanTransformer3DModel

        torch.manual_seed(0)
        model = WanTransformer3DModel(**{**T.TRANSFORMERS["wan"].config, "attention_head_dim": head_dim}).eval()
    model.save_pretrained(folder)
    path = next(folder.glob("*.safetensors"))
    state = load_file(str(path))
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(5)
    gates = {}
    for i in layers:
        w, b = torch.randn(dim, dim, generator=g) * 0.3, torch.randn(dim, generator=g) * 0.3
        state[key.format(i, "weight")], state[key.format(i, "bias")] = w, b
        gates[i] = (w, b)
    save_file(state, str(path), metadata={"format": "pt"})
    return gates


def _load(folder):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(folder).eval()


def _reference(model, kwargs, gates, count, tile):
    """float64 VSA with gate = to_gate_compress(attn1 input), taken by hand from each block's attention input."""
    heads = model.config.num_attention_heads
    inputs = {}
    hooks = [model.blocks[i].attn1.register_forward_pre_hook(
        lambda mod, args, kw, i=i: inputs.__setitem__(i, args[0] if args else kw["hidden_states"]), with_kwargs=True)
        for i in range(len(model.blocks))]

    def gate(index):
        block = index % len(model.blocks)
        if block not in gates:
            return None
        w, b = gates[block]
        g = F.linear(inputs[block].double(), w.double(), b.double())  # (B, N, heads * D)
        return g.unflatten(2, (heads, -1)).transpose(1, 2)

    try:
        with VSAReference(GRID, count, tile, gates=gate), torch.no_grad():
            return model(**kwargs)[0]
    finally:
        for h in hooks:
            h.remove()


def test_gated_checkpoint_runs_end_to_end(tmp_path):
    gates = _gated_checkpoint(tmp_path)
    model = _load(tmp_path)
    assert not any("gate" in k for k in model.state_dict())  # Diffusers dropped them
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID, batch=2)
    method = dit_accel.VSA(topk=2)
    ref = _reference(model, kwargs, gates, 2, method.tile)
    with dit_accel.apply(model, method, backend="torch") as handle, torch.no_grad():
        out = model(**kwargs)[0]
        assert handle.vsa_gates == {"blocks.0.attn1": str(tmp_path), "blocks.1.attn1": str(tmp_path)}
        assert any("gates loaded for 2 of 2 attention layers" in w for w in handle.warnings)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    ungated = _reference(model, kwargs, {}, 2, method.tile)
    assert (out - ungated).abs().max() > 1e-3  # the gate changes the output
    assert not model.blocks[0].attn1._forward_pre_hooks  # remove() took the gate hooks away
    with dit_accel.apply(model, method, backend="torch"), torch.no_grad():
        torch.testing.assert_close(model(**kwargs)[0], out)  # and a second apply finds them again


def test_weights_argument_and_attn1_key_layout(tmp_path):
    gates = _gated_checkpoint(tmp_path, key="blocks.{}.attn1.to_gate_compress.{}", layers=(1,))
    model = T.build_tiny_transformer("wan")  # built from a config: no folder of its own
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID)
    method = dit_accel.VSA(sparsity=0.5)
    ref = _reference(model, kwargs, gates, 4, method.tile)
    with dit_accel.apply(model, method, backend="torch", weights=tmp_path) as handle, torch.no_grad():
        out = model(**kwargs)[0]
        assert list(handle.vsa_gates) == ["blocks.1.attn1"]
        assert any("1 of 2 attention layers" in w and "zero gate" in w for w in handle.warnings)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    with dit_accel.apply(model, method, backend="torch") as handle:
        assert handle.vsa_gates == {} and not any("gates" in w for w in handle.warnings)


def test_gates_loaded_without_vsa_warn_that_they_are_unused(tmp_path):
    _gated_checkpoint(tmp_path)
    model = _load(tmp_path)
    with pytest.warns(dit_accel.DitAccelWarning, match="to_gate_compress gates for 2 blocks.*does not use"):
        handle = dit_accel.apply(model, dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), backend="torch")
    handle.remove()


def test_bad_gate_folders_are_refused(tmp_path):
    model = T.build_tiny_transformer("wan")
    with pytest.raises(ValueError, match="holds neither to_gate_compress gates"):
        dit_accel.apply(model, dit_accel.VSA(topk=1), weights=tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    from safetensors.torch import save_file

    save_file({"blocks.0.to_gate_compress.weight": torch.zeros(8, 24)}, str(other / "m.safetensors"))
    with pytest.raises(ValueError, match="maps 24 to 8 channels but the layer.s attention maps 24 to 24"):
        dit_accel.apply(model, dit_accel.VSA(topk=1), weights=other)
    assert not model.blocks[0].attn1._forward_pre_hooks and not model._forward_pre_hooks  # nothing left behind


def test_per_head_vsa_with_its_gate(tmp_path):
    """PerHead((VSA, Dense)): head 0 runs gated VSA (its own gate channels), head 1 dense attention."""
    gates = _gated_checkpoint(tmp_path)
    model = _load(tmp_path)
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID, batch=2)
    vsa_only = _reference(model, kwargs, gates, 2, (4, 4, 4))  # both heads VSA with their gates
    with torch.no_grad():
        dense = model(**kwargs)[0]
    method = dit_accel.PerHead((dit_accel.VSA(topk=2), dit_accel.Dense()))
    from dit_accel.plans.per_head import PerHeadPlan

    with dit_accel.apply(model, method, backend="torch") as handle, torch.no_grad():
        out = model(**kwargs)[0]
        plan = handle.plan(method, GRID)
        assert len(handle.vsa_gates) == 2
    assert isinstance(plan, PerHeadPlan) and [g[2] for g in plan.groups] == ["dense", "vsa"]
    # The head-mixed output differs from both the all-VSA and the dense model: check it head by head below.
    assert (out - dense).abs().max() > 1e-4 and (out - vsa_only).abs().max() > 1e-4

    heads = model.config.num_attention_heads
    inputs = {}
    hooks = [model.blocks[i].attn1.register_forward_pre_hook(
        lambda mod, args, kw, i=i: inputs.__setitem__(i, args[0]), with_kwargs=True) for i in range(2)]

    class Mixed(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not F.scaled_dot_product_attention:
                return func(*args, **kwargs)
            call = dict(zip(("query", "key", "value"), args), **kwargs)
            q, k, v = call["query"], call["key"], call["value"]
            if k.shape[2] != q.shape[2]:
                return func(*args, **kwargs)
            from tests.kernels.vsa_reference import reference

            block = Mixed.calls % 2
            Mixed.calls += 1
            w, b = gates[block]
            g = F.linear(inputs[block].double(), w.double(), b.double()).unflatten(2, (heads, -1)).transpose(1, 2)
            o0 = reference(q[:, :1], k[:, :1], v[:, :1], GRID, 2, (4, 4, 4), g[:, :1])[0]
            o1 = func(q[:, 1:], k[:, 1:], v[:, 1:])
            return torch.cat([o0.to(q.dtype), o1], 1)

    try:
        with Mixed(), torch.no_grad():
            ref = model(**kwargs)[0]
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_a_source_that_is_not_on_this_machine_is_said(tmp_path, monkeypatch):
    """A hub id missing from the local cache (or a moved folder): VSA says it could not look for gates."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    model = T.build_tiny_transformer("wan")
    model.register_to_config(_name_or_path="FastVideo/not-in-this-cache")
    with pytest.warns(dit_accel.DitAccelWarning, match="could not look for to_gate_compress gates.*weights="):
        handle = dit_accel.apply(model, dit_accel.VSA(topk=1), backend="torch")
    assert handle.vsa_gates == {}
    handle.remove()


def test_a_hub_id_in_the_local_cache_is_found(tmp_path, monkeypatch):
    """The transformer's _name_or_path is a hub id: its cached snapshot (the Hugging Face cache layout) is read."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--FastVideo--TinyFastWan" / "snapshots" / ("0" * 40)
    (snapshot / "transformer").mkdir(parents=True)
    gates = _gated_checkpoint(snapshot / "transformer")
    (cache / "models--FastVideo--TinyFastWan" / "refs").mkdir()
    (cache / "models--FastVideo--TinyFastWan" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    model = _load(snapshot / "transformer")
    model.register_to_config(_name_or_path="FastVideo/TinyFastWan")
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID)
    ref = _reference(model, kwargs, gates, 2, (4, 4, 4))
    with dit_accel.apply(model, dit_accel.VSA(topk=2), backend="torch") as handle, torch.no_grad():
        out = model(**kwargs)[0]
        assert len(handle.vsa_gates) == 2
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_save_pretrained_under_vsa_keeps_the_gates(tmp_path):
    """Diffusers drops the gates on load and would not save them; saved while VSA is applied, the folder gets them
    back beside its weights (FastVideo's keys, dit_accel's GATES_FILE), and VSA applied to the saved copy runs the
    same gates. Saved without VSA, nothing is added."""
    from safetensors.torch import load_file

    from dit_accel.checkpoints.vsa_gates import GATES_FILE

    gates = _gated_checkpoint(tmp_path / "ckpt")
    model = _load(tmp_path / "ckpt")
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID)
    method = dit_accel.VSA(topk=2)
    with dit_accel.apply(model, method, backend="torch"), torch.no_grad():
        out = model(**kwargs)[0]
        model.save_pretrained(tmp_path / "saved")
    written = load_file(str(tmp_path / "saved" / GATES_FILE))
    assert sorted(written) == sorted(f"blocks.{i}.to_gate_compress.{p}" for i in gates for p in ("weight", "bias"))
    for i, (w, b) in gates.items():
        assert torch.equal(written[f"blocks.{i}.to_gate_compress.weight"], w)
        assert torch.equal(written[f"blocks.{i}.to_gate_compress.bias"], b)
    again = _load(tmp_path / "saved")
    with dit_accel.apply(again, method, backend="torch") as handle, torch.no_grad():
        assert len(handle.vsa_gates) == 2
        torch.testing.assert_close(again(**kwargs)[0], out)
    model.save_pretrained(tmp_path / "plain")  # no handle: Diffusers' folder alone
    assert not (tmp_path / "plain" / GATES_FILE).exists()


def test_save_pretrained_with_gates_being_trained_writes_them(tmp_path):
    """Gates being trained (``add_trainable_gates``) are saved like checkpoint gates, and load back as the gates VSA
    runs: before, ``save_pretrained`` raised a raw AttributeError ('_TrainableGate' has no 'weight')."""
    from safetensors.torch import load_file

    from dit_accel.checkpoints.vsa_gates import GATES_FILE
    from dit_accel.pipelines.vsa_gates import add_trainable_gates

    model = T.build_tiny_transformer("wan")
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID)
    method = dit_accel.VSA(topk=2)
    with dit_accel.apply(model, method, backend="torch") as handle, torch.no_grad():
        gates = add_trainable_gates(handle)
        for i, gate in enumerate(gates.values()):
            gate.proj.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
            gate.proj.bias.fill_(0.1 * (i + 1))
        out = model(**kwargs)[0]
        model.save_pretrained(tmp_path / "saved")
    written = load_file(str(tmp_path / "saved" / GATES_FILE))
    assert len(written) == 2 * len(gates) > 0
    for (name, gate), block in zip(gates.items(), sorted({k.split(".")[1] for k in written}, key=int)):
        assert torch.equal(written[f"blocks.{block}.to_gate_compress.weight"], gate.proj.weight), name
        assert torch.equal(written[f"blocks.{block}.to_gate_compress.bias"], gate.proj.bias), name
    again = _load(tmp_path / "saved")
    with dit_accel.apply(again, method, backend="torch") as handle, torch.no_grad():
        assert len(handle.vsa_gates) == len(gates)
        torch.testing.assert_close(again(**kwargs)[0], out)


def test_a_nan_gate_is_refused_naming_the_file_and_the_block(tmp_path):
    """Issue 74, item 8: a NaN in a gate made every output NaN (and generate painted the video black)."""
    from safetensors.torch import load_file, save_file

    _gated_checkpoint(tmp_path)
    path = next(tmp_path.glob("*.safetensors"))
    state = load_file(str(path))
    state["blocks.1.to_gate_compress.weight"][3, 2] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})
    model = _load(tmp_path)
    with pytest.raises(ValueError, match=rf"{path}: the to_gate_compress weight of block 1 "
                                         r"\(blocks.1.to_gate_compress.weight\) has 1 non-finite values"):
        dit_accel.apply(model, dit_accel.VSA(topk=2), backend="torch")
    assert not model.blocks[0].attn1._forward_pre_hooks  # nothing left behind


def test_gates_for_blocks_the_model_lacks_are_named_and_gates_for_none_refused(tmp_path):
    _gated_checkpoint(tmp_path / "extra", layers=(0, 1, 5, 6))
    model = _load(tmp_path / "extra")
    with pytest.warns(dit_accel.DitAccelWarning, match=r"gates for blocks 5-6, which WanTransformer3DModel has no "
                                                       r"VSA layer in \(its blocks: 0-1\)"):
        handle = dit_accel.apply(model, dit_accel.VSA(topk=2), backend="torch")
    assert len(handle.vsa_gates) == 2
    handle.remove()
    _gated_checkpoint(tmp_path / "other", layers=(7, 8))
    model = _load(tmp_path / "other")
    with pytest.raises(ValueError, match=r"gates for blocks 7-8, but none of WanTransformer3DModel's VSA layers is in "
                                         r"such a block.*belong to another model"):
        dit_accel.apply(model, dit_accel.VSA(topk=2), backend="torch")


def test_another_model_saved_over_a_gated_folder_does_not_inherit_its_gates(tmp_path):
    """Issue 74, item 8: model B saved into the folder of gated model A kept A's vsa_gates.safetensors, and VSA on B
    loaded it as its own. Saved under a handle, B's save removes the file; saved without dit_accel, the gates no
    longer match the weights they were saved with and are refused."""
    from dit_accel.checkpoints.vsa_gates import GATES_FILE

    _gated_checkpoint(tmp_path / "a")
    a = _load(tmp_path / "a")
    with dit_accel.apply(a, dit_accel.VSA(topk=2), backend="torch"):
        a.save_pretrained(tmp_path / "x")
    assert (tmp_path / "x" / GATES_FILE).is_file()
    b = T.build_tiny_transformer("wan")
    with torch.no_grad():
        b.blocks[0].attn1.to_q.weight.add_(0.5)  # another model of the same shape
    with dit_accel.apply(b, dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), backend="torch"):
        b.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x" / GATES_FILE).exists()
    with dit_accel.apply(a, dit_accel.VSA(topk=2), backend="torch"):
        a.save_pretrained(tmp_path / "y")
    b.save_pretrained(tmp_path / "y")  # plain Diffusers: A's gates stay beside B's weights
    loaded = _load(tmp_path / "y")
    with pytest.raises(ValueError, match=rf"{GATES_FILE}: was saved with other model files than the folder holds "
                                         r"now \(diffusion_pytorch_model.safetensors changed since"):
        dit_accel.apply(loaded, dit_accel.VSA(topk=2), backend="torch")


_SAVE_B = """
import sys, torch, dit_accel
from diffusers import WanTransformer3DModel
b = WanTransformer3DModel.from_pretrained(sys.argv[1]).eval()
with dit_accel.apply(b, dit_accel.VSA(topk=2), backend="torch"):
    b.save_pretrained(sys.argv[2])
"""


@pytest.mark.parametrize("kill_at,wins", [(2, "a"), (6, "b")], ids=["before-the-commit", "after-the-commit"])
def test_a_save_killed_between_weights_and_gates_leaves_one_models_set(tmp_path, kill_at, wins):
    """Issue 74, item 8: a save_pretrained killed between the weights and the gates left gates that were read from
    the killed writer's hidden temporary. Weights and gates are one commit: killed before its commit point the
    folder is model A with A's gates, after it (once a reader finishes the renames) model B with B's."""
    import os
    import subprocess
    import sys

    from dit_accel.checkpoints.vsa_gates import read_gates

    gates_a = _gated_checkpoint(tmp_path / "a")
    a = _load(tmp_path / "a")
    with dit_accel.apply(a, dit_accel.VSA(topk=2), backend="torch"):
        a.save_pretrained(tmp_path / "x")
    gates_b = _gated_checkpoint(tmp_path / "b")
    for i in gates_b:  # B's gates differ from A's
        gates_b[i] = tuple(t * 2 for t in gates_b[i])
    from safetensors.torch import load_file, save_file

    path = next((tmp_path / "b").glob("*.safetensors"))
    state = load_file(str(path))
    for i, (w, bias) in gates_b.items():
        state[f"blocks.{i}.to_gate_compress.weight"], state[f"blocks.{i}.to_gate_compress.bias"] = w, bias
    save_file(state, str(path), metadata={"format": "pt"})
    env = dict(os.environ, DIT_ACCEL_TEST_KILL_AT=str(kill_at), PYTHONPATH=os.getcwd())
    run = subprocess.run([sys.executable, "-c", _SAVE_B, str(tmp_path / "b"), str(tmp_path / "x")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]  # SIGKILL at the write point
    read = read_gates(tmp_path / "x")
    want = gates_a if wins == "a" else gates_b
    for i, (w, bias) in want.items():
        assert torch.equal(read[i]["weight"], w) and torch.equal(read[i]["bias"], bias)
    model = _load(tmp_path / "x")
    with dit_accel.apply(model, dit_accel.VSA(topk=2), backend="torch") as handle:
        assert len(handle.vsa_gates) == 2
