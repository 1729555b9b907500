"""calibrate.replay: a plan's leading dense steps read from the dense run, not computed again."""
import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.calibrate.replay import DenseReplay, dense_prefix
from dit_accel.methods import Dense, Tile
from dit_accel.plans.per_head import PerHead
from dit_accel.plans.sparse_plan import Phase, SparsePlan


class Out:
    """Stands for diffusers' Transformer2DModelOutput: a ``sample`` field."""

    def __init__(self, sample):
        self.sample = sample


class Fake(torch.nn.Module):
    """out = x * 10 + t: each sample's output depends on its own input and the call's timestep only."""

    def __init__(self):
        super().__init__()
        self.runs = 0

    def forward(self, x, t, return_dict=True):
        self.runs += 1
        out = x * 10 + t
        return Out(out) if return_dict else (out,)


def _inputs(keys):
    return torch.tensor([[float(k)] for k in keys])


def _record(replay, model, chunks, calls=3, cfg=False, return_dict=True):
    with replay.recording(model, videos=sum(len(c) for c in chunks)):
        for keys in chunks:
            replay.begin(keys)
            for t in range(calls):
                x = _inputs(keys)
                model(torch.cat([x, x + 0.5]) if cfg else x, t, return_dict=return_dict)


@pytest.mark.parametrize("cfg", [False, True], ids=["one branch per call", "both branches in one call"])
@pytest.mark.parametrize("return_dict", [True, False])
def test_replay_gives_back_each_videos_outputs_in_any_batch_and_computes_the_rest(cfg, return_dict):
    model, replay = Fake(), DenseReplay()
    _record(replay, model, [[1, 2], [3]], cfg=cfg, return_dict=return_dict)
    assert model.runs == 6 and replay.calls_per_step(3) == 1 and "forward" not in vars(model)
    with replay.replaying(model, calls=2):
        replay.begin([3, 1])  # another batch, another order
        outs = []
        for t in range(3):
            x = _inputs([3, 1])
            out = model(torch.cat([x, x + 0.5]) if cfg else x, t, return_dict=return_dict)
            outs.append(out.sample if return_dict else out[0])
    assert model.runs == 7  # the first two calls read, the third computed
    x = _inputs([3, 1])
    for t, out in enumerate(outs):
        expect = (torch.cat([x, x + 0.5]) if cfg else x) * 10 + t
        assert torch.equal(out, expect), (t, out, expect)
    assert "forward" not in vars(model) and replay.replayed_calls == 2


def test_a_batch_with_an_unrecorded_video_is_computed():
    model, replay = Fake(), DenseReplay()
    _record(replay, model, [[1]])
    with replay.replaying(model, calls=3):
        replay.begin([1, 9])
        model(_inputs([1, 9]), 0)
    assert model.runs == 4 and replay.replayed_calls == 0


def test_outputs_it_cannot_split_by_video_turn_it_off():
    model, replay = Fake(), DenseReplay()
    with replay.recording(model):
        replay.begin([1, 2])
        model(_inputs([1, 2, 3]), 0)  # 3 rows for 2 videos
    assert not replay.enabled and not replay.outputs


def test_past_its_memory_each_video_keeps_its_first_calls():
    """The memory is shared by the videos, whichever batch records them first."""
    model, replay = Fake(), DenseReplay(max_bytes=3 * 2 * 4)  # two calls of 3 videos' one fp32 value
    _record(replay, model, [[1, 2], [3]], calls=3)
    assert replay.calls(1) == replay.calls(2) == replay.calls(3) == 2 and replay.bytes == 3 * 2 * 4
    with replay.replaying(model, calls=3):
        replay.begin([3, 1])
        for t in range(3):
            model(_inputs([3, 1]), t)
    assert model.runs == 6 + 1 and replay.replayed_calls == 2


def test_dense_prefix_counts_the_steps_dense_on_every_layer_and_head():
    tile = Tile(tile=(1, 4, 4), window=(1, 1, 1))
    assert dense_prefix(SparsePlan([Phase(0, 2), Phase(2, None, default=tile)]), 4, 2) == 2
    assert dense_prefix(SparsePlan([Phase(0, None, {1: tile})]), 4, 2) == 0  # layer 1 sparse from step 0
    assert dense_prefix(SparsePlan([Phase(0, None, {5: tile})]), 4, 2) == 4  # a layer the model lacks
    assert dense_prefix(SparsePlan([Phase(0, 1, default=PerHead((Dense(), Dense()))), Phase(1, 3, default=tile)]),
                        4, 2) == 1
    assert dense_prefix(SparsePlan([Phase(3, None, default=tile)]), 4, 2) == 3  # uncovered steps run dense


def test_a_plan_generated_with_its_dense_steps_replayed_equals_the_one_computed():
    """tiny-shapes, 3 steps, guidance 2 (two transformer calls per step): a plan dense for its first step,
    generated with that step read from the dense run, gives the videos it gives computing it."""
    from dit_accel.calibrate.run import generate_videos
    from dit_accel.models.loading import load_pipeline

    pipe = load_pipeline("tiny-shapes")
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 3, "num_frames": 7, "height": 48, "width": 48}
    jobs = [("a red circle moving right", 0), ("a blue square moving down", 1)]
    replay = DenseReplay()
    with dit_accel.apply(pipe, Dense()), replay.recording(pipe.transformer, len(jobs)):
        dense = generate_videos(pipe, jobs, call, batch_size=2, replay=replay)
    assert replay.calls_per_step(3) == 2
    plan = SparsePlan([Phase(0, 1), Phase(1, None, default=Tile(tile=(1, 12, 12), window=(1, 1, 1)))])
    with dit_accel.apply(pipe, plan):
        computed = generate_videos(pipe, jobs[::-1], call, batch_size=1)
    with dit_accel.apply(pipe, plan), replay.replaying(pipe.transformer, calls=1 * 2):
        replayed = generate_videos(pipe, jobs[::-1], call, batch_size=1, replay=replay)
    assert replay.replayed_calls == 2 * 1 * 2  # 2 videos x 1 step x 2 calls
    for a, b in zip(computed, replayed):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert any(np.abs(a.astype(int) - d.astype(int)).max() > 8 for a, d in zip(computed, dense[::-1]))  # sparse moved it


def test_calibrate_replays_the_dense_steps_of_the_plans_it_verifies(tmp_path):
    """The same search with and without replay (``--replay-mb 0``): the same plans, the same PSNRs within float
    noise, and the plans with a dense warm-up verified with it read from the dense run."""
    import json

    from dit_accel.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\na green square moving up\n")
    results = []
    for mb in ("1024", "0"):
        out = tmp_path / f"plan_{mb}.json"
        assert main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "25", "--out",
                     str(out), "--phases", "1", "--warmup-candidates", "1", "--candidates", "small", "--methods",
                     "tile", "--search-iters", "1", "--uniform-options", "2", "--sensitivity", "uniform", "--steps",
                     "3", "--validate", "0", "--cost-terms", "tiles", "--replay-mb", mb, "--no-progress",
                     "--quiet"]) == 0
        results.append(json.loads((tmp_path / f"plan_{mb}_report" / "calibration.json").read_text()))
    replayed, computed = ([(t["plan"], t["psnr_worst"], t["replayed_steps"]) for t in r["trace"]] for r in results)
    assert [p for p, _, _ in replayed] == [p for p, _, _ in computed]
    assert all(abs(a - b) < 0.5 or min(a, b) > 60 for (_, a, _), (_, b, _) in zip(replayed, computed))
    assert any(steps for _, _, steps in replayed) and not any(steps for _, _, steps in computed)
