"""Per-head windows (Tile, GNA, a FastVideo strategy file) are refused by ``apply`` when their head count is not
the model's, before the model changes; they failed at the first transformer call, after the text encoders ran."""

import json

import pytest

import dit_accel
from dit_accel.models.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("tiny-wan")  # 2 heads per attention layer


def _strategy(tmp_path, heads):
    path = tmp_path / f"strategy_h{heads}.json"
    path.write_text(json.dumps({f"{s}_{l}_{h}": [1, 1, 1] for s in range(2) for l in range(2) for h in range(heads)}))
    return dit_accel.Tile.from_strategy(str(path), tile=(1, 2, 2)), str(path)


def test_per_head_windows_for_another_head_count_are_refused_before_the_model_changes(pipe, tmp_path):
    strategy, path = _strategy(tmp_path, 4)
    cases = [(strategy, f"{path} has windows for 4 heads per layer, but WanTransformer3DModel's attention layers "
                        "run 2 heads: use a strategy searched for this model"),
             (dit_accel.Tile(tile=(1, 2, 2), window=[(1, 1, 1)] * 3), "Tile has windows for 3 heads per layer, .* "
                                                                       "give one window per head, or one window"),
             (dit_accel.GNA(kernel_size=[(2, 3, 3)] * 3), "GNA has windows for 3 heads per layer")]
    for method, message in cases:
        processors = dict(pipe.transformer.attn_processors)
        with pytest.raises(ValueError, match=message):
            dit_accel.apply(pipe, method)
        assert dict(pipe.transformer.attn_processors) == processors
        with pytest.raises(ValueError, match="heads per layer"):  # as a per-layer method too
            dit_accel.apply(pipe, dit_accel.Dense(), layer_methods={1: method})


def test_per_head_windows_for_the_models_heads_are_taken(pipe, tmp_path):
    for method in (_strategy(tmp_path, 2)[0], dit_accel.Tile(tile=(1, 2, 2), window=[(1, 1, 1), (1, 3, 3)]),
                   dit_accel.Tile(tile=(1, 2, 2), window=(1, 3, 3))):
        dit_accel.apply(pipe, method).remove()
