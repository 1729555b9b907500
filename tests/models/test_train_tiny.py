"""train_tiny's fine-tuning arguments (--init, --frames, --size, --time-limit, --local): a few steps at a tiny size."""

from __future__ import annotations

import json
import math

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
    # The starting folder as the package names it, the same on every machine (no absolute path of this one).
    assert log["settings"]["frames"] == 5 and log["settings"]["init"] == "dit_accel/models/weights/tiny-shapes"
    start, end = load_file(TINY_SHAPES_DIR / WEIGHTS), load_file(out / WEIGHTS)
    assert start.keys() == end.keys()
    # proj_out is zero in a fresh build: starting from the shipped weights keeps it near them, not near 0.
    for name in ("proj_out.weight", "blocks.0.attn1.to_q.weight"):
        diff = (end[name] - start[name]).abs().max().item()
        assert 0 < diff < 0.05 * start[name].abs().max().item(), (name, diff)
    # The codec's normalisation comes from the init folder, not from fresh statistics of 5-frame clips.
    vae = [json.loads((d / "vae" / "config.json").read_text()) for d in (TINY_SHAPES_DIR, out)]
    assert vae[0]["latents_mean"] == vae[1]["latents_mean"] and vae[0]["latents_std"] == vae[1]["latents_std"]
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["steps_done"] == 2
    # The log carries the lineage: the init folder's own log, whole (stage after stage for a chain of fine-tunes).
    assert saved["init_log"] == json.loads((TINY_SHAPES_DIR / "train_log.json").read_text())


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


def test_size_trains_on_larger_canvases(tmp_path):
    """--size: clips rendered at size x size pixels (latents at half that), recorded in the log; the saved model
    is the same architecture (the token grid grows with the canvas)."""
    g = torch.Generator().manual_seed(0)
    latents, prompts, _ = train_tiny._sample_batch(g, 2, 5, torch.zeros(1, 6, 1, 1, 1), torch.ones(1, 6, 1, 1, 1),
                                                   full=5, size=32)
    assert latents.shape == (2, 6, 3, 16, 16) and len(prompts) == 2
    log = train_tiny.train(tmp_path, steps=1, batch_size=1, short_fraction=0.0, eval_seeds=(), frames=3, size=32,
                           init=TINY_SHAPES_DIR, log_every=1)
    assert log["settings"]["canvas"] == 32 and log["steps_done"] == 1
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config == {**json.loads((TINY_SHAPES_DIR / "transformer" / "config.json").read_text()),
                      "_diffusers_version": config["_diffusers_version"]}
    with pytest.raises(ValueError, match="multiple of 16"):
        train_tiny.train(tmp_path / "bad", steps=1, size=40, init=TINY_SHAPES_DIR, eval_seeds=())


def test_defaults_are_the_shipped_run():
    """Without the new arguments the command line is the run that made the shipped weights."""
    captured, threads = {}, torch.get_num_threads()
    original = train_tiny.train
    try:
        train_tiny.train = lambda out, **kw: captured.update(kw, out=out) or {"steps_done": 0, "train_seconds": 0,
                                                                                "parameters": {}}
        train_tiny.main(["--out", "outputs/tiny-shapes"])
    finally:
        train_tiny.train = original
        torch.set_num_threads(threads)
    assert captured["frames"] == 7 and captured["init"] is None and captured["time_limit"] is None
    assert captured["size"] is None and captured["noise_levels"] == "logit-normal"
    assert captured["steps"] == 3600 and captured["batch_size"] == 16 and captured["short_fraction"] == 0.65


LOCAL = {"method": "tile", "tile": [2, 4, 4], "window": [1, 1, 1]}


