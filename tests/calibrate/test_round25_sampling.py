"""What calibration samples and scores, against brute force: a joint-attention family's text keys are in each
candidate's error as a sparse run visits them (exactly, beside the video pattern), the batch rows kept under a
memory budget are spread over a CFG batch, and the SLA per-call term of a kernel variant is the one
``kernels.cost`` charges."""

import math

import pytest
import torch

from dit_accel.calibrate.candidates import Candidate, candidate_grid
from dit_accel.calibrate.sampling import QKVSampler
from dit_accel.calibrate.scoring import score_candidates
from dit_accel.methods import Dense
from tests.calibrate.test_round25_numbers import _mask, _qkv

pytestmark = pytest.mark.usefixtures("one_thread")


def _joint_errors(q, k, v, kt, vt, text_mask, masks) -> torch.Tensor:
    """``[candidates, heads]`` in fp64: video queries against [video keys under the mask, every valid text key]."""
    qd, kd, vd, ktd, vtd = (t.double() for t in (q, k, v, kt, vt))
    scale = 1 / math.sqrt(q.shape[-1])
    s_video = qd @ kd.transpose(-1, -2) * scale
    s_text = (qd @ ktd.transpose(-1, -2) * scale).masked_fill(~text_mask[:, None, None, :], -math.inf)
    values = torch.cat([vd, vtd], 2)
    ref = torch.cat([s_video, s_text], -1).softmax(-1) @ values
    out = []
    for m in masks:
        o = torch.cat([s_video.masked_fill(~m, -math.inf), s_text], -1).softmax(-1) @ values
        out.append((o - ref).pow(2).sum((0, 2, 3)) / ref.pow(2).sum())
    return torch.stack(out)


