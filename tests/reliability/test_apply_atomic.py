"""Fault injection into ``apply``: whatever step fails, the model is bit-identical to before.

"Before" is checked on everything apply may touch: every parameter and buffer (``state_dict``), every
attention processor (the same objects), the forward hooks (``_forward_pre_hooks`` and friends), Diffusers'
HookRegistry, peft's adapters (names, the active set, the module types) and the model's output. Each step of
``apply`` is made to raise in turn (at its first and at a later call), on a clean model and on a model
another handle is applied to (which must stay applied and keep its output).
"""

import copy
import importlib
import pickle
import warnings

import pytest
import torch

import dit_accel
from dit_accel import weights as W
from dit_accel.models.tiny import build_tiny_transformer, tiny_transformer_inputs
from dit_accel.pipelines import handle as Hd
from dit_accel.pipelines import hooks as H
from tests.utils import first_output as _run

A = importlib.import_module("dit_accel.pipelines.apply")  # the module (dit_accel.pipelines.apply is also the function)

pytestmark = pytest.mark.usefixtures("one_thread")

SLA = dit_accel.SLA(topk=0.5)
GNA = dit_accel.GNA(kernel_size=(2, 3, 3))


def snapshot(model) -> dict:
    """Everything apply() may change, as values (tensors cloned) and identities (processors, hooks)."""
    hook_dicts = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    registry = getattr(model, "_diffusers_hook", None)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "processors": {n: getattr(m, "processor", None) for n, m in model.named_modules()},
        "module_types": [(n, type(m)) for n, m in model.named_modules()],
        "hooks": {d: dict(getattr(model, d)) for d in hook_dicts},
        "registry": None if registry is None else dict(registry.hooks),
        "peft": sorted(getattr(model, "peft_config", None) or {}),
        "active": A._active_adapters(model),
        "dict": sorted(model.__dict__),
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["processors"].keys() == before["processors"].keys()
    for name, proc in before["processors"].items():
        assert after["processors"][name] is proc, name
    for key in ("module_types", "hooks", "registry", "peft", "active", "dict"):
        assert after[key] == before[key], key


# (fixtures `folder` and `model`: tests/reliability/conftest.py)


def _broken_copy(folder, tmp_path, name, action):
    import shutil

    out = tmp_path / "broken"
    shutil.copytree(folder, out)
    if action == "missing":
        (out / name).unlink()
    else:  # truncated: a job killed while writing
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize("name", [W.SLA_FILE, W.LORA_FILE])
@pytest.mark.parametrize("action", ["missing", "truncated"])
def test_a_broken_weights_folder_leaves_the_model_as_before(model, folder, tmp_path, name, action):
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    before = snapshot(model)
    broken = _broken_copy(folder, tmp_path, name, action)
    with pytest.raises(ValueError, match="weights=") as err:
        dit_accel.apply(model, SLA, backend="torch", weights=broken)
    assert name in str(err.value) and "\n" not in str(err.value)
    assert_unchanged(model, before)
    assert torch.equal(_run(model, kwargs), dense)


def test_the_sla_file_failing_after_the_lora_loaded_unloads_the_lora(model, folder, monkeypatch):
    """The issue's order: the LoRA is in, then the projections fail (here: the file vanishes after the
    checks). The LoRA goes out again, and the model's output is the dense one bit for bit."""
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    before = snapshot(model)
    real = W._load_lora

    def load_then_lose_the_file(transformer, path):
        real(transformer, path)
        assert transformer.peft_config  # the LoRA is loaded at this point
        raise ValueError(f"weights={str(path)!r} is missing {W.SLA_FILE} (the method is SLA).")

    monkeypatch.setattr(W, "_load_lora", load_then_lose_the_file)
    with pytest.raises(ValueError, match=W.SLA_FILE):
        dit_accel.apply(model, SLA, backend="torch", weights=folder)
    assert_unchanged(model, before)
    assert torch.equal(_run(model, kwargs), dense)


