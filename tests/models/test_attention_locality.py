"""The locality training term (dit_accel.models.attention_locality, train_tiny --locality): the attention mass it
reports against a brute-force reading of the same attention, that it leaves the transformer as it was, and that its
gradient moves attention into the pattern."""

from __future__ import annotations

import json

import pytest
import torch

import dit_accel
from dit_accel.models import train_tiny
from dit_accel.models.attention_locality import AttentionLocality, pattern_mask
from dit_accel.models.tiny_shapes import TINY_SHAPES_DIR

GRID = (5, 4, 4)  # latent frames, token rows, token columns (patch 2x2 of an 8x8 latent)


def _transformer(seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(train_tiny.TRANSFORMER_CONFIG, num_layers=2)
    return WanTransformer3DModel(**cfg).eval()


def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    t, h, w = GRID
    return dict(hidden_states=torch.randn(batch, 6, t, 2 * h, 2 * w, generator=g),
                timestep=torch.tensor([900.0, 300.0][:batch]),
                encoder_hidden_states=torch.randn(batch, 8, 64, generator=g), return_dict=False)


def _frame_window_inside(t_len, per_frame, radius):
    """Brute force: key frame within ``radius`` of the query frame's centre, the centre clamped inward (STA)."""
    n = t_len * per_frame
    inside = torch.zeros(n, n)
    for qi in range(n):
        centre = min(max(qi // per_frame, radius), t_len - 1 - radius)
        for ki in range(n):
            inside[qi, ki] = float(abs(ki // per_frame - centre) <= radius)
    return inside


def _captured_qk(model, inputs):
    """q, k of every self-attention call, caught at SDPA independently of the module under test."""
    calls, original = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):  # Diffusers passes them by name
        if query.shape[-2] == key.shape[-2]:
            calls.append((query.detach(), key.detach()))
        return original(query, key, value, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    return calls


def test_outside_mass_matches_a_brute_force_reading():
    model, inputs = _transformer(), _inputs()
    method = dit_accel.Tile(tile=(1, 4, 4), window=(3, 1, 1))
    with torch.no_grad(), AttentionLocality(model, method, queries=10_000) as watcher:
        model(**inputs)
        got = watcher.outside()
    calls = _captured_qk(model, inputs)
    assert len(calls) == 2  # one self-attention per block; cross-attention is not counted
    inside = _frame_window_inside(GRID[0], GRID[1] * GRID[2], radius=1)
    want = []
    for q, k in calls:
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        want.append(1 - (p * inside).sum(-1).mean(dim=(1, 2)))
    torch.testing.assert_close(got, torch.stack(want).mean(0), rtol=1e-5, atol=1e-6)
    assert got.shape == (2,) and bool((got > 0.05).all())  # random weights spread attention over the clip


def test_sampled_queries_estimate_the_same_mass():
    model, inputs = _transformer(), _inputs(batch=1)
    method = dit_accel.Tile(tile=(1, 4, 4), window=(3, 1, 1))
    with torch.no_grad(), AttentionLocality(model, method, queries=10_000) as full:
        model(**inputs)
        exact = full.outside()
    with torch.no_grad(), AttentionLocality(model, method, queries=40,
                                            generator=torch.Generator().manual_seed(0)) as sampled:
        model(**inputs)
        estimate = sampled.outside()
    assert abs(float(estimate - exact)) < 0.05 and float(estimate) != float(exact)


def test_leaves_the_transformer_and_sdpa_as_they_were():
    model, inputs = _transformer(), _inputs()
    original = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        before = model(**inputs)[0]
        with AttentionLocality(model, dit_accel.Tile(tile=(1, 4, 4), window=(3, 1, 1))) as watcher:
            during = model(**inputs)[0]
            watcher.outside()
        after = model(**inputs)[0]
    assert torch.nn.functional.scaled_dot_product_attention is original
    assert not model._forward_pre_hooks and not any(m._forward_hooks or m._forward_pre_hooks
                                                     for m in model.modules())
    torch.testing.assert_close(during, before)
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="no self-attention call"):
        watcher.outside()


def test_the_term_moves_attention_into_the_pattern():
    model, inputs = _transformer(), _inputs()
    model.train()
    method = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))  # each frame to itself only
    params = [p for n, p in model.named_parameters() if "attn1" in n]
    opt = torch.optim.Adam(params, lr=3e-2)
    with AttentionLocality(model, method, queries=10_000) as watcher:
        values = []
        for _ in range(15):
            model(**inputs)
            term = watcher.outside().mean()
            opt.zero_grad()
            term.backward()
            opt.step()
            values.append(float(term.detach()))
    assert values[-1] < 0.5 * values[0], values


def test_patterns_and_refusals():
    mask = pattern_mask(dit_accel.Tile(tile=(1, 4, 4), window=(3, 1, 1)), GRID)
    torch.testing.assert_close(mask.float(), _frame_window_inside(GRID[0], 16, 1))
    assert bool(pattern_mask(dit_accel.Dense(), GRID).all())
    assert pattern_mask(dit_accel.Tile(tile=(1, 4, 4), window=((1, 1, 1), (3, 1, 1))), GRID).shape == (2, 80, 80)
    with pytest.raises(ValueError, match="fixed by the grid"):
        pattern_mask(dit_accel.SLA(topk=0.2), GRID)
    with pytest.raises(ValueError, match="queries"):
        AttentionLocality(_transformer(), dit_accel.Dense(), queries=0)


def test_train_tiny_records_the_term_and_refuses_data_dependent_methods(tmp_path, capsys):
    method = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
    log = train_tiny.train(tmp_path, steps=2, batch_size=2, lr=1e-3, warmup=1, short_fraction=0.0, eval_seeds=(),
                           frames=5, size=16, init=TINY_SHAPES_DIR, log_every=1, locality=method, locality_weight=0.5)
    assert log["settings"]["locality"] == method.to_dict() and log["settings"]["locality_weight"] == 0.5
    assert all(0 < p["outside"] < 1 for p in log["curve"]), log["curve"]
    with pytest.raises(SystemExit):
        train_tiny.main(["--out", str(tmp_path / "x"), "--locality", json.dumps({"method": "sla", "topk": 0.2})])
    assert "--locality" in capsys.readouterr().err


def test_locality_term_only_for_samples_at_or_below_the_noise_limit():
    """With max_noise between the two samples' levels, the term is the quieter sample's mass alone."""
    from types import SimpleNamespace

    model, inputs = _transformer(), _inputs()
    pipe = SimpleNamespace(transformer=model)
    method = dit_accel.Tile(tile=(1, 4, 4), window=(3, 1, 1))
    watcher = AttentionLocality(model, method, queries=10_000)
    target = torch.zeros(2, 6, *[s * f for s, f in zip(GRID, (1, 2, 2))])
    with torch.no_grad():
        loss = train_tiny._locality_loss(pipe, inputs, target, watcher, 2.0, 0.5)
        with watcher:
            pred = model(**inputs)[0]
            per_sample = watcher.outside()
    assert watcher.last == pytest.approx(float(per_sample[1]), rel=1e-5)
    want = torch.nn.functional.mse_loss(pred, target) + 2.0 * per_sample[1]
    torch.testing.assert_close(loss, want)
    with torch.no_grad():
        train_tiny._locality_loss(pipe, inputs, target, watcher, 2.0, 0.1)
    assert watcher.last is None


def test_a_schedule_holds_each_sample_to_the_pattern_of_its_noise_level():
    """Levels (0.95, 0.5): the sample at noise 0.9 is held to the wide window, the one at 0.3 to the narrow one;
    the log and settings record the schedule."""
    from types import SimpleNamespace

    model, inputs = _transformer(), _inputs()
    pipe = SimpleNamespace(transformer=model)
    wide, narrow = (dit_accel.Tile(tile=(1, 4, 4), window=(w, 1, 1)) for w in (3, 1))
    schedule = train_tiny._locality_schedule([(0.5, narrow), (0.95, wide)], 1.0)
    assert schedule == ((0.95, wide), (0.5, narrow))
    watcher = AttentionLocality(model, (wide, narrow), queries=10_000)
    target = torch.zeros(2, 6, *[s * f for s, f in zip(GRID, (1, 2, 2))])
    with torch.no_grad():
        loss = train_tiny._locality_loss(pipe, inputs, target, watcher, 1.0, (0.95, 0.5))
        with watcher:
            pred = model(**inputs)[0]
            both = watcher.outside()
    assert both.shape == (2, 2) and bool((both[1] > both[0]).all())  # the narrow window leaves out more
    want = torch.nn.functional.mse_loss(pred, target) + (both[0, 0] + both[1, 1]) / 2
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="noise level"):
        train_tiny._locality_schedule([(1.5, narrow)], 1.0)
    with pytest.raises(ValueError, match="fixed by the grid"):
        train_tiny._locality_schedule([(0.5, dit_accel.SLA(topk=0.2))], 1.0)


def test_cli_reads_a_locality_schedule_and_refuses_a_bad_one(capsys):
    parser = train_tiny.argparse.ArgumentParser()
    wide = {"method": "tile", "tile": [1, 4, 4], "window": [3, 1, 1]}
    narrow = {"method": "tile", "tile": [1, 4, 4], "window": [1, 1, 1]}
    pairs = train_tiny._method_arg(parser, "--locality", json.dumps([[0.9, wide], [0.5, narrow]]))
    assert [level for level, _ in pairs] == [0.9, 0.5] and pairs[1][1].window == (1, 1, 1)
    assert train_tiny._locality_record(pairs) == [[0.9, pairs[0][1].to_dict()], [0.5, pairs[1][1].to_dict()]]
    for bad in ([[0.9]], [[2.0, wide]], [[0.5, {"method": "sla", "topk": 0.2}]]):
        with pytest.raises(SystemExit):
            train_tiny._method_arg(parser, "--locality", json.dumps(bad))
        assert "--locality" in capsys.readouterr().err


def test_local_and_locality_together_are_refused(tmp_path):
    method = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
    with pytest.raises(ValueError, match="give one"):
        train_tiny.train(tmp_path, steps=1, frames=5, init=TINY_SHAPES_DIR, eval_seeds=(), local=method,
                         locality=method)
    assert not any(tmp_path.iterdir())
