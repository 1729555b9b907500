"""LTX-Video, LTX-2 and MiniMax-H3 under Ring context parallelism: refused up front.

Their presets leave layers to Diffusers (LTX-Video's cross-attention, LTX-2's audio and cross-modal attention,
MiniMax-H3's text refiner) that Diffusers still runs under its own Ring, which needs a log-sum-exp the native
backend does not return ("Native attention does not support return_lse=True", mid-call, also without dit_accel).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from dit_accel.models import tiny as T
from dit_accel.pipelines.parallel import check_ring_layers
from dit_accel.pipelines.presets import preset_for
from tests.torchrun import torchrun

HERE = Path(__file__).resolve().parent


def _config(ulysses: int, ring: int):
    return SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=ulysses, ring_degree=ring))


def _model(name: str):
    import diffusers

    entry = T.TRANSFORMERS[name]
    return getattr(diffusers, entry.class_name)(**entry.config)


@pytest.mark.parametrize("name", ["ltx", "ltx2", "minimax_h3"])
def test_ring_is_refused_while_diffusers_own_layers_use_the_native_backend(name):
    model = _model(name)
    preset = preset_for(model)
    with pytest.raises(ValueError, match=r"under Ring context parallelism fails in Diffusers' own .*'native'.* "
                                         r"use Ulysses only"):
        check_ring_layers(model, preset, _config(1, 2))
    with pytest.raises(ValueError, match="Ring"):  # Ulysses x Ring runs Diffusers' Ring too
        check_ring_layers(model, preset, _config(2, 2))
    check_ring_layers(model, preset, _config(2, 1))  # Ulysses: no log-sum-exp needed


def test_ring_is_left_to_a_backend_that_returns_the_log_sum_exp():
    model = _model("ltx")
    for name, module in model.named_modules():
        if name.endswith("attn2"):
            module.processor._attention_backend = "flash"  # as set_attention_backend would (never run here)
    check_ring_layers(model, preset_for(model), _config(1, 2))
    wan = _model("wan")  # Wan's cross-attention does not take part in Diffusers' context parallelism
    check_ring_layers(wan, preset_for(wan), _config(1, 2))


def test_ltx_ring_is_refused_in_both_call_orders_and_ulysses_matches_one_process(tmp_path):
    out = tmp_path / "ltx.json"
    torchrun(2, HERE / "cp_worker.py", "ltx", out, timeout=300)
    result = json.loads(out.read_text())
    assert "return_lse" in result["ring/plain"]  # Diffusers alone fails mid-call: the reason of the refusal
    for order in ("apply-first", "parallel-first"):
        assert "Ring context parallelism fails in Diffusers' own cross-attention" in result[f"ring/{order}"], order
    assert result["ulysses/tile"]["diff"] == 0.0 and result["ulysses/tile"]["sparse_calls"] > 0
    # a refused Ring left the model as it was (Diffusers had recorded the config on it: "Parallelism is already
    # applied" for the next enable_parallelism before), so Ulysses on the same model runs, exactly
    assert result["ring-refused/parallel_config"] == "None"
    assert result["ring-refused/then-ulysses"] == "" and result["ring-refused/then-ulysses/diff"] == 0.0
