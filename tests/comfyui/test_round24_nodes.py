"""Round 24 (trust): the nodes' common widgets linked from another node's output (a None, a text, a value out of
range), the number widgets' ranges as the method configs have them, and the patched model against ComfyUI's own
attention where a sampler batches prompts of other lengths or another node's override sits on top."""

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.pipelines.apply_checks import BACKENDS
from tests.comfyui.models import COMMON_WIDGETS as COMMON, CASES, override_of, run_node, with_override

TILE = dict(tile="1,2,2", window="3,1,1", block_size="")


def _spec(node: str, widget: str) -> dict:
    return NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"][widget][1]


def test_a_none_linked_into_dense_above_sigma_is_refused_naming_it(wan):
    """An any-type node's None (an empty optional output) ran as 0, off, without a word, where a None in a method
    widget with a default is refused (round 23): the user had linked a threshold."""
    with pytest.raises(ValueError) as err:
        run_node("DitAccelTile", wan, **TILE, **dict(COMMON, dense_above_sigma=None))
    text = str(err.value)
    assert text.startswith("dit_accel: widget dense_above_sigma=None is invalid: a sigma >= 0")
    assert "link a value, or type one" in text and "\n" not in text


def test_a_none_in_dense_layers_is_its_blank_default(wan):
    """dense_layers' default is blank (no layer dense), as a method widget whose default is blank: its None is that
    default, not an error (consistent with round 23's rule)."""
    patched = run_node("DitAccelTile", wan, **TILE, **dict(COMMON, dense_layers=None, dense_above_sigma=0.5))
    patch = override_of(patched).patch
    assert patch.schedule.dense_layers == frozenset() and patch.dense_above_sigma == 0.5


@pytest.mark.parametrize("widget, value, says", [
    ("backend", None, f"choose one of {', '.join(BACKENDS)}"),
    ("backend", "cuda", f"choose one of {', '.join(BACKENDS)}"),
    ("dense_layers", ["a"], "N (the first N layers), a list like 0,5,7, or empty"),
], ids=["backend-none", "backend-other", "layers-list-of-text"])
def test_a_bad_common_widget_linked_is_said_as_the_widget(wan, widget, value, says):
    """Such values were refused in patch_model's Python words (``backend=None is invalid``; ``dense_layers=['a']``:
    "expected a list of non-negative ints or None"), not as the node's widget."""
    with pytest.raises(ValueError) as err:
        run_node("DitAccelTile", wan, **TILE, **dict(COMMON, **{widget: value}))
    assert str(err.value).startswith(f"dit_accel: widget {widget}={value!r} is invalid: {says}")


def test_the_file_nodes_say_a_bad_backend_as_the_widget(wan, tmp_path):
    from tests.comfyui.test_weights import _folder

    folder = _folder(tmp_path / "ft", dit_accel.Dense())
    with pytest.raises(ValueError, match=r"^dit_accel: widget backend=None is invalid: choose one of auto"):
        run_node("DitAccelFinetuned", wan, weights_path=str(folder), backend=None)


@pytest.mark.parametrize("node, widget, low, high", [
    ("DitAccelSLA", "topk", 0.001, 1.0), ("DitAccelSLA", "negligible", 0.0, 1.0),
    ("DitAccelSLA", "linear_eps", 1e-6, 1.0), ("DitAccelRadial", "decay", 0.001, 1.0),
], ids=["sla-topk", "sla-negligible", "sla-linear-eps", "radial-decay"])
def test_fraction_widgets_have_the_configs_range(node, widget, low, high):
    """FLOAT widgets went up to 1e6 (and down to 0) where the config takes (0, 1]: ComfyUI's own validation let
    topk=5 through, and the node failed when the workflow ran."""
    spec = _spec(node, widget)
    assert (spec["min"], spec["max"]) == (low, high)
    assert spec["min"] <= spec["default"] <= spec["max"]


def test_unbounded_float_widgets_keep_their_wide_range():
    """A sigma has no fixed range (SD's run to 14.6, EDM's higher): its widget stays wide."""
    spec = _spec("DitAccelTile", "dense_above_sigma")
    assert (spec["min"], spec["max"]) == (0.0, 1e6)


def test_full_density_sla_equals_comfyuis_own_with_prompts_of_other_lengths_batched(comfy, models):
    """Audit: cfg 2 with a negative of another length than the positive (FLUX's text is a CONDRegular in ComfyUI
    0.3.64, which batches only same-shape conditioning, so the two run as calls of their own): the joint attention's
    text count follows each call, and the result is ComfyUI's."""
    c = CASES["flux"]  # (joint attention: the text's length is counted per call)
    model = models("flux")
    context, extra = c.cond()[0]
    negative = [[torch.randn(1, 4, context.shape[2], generator=torch.Generator().manual_seed(7)), dict(extra)]]
    noise = torch.randn(c.latent, generator=torch.Generator().manual_seed(5))

    def run(m):
        return comfy.sample.sample(m, noise, 2, 2.0, "euler", "simple", [[context, extra]], negative,
                                   torch.zeros(c.latent), seed=0, disable_pbar=True)

    own = run(model)
    patched = patch_model(model, dit_accel.SLA(topk=1.0), backend="torch")
    ours = override_of(patched)
    seen = []

    def after(func, *args, **kwargs):  # another node's override set after ours, handing calls on
        seen.append(1)
        return ours(func, *args, **kwargs)

    torch.testing.assert_close(run(with_override(patched, after)), own, rtol=0, atol=1e-5)
    assert seen and "sparse" in ours.patch.report.lines[-1]


def test_numpy_numbers_linked_into_number_widgets_run_as_their_values(wan, tmp_path):
    """A node that gives numpy scalars (np.float32(0.5), np.float32(2.0)) was refused as if the value were bad:
    "dense_above_sigma=np.float32(0.5) is invalid: a sigma >= 0 and finite", "dense_steps=np.float32(2.0) is invalid:
    a whole number", "lora_strength=np.float64(0.5) is invalid: a finite number"."""
    import numpy as np

    from tests.comfyui.test_weights import _folder, _lora

    widgets = dict(COMMON, dense_above_sigma=np.float32(0.5), dense_steps=np.float32(2.0), dense_layers=[np.int64(1)])
    patch = override_of(run_node("DitAccelTile", wan, **TILE, **widgets)).patch
    assert (patch.dense_above_sigma, patch.schedule.dense_steps, patch.schedule.dense_layers) == (0.5, 2, {1})
    assert type(patch.dense_above_sigma) is float
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora=_lora(torch.Generator().manual_seed(1)))
    patched = run_node("DitAccelFinetuned", wan, weights_path=str(folder), lora_strength=np.float64(0.5))
    assert {p[0] for patches in patched.patches.values() for p in patches} == {0.5}
    with pytest.raises(ValueError, match=r"^lora_strength=np.float64\(nan\) is invalid: a finite number"):
        patch_model(wan, dit_accel.Dense(), weights=folder, lora_strength=np.float64("nan"))