def test_local_loss_is_dense_plus_sparse_plus_the_pull_to_dense():
    """--local's loss on one batch, against the same three terms computed from two separate models: the stock
    transformer (dense) and a copy with the method applied (sparse)."""
    import copy

    import torch.nn.functional as F

    import dit_accel
    from dit_accel.checkpoints.finetuned import method_from_dict

    pipe = train_tiny._load_pipeline(TINY_SHAPES_DIR)
    method = method_from_dict(LOCAL)
    sparse_model = copy.deepcopy(pipe.transformer)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (pipe.vae.config.latents_mean,
                                                                 pipe.vae.config.latents_std))
    batch = train_tiny._sample_batch(torch.Generator().manual_seed(3), 1, 5, mean, std, 5)
    inputs, target = train_tiny._flow_matching_inputs(pipe, *batch, torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = pipe.transformer(**inputs)[0]
        with dit_accel.apply(sparse_model, method):
            sparse = sparse_model(**inputs)[0]
        handle = dit_accel.apply(pipe.transformer, method)
        got = train_tiny._flow_matching_loss(pipe, *batch, torch.Generator().manual_seed(4),
                                             (handle, 0.5, "sparse", 1.0))
        handle.remove()
    assert (sparse - dense).abs().max() > 1e-4  # the pattern changes the prediction: the pull term is not zero
    expected = F.mse_loss(dense, target) + F.mse_loss(sparse, target) + 0.5 * F.mse_loss(sparse, dense)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_local_max_noise_keeps_the_sparse_terms_to_the_quieter_samples(tmp_path):
    """--local-max-noise: the dense term covers every sample, the sparse terms only the samples at or below the
    noise ceiling (the steps a plan with dense warm-up runs sparse); with none below it the loss is dense alone."""
    import copy

    import torch.nn.functional as F

    import dit_accel
    from dit_accel.checkpoints.finetuned import method_from_dict

    pipe = train_tiny._load_pipeline(TINY_SHAPES_DIR)
    method = method_from_dict(LOCAL)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (pipe.vae.config.latents_mean,
                                                                 pipe.vae.config.latents_std))
    batch = train_tiny._sample_batch(torch.Generator().manual_seed(3), 3, 5, mean, std, 5)
    inputs, target = train_tiny._flow_matching_inputs(pipe, *batch, torch.Generator().manual_seed(4))
    noise = inputs["timestep"] / 1000
    levels = noise.sort().values
    ceiling = float(levels[1] + levels[2]) / 2  # the two quietest samples are below it, the loudest above
    quiet = (noise <= ceiling).nonzero().flatten()
    assert quiet.numel() == 2
    sparse_model = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        dense = pipe.transformer(**inputs)[0]
        with dit_accel.apply(sparse_model, method):
            sparse = sparse_model(**{k: v[quiet] if torch.is_tensor(v) else v for k, v in inputs.items()})[0]
        with dit_accel.apply(pipe.transformer, method) as handle:
            got = train_tiny._flow_matching_loss(pipe, *batch, torch.Generator().manual_seed(4),
                                                 (handle, 0.5, "sparse", ceiling))
            alone = train_tiny._flow_matching_loss(pipe, *batch, torch.Generator().manual_seed(4),
                                                   (handle, 0.5, "sparse", float(noise.min()) / 2))
    expected = (F.mse_loss(dense, target) + F.mse_loss(sparse, target[quiet])
                + 0.5 * F.mse_loss(sparse, dense[quiet]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alone, F.mse_loss(dense, target), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="local_max_noise"):
        train_tiny.train(tmp_path, steps=1, local_max_noise=0.0, eval_seeds=())
    assert not any(tmp_path.iterdir())


def test_local_pull_both_moves_the_dense_path_toward_the_sparse_one(tmp_path):
    """--local-pull both: the pull term's gradient reaches the dense prediction too, so the same batch gives other
    gradients than with the dense prediction detached (the default); the loss value is the same."""
    import dit_accel
    from dit_accel.checkpoints.finetuned import method_from_dict

    pipe = train_tiny._load_pipeline(TINY_SHAPES_DIR)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (pipe.vae.config.latents_mean,
                                                                 pipe.vae.config.latents_std))
    batch = train_tiny._sample_batch(torch.Generator().manual_seed(3), 1, 5, mean, std, 5)
    grads, losses = {}, {}
    with dit_accel.apply(pipe.transformer, method_from_dict(LOCAL)) as handle:
        for pull in ("sparse", "both"):
            pipe.transformer.zero_grad(set_to_none=True)
            loss = train_tiny._flow_matching_loss(pipe, *batch, torch.Generator().manual_seed(4), (handle, 1.0, pull, 1.0))
            loss.backward()
            grads[pull], losses[pull] = pipe.transformer.proj_out.weight.grad.clone(), loss.detach()
    torch.testing.assert_close(losses["sparse"], losses["both"])
    assert not torch.allclose(grads["sparse"], grads["both"])
    with pytest.raises(ValueError, match="local_pull"):
        train_tiny.train(tmp_path, steps=1, local_pull="dense", eval_seeds=())
    assert not any(tmp_path.iterdir())