def test_the_users_own_lora_stays_as_it_was_when_weights_fail(model, folder, monkeypatch):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"], init_lora_weights=False),
                      adapter_name="mine")
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    mine = _run(model, kwargs)
    before = snapshot(model)
    real = W._load_lora

    def load_then_fail(transformer, path):
        real(transformer, path)
        raise Injected("injected failure after the LoRA loaded")

    monkeypatch.setattr(W, "_load_lora", load_then_fail)
    with pytest.raises(Injected):
        dit_accel.apply(model, SLA, backend="torch", weights=folder)
    assert_unchanged(model, before)
    assert torch.equal(_run(model, kwargs), mine)


def test_bad_arguments_and_unsupported_layers_change_nothing(model):
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    before = snapshot(model)
    for call, match in [
        (lambda: dit_accel.apply(model, "tile"), "method"),
        (lambda: dit_accel.apply(model, GNA, dense_layers=[7]), "dense_layers"),
        (lambda: dit_accel.apply(model, GNA, layer_methods={5: SLA}), "layer_methods"),
        (lambda: dit_accel.apply(model, GNA, backend="cuda"), "backend"),
        (lambda: dit_accel.apply(model, GNA, weights=3), "weights"),
        (lambda: dit_accel.apply(model, GNA, weights="/nonexistent/folder"), "weights"),
        (lambda: dit_accel.apply(model, GNA, dense_steps=-1), "dense_steps"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            call()
        assert_unchanged(model, before)
    # A layer dit_accel cannot wrap (a trainable processor) is found before anything changes.
    attn = model.blocks[1].attn1
    original = attn.processor
    attn.processor = torch.nn.Identity()
    before = snapshot(model)
    with pytest.raises(ValueError, match="blocks.1.attn1"):
        dit_accel.apply(model, GNA)
    assert_unchanged(model, before)
    del attn.processor  # (a submodule now)
    attn.processor = original
    assert torch.equal(_run(model, kwargs), dense)


class Injected(RuntimeError):
    pass


def _fail_at(obj, attr, n, monkeypatch):
    """Make ``obj.attr`` raise at its n-th call (1-based); earlier calls run it."""
    if isinstance(obj, str):
        obj = importlib.import_module(obj)
    real = getattr(obj, attr, None)
    if real is None:  # an internal of another module that has since changed: nothing to inject here
        pytest.skip(f"{obj.__name__}.{attr} no longer exists")
    calls = [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise Injected(f"injected failure in {attr} (call {n})")
        return real(*args, **kwargs)

    if isinstance(obj, type) and attr in obj.__dict__ and not isinstance(obj.__dict__[attr], staticmethod):
        monkeypatch.setattr(obj, attr, lambda *a, **k: step(*a, **k))
    else:
        monkeypatch.setattr(obj, attr, step)


# Every step of apply(), in order; (where, name, which call fails).
STAGES = [
    (A, "_check_apply_args", 1), (A, "_find_transformers", 1), (A, "attention_modules", 1), (A, "preset_for", 1),
    (A, "_resolve_layers", 1), (A, "_check_weights_folder", 1), (A, "_applied_handles", 1),
    (A, "_install", 1), (A, "_sla_projection", 1), (A, "_sla_projection", 2), (H.TransformerHook, "install", 1),
    (H.SparseAttnProcessor, "__init__", 1), (H.SparseAttnProcessor, "__init__", 2),
    (H.TransformerHook, "_hook_forward", 1), (torch.nn.Module, "register_forward_hook", 1),
    (A.AccelHandle, "load_weights", 1), (Hd, "load_into", 1), (W, "_check_method", 1), (W, "_load_lora", 1),
    ("safetensors.torch", "load_file", 1), (A.AccelHandle, "_guard_fuse", 1),
]


def _stage_id(stage):
    where, name, n = stage
    where = where if isinstance(where, str) else where.__name__
    return f"{where.rsplit('.', 1)[-1]}.{name}#{n}"


@pytest.mark.parametrize("stage", STAGES, ids=_stage_id)
@pytest.mark.parametrize("previous", [False, True], ids=["clean", "applied"])
def test_a_failure_at_any_step_of_apply_changes_nothing(folder, stage, previous, monkeypatch):
    model = build_tiny_transformer("wan", seed=3)
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    old = dit_accel.apply(model, GNA, backend="torch") if previous else None
    out = _run(model, kwargs)
    before = snapshot(model)
    where, name, n = stage
    _fail_at(where, name, n, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            handle = dit_accel.apply(model, SLA, backend="torch", weights=folder)
        except (Injected, dit_accel.BadFileError):  # a reader may report the injected failure as a bad file
            handle = None
    monkeypatch.undo()
    if handle is not None:  # this step did not run in this configuration: nothing to check but a clean remove
        handle.remove()
        pytest.skip(f"{_stage_id(stage)} is not reached")
    assert_unchanged(model, before)
    assert torch.equal(_run(model, kwargs), out)
    if old is not None:  # the earlier handle is still applied and works
        assert not old.removed and old.stats()[0]["sparse_calls"] == 2
        old.remove()
        assert torch.equal(_run(model, kwargs), _run(build_tiny_transformer("wan", seed=3), kwargs))
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_apply_twice_warns_naming_the_handle_it_removes(model):
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    first = dit_accel.apply(model, GNA, backend="torch")
    sparse = _run(model, kwargs)
    with pytest.warns(dit_accel.DitAccelWarning, match=r"AccelHandle\(GNA\(kernel_size=\(2, 3, 3\).*was removed first"):
        second = dit_accel.apply(model, dit_accel.Dense(), backend="torch")
    assert first.removed and not second.removed
    assert any("was removed first" in w for w in second.warnings)
    assert torch.equal(_run(model, kwargs), dense)
    with pytest.raises(RuntimeError, match=r"handle.stats\(\).*removed"):
        first.stats()
    first.remove()  # a no-op: the handle is gone already, and the new one stays
    assert not second.removed and torch.equal(_run(model, kwargs), dense)
    second.remove()
    second.remove()
    third = dit_accel.apply(model, GNA, backend="torch")  # apply after remove: as the first time
    assert torch.equal(_run(model, kwargs), sparse)
    third.remove()
    assert not model._forward_pre_hooks and torch.equal(_run(model, kwargs), dense)


def test_a_removed_handle_refuses_its_methods_by_name(model):
    handle = dit_accel.apply(model, SLA, backend="torch")
    handle.remove()
    for call, name in [(lambda: handle.stats(), "stats()"), (lambda: handle.summary(), "summary()"),
                       (lambda: handle.set_step(0, 2), "set_step()"), (lambda: handle.plan(SLA, (4, 8, 8)), "plan()"),
                       (lambda: handle.plans, "plans"), (lambda: handle.sla_projections(), "sla_projections()"),
                       (lambda: handle.bypassed(), "bypassed()"), (lambda: handle.load_weights("x"), "load_weights()")]:
        with pytest.raises(RuntimeError) as err:
            call()
        message = str(err.value)
        assert f"handle.{name}" in message and "removed" in message and "\n" not in message
    handle.remove()
    assert handle.removed and isinstance(handle.warnings, list) and "removed" in repr(handle)


def test_fuse_lora_over_dit_accels_adapter_is_refused_and_remove_restores(model, folder):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"], init_lora_weights=False),
                      adapter_name="mine")
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    mine = _run(model, kwargs)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = dit_accel.apply(model, SLA, backend="torch", weights=folder)
    trained = _run(model, kwargs)
    for names in (None, ["dit_accel"], "dit_accel", ["mine", "dit_accel"]):
        with pytest.raises(RuntimeError, match=r"fuse_lora\(adapter_names=.*handle.remove\(\)") as err:
            model.fuse_lora(adapter_names=names)
        assert "\n" not in str(err.value)
    assert torch.equal(_run(model, kwargs), trained)  # nothing was fused
    handle.remove()
    assert_unchanged(model, before)
    assert torch.equal(_run(model, kwargs), mine)
    model.fuse_lora(adapter_names=["mine"])  # after remove: Diffusers' own method again


def test_fuse_lora_of_the_users_own_adapter_is_allowed_while_applied(model, folder):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"], init_lora_weights=False),
                      adapter_name="mine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = dit_accel.apply(model, SLA, backend="torch", weights=folder)
    model.fuse_lora(adapter_names=["mine"])
    assert any("mine" in m.merged_adapters for m in model.modules() if hasattr(m, "merged_adapters"))
    handle.remove()
    assert "dit_accel" not in model.peft_config and "fuse_lora" not in model.__dict__


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copying_an_applied_model_is_refused_in_one_line_and_works_after_remove(model, how):
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    copy_of = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m))}[how]
    handle = dit_accel.apply(model, SLA, backend="torch")
    sparse = _run(model, kwargs)
    with pytest.raises(TypeError, match=r"cannot deepcopy or pickle WanTransformer3DModel.*handle.remove\(\)") as err:
        copy_of(model)
    assert "\n" not in str(err.value)
    assert torch.equal(_run(model, kwargs), sparse)  # the refused copy changed nothing
    handle.remove()
    twin = copy_of(model)
    assert torch.equal(_run(twin, kwargs), dense)
    with dit_accel.apply(twin, SLA, backend="torch"):
        assert torch.equal(_run(twin, kwargs), sparse)


