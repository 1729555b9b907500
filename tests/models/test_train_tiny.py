"""train_tiny's fine-tuning arguments (--init, --frames, --time-limit): a few steps at a tiny size."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dit_accel.models import train_tiny
from dit_accel.models.tiny_shapes import TINY_SHAPES_DIR

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    log = train_tiny.train(out, steps=2, batch_size=1, lr=1e-3, warmup=1, short_fraction=0.0, ema_decay=0.5,
                           eval_seeds=(), frames=5, init=TINY_SHAPES_DIR, log_every=1)
    return out, log


def test_finetune_starts_from_init_and_moves_its_weights(finetuned):
    out, log = finetuned
    assert log["steps_done"] == 2 and [p["step"] for p in log["curve"]] == [1, 2]
    assert log["settings"]["frames"] == 5 and log["settings"]["init"] == str(TINY_SHAPES_DIR)
    start, end = load_file(TINY_SHAPES_DIR / WEIGHTS), load_file(out / WEIGHTS)
    assert start.keys() == end.keys()
    # proj_out is zero in a fresh build: starting from the shipped weights keeps it near them, not near 0.
    for name in ("proj_out.weight", "blocks.0.attn1.to_q.weight"):
        diff = (end[name] - start[name]).abs().max().item()
        assert 0 < diff < 0.05 * start[name].abs().max().item(), (name, diff)
    # The codec's normalisation comes from the init folder, not from fresh statistics of 5-frame clips.
    vae = [json.loads((d / "vae" / "config.json").read_text()) for d in (TINY_SHAPES_DIR, out)]
    assert vae[0]["latents_mean"] == vae[1]["latents_mean"] and vae[0]["latents_std"] == vae[1]["latents_std"]
    assert json.loads((out / "train_log.json").read_text())["steps_done"] == 2


def test_time_limit_zero_saves_the_init_weights(tmp_path):
    log = train_tiny.train(tmp_path, steps=5, batch_size=1, short_fraction=0.0, eval_seeds=(), frames=5,
                           init=TINY_SHAPES_DIR, time_limit=0.0)
    assert log["steps_done"] == 0 and log["curve"] == []
    start, end = load_file(TINY_SHAPES_DIR / WEIGHTS), load_file(tmp_path / WEIGHTS)
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_rejects_even_frames_and_init_equal_to_out(tmp_path):
    with pytest.raises(ValueError, match="odd"):
        train_tiny.train(tmp_path, steps=1, frames=8, init=TINY_SHAPES_DIR, eval_seeds=())
    with pytest.raises(SystemExit):
        train_tiny.main(["--init", str(tmp_path), "--out", str(tmp_path)])


def test_defaults_are_the_shipped_run():
    """Without the new arguments the command line is the run that made the shipped weights."""
    captured, threads = {}, torch.get_num_threads()
    original = train_tiny.train
    try:
        train_tiny.train = lambda out, **kw: captured.update(kw, out=out) or {"steps_done": 0, "train_seconds": 0,
                                                                                "parameters": {}}
        train_tiny.main([])
    finally:
        train_tiny.train = original
        torch.set_num_threads(threads)
    assert captured["frames"] == 7 and captured["init"] is None and captured["time_limit"] is None
    assert captured["steps"] == 3600 and captured["batch_size"] == 16 and captured["short_fraction"] == 0.65