def test_local_training_saves_a_stock_model_and_records_the_method(tmp_path):
    from dit_accel.checkpoints.finetuned import method_from_dict

    log = train_tiny.train(tmp_path / "local", steps=2, batch_size=1, lr=1e-3, warmup=1, short_fraction=0.0,
                           ema_decay=0.5, eval_seeds=(), frames=5, init=TINY_SHAPES_DIR, save_every=1,
                           local=method_from_dict(LOCAL), local_weight=2.0)
    plain = train_tiny.train(tmp_path / "plain", steps=2, batch_size=1, lr=1e-3, warmup=1, short_fraction=0.0,
                             ema_decay=0.5, eval_seeds=(), frames=5, init=TINY_SHAPES_DIR)
    assert log["settings"]["local"] == method_from_dict(LOCAL).to_dict() and log["settings"]["local_weight"] == 2.0
    saved = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert saved == sorted(p.name for p in (tmp_path / "plain").iterdir())  # nothing of dit_accel in the folder
    local, dense = load_file(tmp_path / "local" / WEIGHTS), load_file(tmp_path / "plain" / WEIGHTS)
    assert local.keys() == dense.keys()
    assert any(not torch.equal(local[k], dense[k]) for k in local)  # the sparse terms moved the weights
    assert plain["settings"]["local"] is None