def _text(batch=2, heads=3, n_text=16, dim=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    kt, vt = (2 * torch.randn(batch, heads, n_text, dim, generator=g) for _ in range(2))
    mask = torch.ones(batch, n_text, dtype=torch.bool)
    mask[-1, 11:] = batch == 1  # the second prompt's padding
    return kt, vt, mask


# (whole 64-token tiles; padded to whole tiles; frame tiles of 48 tokens, whose candidates run their own plan)
JOINT_CASES = [("2x8x12", (2, 8, 12), None), ("5x9x11-padded", (5, 9, 11), None),
               ("3x6x8-frame-tiles", (3, 6, 8), (1, 6, 8))]


@pytest.mark.parametrize("grid,tile", [c[1:] for c in JOINT_CASES], ids=[c[0] for c in JOINT_CASES])
def test_joint_text_keys_are_in_each_candidates_error_as_the_run_visits_them(grid, tile):
    """16 text keys (5 of one row masked): the scored error is the run's, text keys visited exactly, video keys under
    the pattern; without them it is another number (before: the video-only error was scored)."""
    cands = [c for c in candidate_grid(grid, size="small", methods=("tile", "gna"), tile=tile) if c.kind != "dense"]
    q, k, v = _qkv(grid)
    kt, vt, mask = _text()
    sampler = QKVSampler([(0, 1)], per_bucket=1, max_bytes=2**30)
    sampler.set_layers(1)
    sampler.save(0, "layer0", grid, 0, q, k, v, text=(kt, vt, mask))
    fast = score_candidates(sampler, [Candidate(Dense(), "dense", 1.0)] + cands, 1)[(0, 0)]
    assert (fast[0] == 0).all()
    masks = [_mask(c.method, grid) for c in cands]
    slow = _joint_errors(q, k, v, kt, vt, mask, masks)
    torch.testing.assert_close(fast[1:], slow, rtol=1e-4, atol=1e-9)
    without = _joint_errors(q, k, v, kt[:, :, :0], vt[:, :, :0], mask[:, :0], masks)
    assert ((without - slow).abs() > 1e-3 * slow).any()


def test_joint_text_keys_in_the_sla_errors_match_its_plan_run():
    """SLA candidates (their blocks from the shared pass, or their own plan) score the run with the text merged in:
    Plan.run over [text, video] keys against dense attention over them."""
    grid = (2, 8, 8)
    q, k, v = _qkv(grid, heads=2)
    kt, vt, mask = _text(heads=2)
    cands = [c for c in candidate_grid(grid, size="small") if c.kind == "sla"]
    assert cands
    sampler = QKVSampler([(0, 1)], per_bucket=1, max_bytes=2**30)
    sampler.set_layers(1)
    sampler.save(0, "layer0", grid, 0, q, k, v, text=(kt, vt, mask))
    fast = score_candidates(sampler, cands, 1)[(0, 0)]
    keys, values = torch.cat([kt, k], 2), torch.cat([vt, v], 2)
    key_mask = torch.cat([mask, torch.ones(2, k.shape[2], dtype=torch.bool)], 1)[:, None, None, :]
    ref = _joint_errors(q, k, v, kt, vt, mask, [torch.ones(q.shape[2], q.shape[2], dtype=torch.bool)])  # zeros
    s = torch.cat([q.double() @ k.double().transpose(-1, -2), (q.double() @ kt.double().transpose(-1, -2))
                   .masked_fill(~mask[:, None, None, :], -math.inf)], -1) / math.sqrt(q.shape[-1])
    dense = s.softmax(-1) @ torch.cat([v, vt], 2).double()
    for i, cand in enumerate(cands):
        o, _ = cand.method.plan(grid).run(q, keys, values, num_text=kt.shape[2], text_first=True, key_mask=key_mask,
                                          text_queries=False, backend="torch")
        slow = (o.double() - dense).pow(2).sum((0, 2, 3)) / dense.pow(2).sum()
        torch.testing.assert_close(fast[i], slow, rtol=1e-4, atol=1e-9)
    assert (ref == 0).all()


@pytest.mark.parametrize("name,kwargs,n_text", [("tiny-wan", dict(num_frames=5, height=32, width=32), None),
                                               ("tiny-flux", dict(height=64, width=64), 16)],
                         ids=["wan-cross", "flux-joint"])
def test_a_joint_family_hands_its_text_keys_to_the_sampler_and_a_cross_attention_family_none(name, kwargs, n_text):
    """tiny-flux (text in the self-attention) gives the sampler its 16 text keys beside the 256 video tokens; tiny-wan
    (text in cross-attention) none, so its errors are the video-only ones, bit for bit."""
    import dit_accel
    from dit_accel.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    sampler = QKVSampler([(0, 1)], per_bucket=1, max_bytes=2**30)
    with dit_accel.apply(pipe, Dense(), capture=sampler):
        pipe("a cat", num_inference_steps=1, output_type="latent", max_sequence_length=16, **kwargs)
    text = sampler.bucket_text(0, 0)
    _, k, _ = sampler.bucket_samples(0, 0)
    assert k.shape[2] == math.prod(sampler.grid)
    if n_text is None:
        assert text is None
    else:
        assert text[0].shape == (k.shape[0], k.shape[1], n_text, k.shape[3]) and text[2].shape == (k.shape[0], 16)


def test_samples_with_different_text_lengths_are_padded_with_keys_not_attended():
    grid = (1, 8, 8)
    sampler = QKVSampler([(0, 2)], per_bucket=2, max_bytes=2**30)
    sampler.set_layers(1)
    for step, n_text in ((0, 4), (1, 6)):
        q, k, v = _qkv(grid, batch=1, heads=1, seed=step)
        kt, vt, _ = _text(batch=1, heads=1, n_text=n_text)
        sampler.save(0, "layer0", grid, step, q, k, v, text=(kt, vt, None))
    kt, vt, bias = sampler.bucket_text(0, 0)
    assert kt.shape[:3] == (2, 1, 6) and torch.isinf(bias[0, 4:]).all() and (bias[1] == 0).all()


def test_rows_kept_under_the_budget_are_spread_over_a_cfg_batch():
    """A budget of 2 of 4 rows ([uncond, uncond, cond, cond]) keeps rows 1 and 3, one of each half (before: rows 0
    and 1, the unconditional branch alone)."""
    grid = (1, 8, 8)
    q = torch.arange(4.0)[:, None, None, None].expand(4, 1, 64, 8).contiguous()
    sampler = QKVSampler([(0, 1)], per_bucket=1, max_bytes=2 * 3 * 4 * q[0].numel())
    sampler.set_layers(1)
    sampler.save(0, "layer0", grid, 0, q, q, q)
    kept = sampler.bucket_samples(0, 0)[0]
    assert sampler.rows == 2 and kept[:, 0, 0, 0].tolist() == [1.0, 3.0]


@pytest.mark.parametrize("kernel", ["current", "host", "persistent", "ring3", "ws"])
def test_an_sla_candidates_modelled_call_is_kernels_cost_sla_time_for_the_same_kernel(kernel):
    """Calibration's SLA launch (per-call term + one head) is ``kernels.cost.sla_time`` of the same kernel variant
    (before: sla_time took no kernel and charged the current kernel's 500 us where calibration charged host's 50 us)."""
    from dit_accel.calibrate.costs import CostModel
    from dit_accel.kernels import cost as kernel_cost
    from dit_accel.methods import SLA

    grid, cand = (4, 12, 12), Candidate(SLA(topk=0.3), "sla", 0.3)
    model = CostModel(grid, 64, arch="h100", kernel=kernel)
    counts = kernel_cost.sla_counts(math.prod(grid), cand.method, heads=1)
    reference = kernel_cost.sla_time(counts, head_dim=64, arch="h100", kernel=kernel)
    assert model.launch("sla") + model.head(cand) == pytest.approx(reference, rel=1e-12)
    assert model.launch("sla") == kernel_cost.constants("h100", kernel).sla_per_call_s
