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


def _gated_checkpoint(folder, key="blocks.{}.to_gate_compress.{}", layers=(0, 1)):
    """Save the tiny Wan transformer to ``folder`` and add random gates in the given key layout; returns them."""
    from safetensors.torch import load_file, save_file

    model = T.build_tiny_transformer("wan")
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