def test_local_flag_rejects_a_bad_method(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_tiny.main(["--out", str(tmp_path), "--local", '{"method": "tile", "window": [0, 1, 1]}'])
    assert "--local" in capsys.readouterr().err


def test_object_canvas_keeps_the_objects_of_a_smaller_canvas(tmp_path):
    """render_batch(object_canvas=48) on 128x128: the object has the 48x48 clip's area and travel in pixels (not
    2.67x them), lies anywhere on the larger canvas, and the clips still pass the ground truth; train_tiny
    records the setting and refuses one larger than the canvas."""
    import numpy as np

    from dit_accel.models.clips import BACKGROUND, SIZE, TRAVEL, render_batch
    from dit_accel.models.groundtruth import score_video

    ids = (torch.tensor([0, 1, 2, 3] * 4), torch.tensor([0, 0, 1, 1] * 4), torch.tensor([0, 1, 2, 3] * 4))
    small = render_batch(*ids, generator=torch.Generator().manual_seed(0), frames=7, height=48, width=48)
    big = render_batch(*ids, generator=torch.Generator().manual_seed(0), frames=7, height=128, width=128,
                       object_canvas=48)
    area = [(x - BACKGROUND).abs().amax(-1).gt(0.05).flatten(2).sum(-1).float().mean() for x in (small, big)]
    assert abs(float(area[1] / area[0]) - 1) < 0.1  # same object area in pixels
    assert float(area[1]) < 0.05 * 128 * 128 < (SIZE * 128) ** 2 * 0.5  # far smaller than a scaled object
    centres = []
    for clip in big:
        mask = (clip - BACKGROUND).abs().amax(-1) > 0.05  # [F, H, W]
        ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
        c = [(float((xs * m).sum() / m.sum()), float((ys * m).sum() / m.sum())) for m in mask]
        assert abs(np.hypot(c[-1][0] - c[0][0], c[-1][1] - c[0][1]) - TRAVEL * 48) < 1.5  # 48-pixel travel
        centres.append(c[0])
    spread = np.ptp(np.array(centres), axis=0)
    assert (spread > 40).all()  # start positions spread over the larger canvas
    prompts = [f"a {c} {s} moving {d}" for c, s, d in zip(*(np.array(t)[i.numpy()] for t, i in zip(
        (["red", "green", "blue", "yellow"], ["square", "circle"], ["left", "right", "up", "down"]), ids)))]
    assert all(score_video(v.numpy(), p)["all_ok"] for v, p in zip(big, prompts))
    with pytest.raises(ValueError, match="object_canvas"):
        render_batch(*ids, generator=torch.Generator(), frames=3, height=32, width=32, object_canvas=48)
    with pytest.raises(ValueError, match="object_canvas"):
        train_tiny.train(tmp_path, steps=1, size=32, object_canvas=48, eval_seeds=())
    assert not any(tmp_path.iterdir())


def test_noise_levels_uniform_draws_more_low_noise_steps(tmp_path, monkeypatch):
    """--noise-levels: the share of training noise levels below 0.2 is the shifted law's (shift 3: u < 1/13), about
    7.7 % uniform and 0.7 % logit-normal (the default, the shipped run); anything else is refused."""
    import math

    latents = torch.zeros(4000, 6, 1, 1, 1)
    pipe = type("P", (), {"transformer": type("T", (), {"device": torch.device("cpu")})()})()
    monkeypatch.setattr(train_tiny, "_encode_text", lambda pipe, prompts, length: None)
    shares = {}
    for law in ("uniform", "logit-normal"):
        inputs, _ = train_tiny._flow_matching_inputs(pipe, latents, [""] * 4000, 8, torch.Generator().manual_seed(0), law)
        shares[law] = float((inputs["timestep"] < 200).float().mean())
    u = 0.2 / (3 - 2 * 0.2)  # sigma = 3u / (1 + 2u) < 0.2
    assert shares["uniform"] == pytest.approx(u, abs=0.015)
    assert shares["logit-normal"] == pytest.approx(0.5 * (1 + math.erf(math.log(u / (1 - u)) / math.sqrt(2))), abs=0.006)
    with pytest.raises(ValueError, match="noise_levels"):
        train_tiny.train(tmp_path, steps=1, noise_levels="beta", eval_seeds=())


def test_heads_trains_a_model_with_more_heads_of_the_same_width(tmp_path):
    """--heads 8: a fresh model with 8 heads of 16 dimensions (128 in all), saved as a stock WanTransformer3DModel
    that the pipeline loads and dit_accel runs per head; a per-head locality method needs 8 entries; a fine-tune
    keeps its model's heads."""
    import dit_accel
    from dit_accel.models.loading import load_pipeline

    locality = dit_accel.Tile(tile=(1, 12, 12), window=[(2, 1, 1)] + [(1, 1, 1)] * 7, block_size=144)
    log = train_tiny.train(tmp_path, steps=1, batch_size=1, short_fraction=0.0, eval_seeds=(), frames=3,
                           log_every=1, heads=8, locality=locality)
    assert log["settings"]["heads"] == 8 and log["steps_done"] == 1
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (8, 16)
    pipe = load_pipeline(str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    with dit_accel.apply(pipe, locality) as handle:
        pipe("a red circle moving right", num_frames=3, height=48, width=48, num_inference_steps=1, output_type="np")
        assert handle.stats()
    with pytest.raises(ValueError, match="4, 8 or 16"):
        train_tiny.train(tmp_path / "bad", steps=1, heads=6, eval_seeds=())
    with pytest.raises(ValueError, match="from scratch"):
        train_tiny.train(tmp_path / "ft", steps=1, heads=8, init=TINY_SHAPES_DIR, eval_seeds=())


def test_precision_bf16_trains_under_autocast_and_records_device(tmp_path):
    """--precision bf16: the passes run under bf16 autocast (a finite loss, fp32 weights saved), the log records the
    device and precision; another precision is refused before anything is built."""
    log = train_tiny.train(tmp_path, steps=2, batch_size=2, lr=1e-3, warmup=1, short_fraction=1.0, eval_seeds=(),
                           precision="bf16", device="cpu")
    assert log["settings"]["precision"] == "bf16" and log["settings"]["device"] == "cpu"
    assert all(math.isfinite(p["loss"]) for p in log["curve"])
    weights = load_file(str(next((tmp_path / "transformer").glob("*.safetensors"))))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    with pytest.raises(ValueError, match="precision must be one of"):
        train_tiny.train(tmp_path / "x", steps=1, precision="fp16", eval_seeds=())
    assert not (tmp_path / "x").exists()


def _one_line_refusal(capsys, argv, *words):
    """``main(argv)`` exits 2 with one line on stderr holding ``words``, before anything is trained."""
    called = []
    original = train_tiny.train
    train_tiny.train = lambda *a, **kw: called.append(1)
    try:
        with pytest.raises(SystemExit) as exc:
            train_tiny.main(argv)
    finally:
        train_tiny.train = original
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and not called, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.mark.parametrize("argv, words", [
    (["--size", "40"], ["--size", "multiple of 16", "40"]),
    (["--size", "0"], ["--size", "multiple of 16"]),
    (["--size", "-16"], ["--size", "multiple of 16"]),
    (["--object-canvas", "4"], ["--object-canvas", "from 8 to the canvas side 48"]),
    (["--size", "32", "--object-canvas", "64"], ["--object-canvas", "canvas side 32"]),
    (["--frames", "0"], ["--frames", "odd and at least 3", "got 0"]),
    (["--frames", "8"], ["--frames", "odd"]),
    (["--frames", "-7"], ["--frames", "got -7"]),
    (["--local", "[]"], ["--local", "a JSON object naming a method"]),
    (["--local", "{}"], ["--local", "a JSON object naming a method"]),
    (["--local", "7"], ["--local", "a JSON object naming a method"]),
    (["--locality", "[]"], ["--locality", "a JSON object naming a method"]),
    (["--local-max-noise", "0"], ["--local-max-noise", "(0, 1]"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_bad_command_line_values_are_one_line_before_training(tmp_path, capsys, argv, words):
    _one_line_refusal(capsys, ["--out", str(tmp_path / "run"), *argv], *words)
    assert not (tmp_path / "run").exists()


def test_out_is_required_and_never_the_packaged_weights(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_tiny.main(["--steps", "1"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    before = sorted((TINY_SHAPES_DIR / "transformer").iterdir())
    _one_line_refusal(capsys, ["--out", str(TINY_SHAPES_DIR)], "inside the installed dit_accel package")
    _one_line_refusal(capsys, ["--out", str(TINY_SHAPES_DIR.parent / "mine")], "inside the installed dit_accel package")
    assert sorted((TINY_SHAPES_DIR / "transformer").iterdir()) == before
    with pytest.raises(ValueError, match="inside the installed dit_accel package"):
        train_tiny.train(TINY_SHAPES_DIR, steps=1, eval_seeds=())
    (tmp_path / "notes.txt").write_text("mine")  # a run replaces its folder whole: never over other files
    _one_line_refusal(capsys, ["--out", str(tmp_path)], "not a saved pipeline", "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


class _Killed(BaseException):
    """What a SIGKILL at a write point leaves, simulated in-process (the writers' cleanup of their own temporary
    files aside, which only tidies: atomic_folder's swap leaves the same folders either way)."""


def _weights_digest(folder):
    from dit_accel.atomic_files import sha256_file

    return sha256_file(folder / WEIGHTS)


def test_killed_over_a_finished_run_leaves_the_old_run_or_no_finished_one(tmp_path, monkeypatch):
    """A run killed at any write point (its checkpoint, its final save) over a finished run's folder leaves the old
    finished run (its log beside its own weights), a folder without a log (a checkpoint: not a finished run), or
    the new finished run: never new weights beside the old train_log.json."""
    import shutil

    from dit_accel import atomic_files

    import copy

    kw = dict(steps=2, batch_size=1, short_fraction=0.0, eval_seeds=(), frames=3, size=16, save_every=1, log_every=1)
    # The saving is under test, not the training: the model is built once, and a step sets the EMA weights to the
    # run's seed (a run's weights differ from another's in every tensor).
    start = train_tiny._starting_pipeline(None, 3, 0, 16)
    monkeypatch.setattr(train_tiny, "_starting_pipeline", lambda *a: copy.deepcopy(start))
    monkeypatch.setattr(train_tiny._Loop, "step", lambda self, step: [e.fill_(self.s["seed"]) for e in self.ema] and 0.0)
    finished, out = tmp_path / "finished", tmp_path / "run"
    train_tiny.train(finished, seed=1, **kw)
    shutil.copytree(finished, out)
    points = []
    monkeypatch.setattr(atomic_files, "crash_point", lambda: points.append(1))
    train_tiny.train(out, seed=1, **kw)  # over a finished run, as below: its write points
    assert len(points) >= 10
    old = (_weights_digest(finished), json.loads((finished / "train_log.json").read_text()))
    states = set()
    for kill_at in range(1, len(points) + 1):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(finished, out)
        count = [0]

        def crash():
            count[0] += 1
            if count[0] == kill_at:
                raise _Killed

        monkeypatch.setattr(atomic_files, "crash_point", crash)
        with pytest.raises(_Killed):
            train_tiny.train(out, seed=2, **kw)
        log_file = out / "train_log.json"
        if log_file.is_file():
            log = json.loads(log_file.read_text())
            if log["settings"]["seed"] == 1:
                assert (_weights_digest(out), log) == old, f"killed at write point {kill_at}: old log, other weights"
                states.add("old run")
            else:
                assert _weights_digest(out) != old[0]
                states.add("new run")
        else:
            states.add("checkpoint" if (out / "model_index.json").is_file() else "swapping")
    assert {"old run", "checkpoint", "new run"} <= states, states