def test_replacing_a_handle_with_weights_by_failing_weights_leaves_the_original_model(model, folder, monkeypatch):
    """Both handles load the adapter "dit_accel": the earlier one's goes before the new one loads, so when the
    new load fails the earlier handle cannot come back. It stays removed, a warning says so, and the model is
    exactly the model before either apply."""
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = dit_accel.apply(model, SLA, backend="torch", weights=folder)
    _fail_at(W, "_load_lora", 1, monkeypatch)
    with pytest.warns(dit_accel.DitAccelWarning, match="stays removed"), pytest.raises(Injected):
        dit_accel.apply(model, SLA, backend="torch", weights=folder)
    assert old.removed
    assert_unchanged(model, before)
    assert torch.equal(_run(model, kwargs), dense)


def test_load_weights_that_fail_keep_the_handle_and_its_projections(model, folder, tmp_path):
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    handle = dit_accel.apply(model, SLA, backend="torch")
    sparse = _run(model, kwargs)
    before = snapshot(model)
    projections = {k: p.weight.detach().clone() for k, p in handle.sla_projections().items()}
    with pytest.raises(ValueError, match="weights="):
        handle.load_weights(_broken_copy(folder, tmp_path, W.SLA_FILE, "truncated"))
    assert_unchanged(model, before)
    assert all(torch.equal(p.weight, projections[k]) for k, p in handle.sla_projections().items())
    assert torch.equal(_run(model, kwargs), sparse)
    handle.remove()
    assert torch.equal(_run(model, kwargs), dense)


def test_an_adapter_merged_behind_dit_accels_back_is_unmerged_by_remove_with_a_warning(model, folder):
    """peft's own merge (not fuse_lora, which is refused) cannot be undone bit for bit: remove() unmerges it,
    says so, and the model is the original up to rounding."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = _run(model, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = dit_accel.apply(model, SLA, backend="torch", weights=folder)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=["dit_accel"])
    with pytest.warns(dit_accel.DitAccelWarning, match="unmerged it"):
        handle.remove()
    assert not getattr(model, "peft_config", None)
    torch.testing.assert_close(_run(model, kwargs), dense, atol=1e-5, rtol=1e-5)
