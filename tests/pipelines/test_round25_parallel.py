"""Context parallelism's numbers and refusals (round 25): every method under Ulysses and Ring over 2 ranks against
one process, at grids whose shares are uneven or under one block, one frame, joint text (Flux), padded text masks
with batch 2 (Qwen-Image), a ``dense_steps=1`` schedule, each rank's statistics; a split that cannot run is refused
on both ranks with the same words, and neither rank hangs. One torchrun launch (tests/pipelines/cp25_worker.py);
the refusal checks themselves also run in this process, without collectives."""

import json

import pytest

import dit_accel
from dit_accel.pipelines.parallel import Split, check_split
from tests.pipelines.test_parallel import _torchrun

RING2 = Split(ulysses=1, ring=2, ulysses_rank=0, ring_rank=0, ulysses_group=None, ring_group=None)


# ------------------------------------------------------------------ in this process: the refusal's words
def test_a_ring_refusal_names_ring_parallelism_the_share_and_ulysses():
    """Before: "video tokens 0..31 of grid (1, 8, 8) do not fill whole 64-token query blocks of SLA(...): split the
    sequence so every rank holds whole blocks", which named neither ring context parallelism nor the other way out."""
    plan = dit_accel.SLA(topk=0.5).plan((1, 8, 8))
    with pytest.raises(ValueError, match=r"^dit_accel: ring context parallelism over 2 ranks gives each rank 32 of "
                                         r"the 64 video tokens, and video tokens 0\.\.31 of grid \(1, 8, 8\) do not "
                                         r"fill whole 64-token query blocks of SLA\(.*\); or split by Ulysses alone "
                                         r"\(ulysses_degree=2, ring_degree=1; --cp ulysses=2\)"):
        check_split(RING2, 64, 0, (plan,))
    check_split(RING2, 128, 0, (dit_accel.SLA(topk=0.5).plan((2, 8, 8)),))  # whole blocks: taken


def test_vsa_ring_refusal_keeps_its_own_advice():
    """VSA's refusal already says Ulysses: it is not said twice."""
    plan = dit_accel.VSA(topk=2, tile=(4, 4, 4)).plan((2, 8, 8))
    with pytest.raises(ValueError) as err:
        check_split(RING2, 128, 0, (plan,))
    assert str(err.value).count("Ulysses") == 1 and "under ring attention" in str(err.value), err.value


def test_two_refusing_layers_say_the_first_layers_refusal_whatever_the_plans_addresses():
    """Before: the plans were asked as a set, in the order of their addresses, which differ between ranks: one call
    refused on two ranks with two messages (layer 0's Tile on one, layer 1's SLA on the other)."""
    grid = (1, 8, 8)
    for _ in range(64):  # a pair whose set order puts layer 1's plan first (half of all pairs)
        first, second = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)).plan(grid), dit_accel.SLA(topk=0.5).plan(grid)
        if next(iter({first, second})) is second:
            break
    else:
        pytest.skip("no pair whose set order differs from the layer order")
    with pytest.raises(ValueError, match=r"tokens 0\.\.31 of grid \(1, 8, 8\) do not fill whole 64-token blocks of "
                                         r"Tile\("):
        check_split(RING2, 64, 0, (first, second))



def test_a_mask_that_hides_video_keys_says_what_to_pass():
    """Before: "a key-padding mask on video tokens is not supported under context parallelism" (no way out said).
    (A split of one rank: the same check, without collectives.)"""
    import torch

    from dit_accel.pipelines.parallel import run_split

    one = Split(ulysses=1, ring=1, ulysses_rank=0, ring_rank=0, ulysses_group=None, ring_group=None)
    q = torch.zeros(1, 2, 4 + 64, 8)
    mask = torch.ones(1, 1, 1, 4 + 64, dtype=torch.bool)
    mask[..., 4 + 60:] = False  # the last 4 video keys
    plan = dit_accel.SLA(topk=0.5).plan((1, 8, 8))
    with pytest.raises(ValueError, match=r"^dit_accel: this call's key-padding mask hides 4 video key\(s\) .*: pass a "
                                         r"mask over the text tokens alone, or run this call without context "
                                         r"parallelism$"):
        run_split(plan, q, q, q, split=one, num_text=4, text_first=True, key_mask=mask, scale=None, backend="torch")

# ------------------------------------------------------------------ two ranks against one process
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp25") / "cp25.json"
    _torchrun(2, "cp25_worker.py", out, timeout=240)  # (a rank left waiting for the other: the launch times out)
    return [json.loads(out.with_name(f"{out.name}.{rank}").read_text()) for rank in (0, 1)]


def _cases(result: dict, prefix: str = "") -> dict:
    return {k: v for k, v in result.items() if isinstance(v, dict) and k.startswith(prefix)}


def test_every_method_matches_one_process_at_uneven_and_joint_grids(ranks):
    """Tile, Radial, GNA, SLA, VSA on Wan (8x4x4; 4x6x6: shares of 72 tokens), Tile, GNA, SLA on Flux (joint text)
    and Qwen-Image (batch 2, padded text), under Ulysses and Ring: exact within fp32 rounding on both ranks."""
    rank0, rank1 = ranks
    cases = _cases(rank0)
    assert len(cases) == 34, sorted(cases)
    for key, case in cases.items():
        limit = 0.0 if key.split("/")[0] in ("wan", "flux") and "/ulysses/" in key else 2e-6
        for rank, result in enumerate(ranks):
            got = result[key]
            assert got["diff"] <= limit and got["finite"], (rank, key, got)
    assert rank1.keys() == rank0.keys()


def test_a_dense_first_step_switches_on_both_ranks_at_once(ranks):
    for split in ("ulysses", "ring"):
        for result in ranks:
            case = result[f"wan/tile/{split}/dense_steps"]
            assert case["calls"] == [[0, 2], [2, 2]], case  # step 0: both layers dense; step 1: both sparse
            assert max(case["diffs"]) <= 2e-6, case


def test_stats_are_per_rank_and_all_ranks_gives_the_whole_calls_density(ranks):
    """Ring gives each rank its own rows' density (GNA on 4x6x6: 0.5 and 1.0, as docs/api.md says);
    summary(all_ranks=True) is their mean, the density of the whole call's plan."""
    ring = [result["wan/gna/ring/4x6x6"] for result in ranks]
    assert [r["density"] for r in ring] == [0.5, 1.0], ring
    for r in ring:
        assert r["all_ranks_density"] == pytest.approx(0.75) and r["plan_density"] == pytest.approx(0.75), r
    for result in ranks:  # Ulysses: every rank runs the whole sequence for its heads
        case = result["wan/gna/ulysses/4x6x6"]
        assert case["density"] == case["all_ranks_density"] == pytest.approx(case["plan_density"]), case


@pytest.mark.parametrize("key,words", [
    ("wan/gna/ring/3x5x7", "splits the 105 video tokens into equal shares, and 105 is not a multiple of 2"),
    ("wan/gna/ulysses/3x5x7", "splits the 105 video tokens into equal shares, and 105 is not a multiple of 2"),
    ("flux/sla/ring/text7", "splits the 7 text tokens into equal shares, and 7 is not a multiple of 2: choose a text "
                            "length (max_sequence_length)"),
    ("wan/sla/ring/1x8x8", "ring context parallelism over 2 ranks gives each rank 32 of the 64 video tokens"),
    ("wan/radial/ring/4x6x6", "gives each rank 72 of the 144 video tokens, and tokens 0..71 of grid (4, 6, 6) do not "
                              "fill whole 64-token blocks of Radial("),
    ("wan/sla/ring/4x6x6", "--cp ulysses=2"),
    ("wan/two-refusals/ring/1x8x8", "tokens 0..31 of grid (1, 8, 8) do not fill whole 64-token blocks of Tile("),
], ids=["odd-video-ring", "odd-video-ulysses", "odd-text", "one-frame-under-a-block", "radial-72-a-rank",
        "sla-72-a-rank", "two-layers-first-said"])
def test_a_split_that_cannot_run_is_refused_alike_on_both_ranks_without_a_hang(ranks, key, words):
    said = [result[key] for result in ranks]
    assert isinstance(said[0], str) and said[0] == said[1], said
    assert words in said[0], said[0]
    assert all(result[key + "#ranks"] == 2.0 for result in ranks)  # both ranks went on to the next case


def test_a_ring_split_a_later_steps_plans_cannot_take_is_refused_at_the_first_call():
    """Before: with dense_steps=1, Tile(1, 4, 4) on a 2x8x8 grid under ring 2 ran its dense first step and was refused
    only at the second step (each call checked its own step's plans). (A hook asked directly: no collectives.)"""
    from dit_accel.models import tiny as T

    model = T.build_tiny_transformer("wan")
    with dit_accel.apply(model, dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)), dense_steps=1) as handle:
        hook = handle._hooks[0]
        hook._check_later_splits(RING2, (2, 8, 8), 0, None)  # the step count unknown: each call checks its own
        with pytest.raises(ValueError, match="ring context parallelism over 2 ranks gives each rank 64 of the 128"):
            hook._check_later_splits(RING2, (2, 8, 8), 0, 2)
        hook._check_later_splits(RING2, (8, 8, 8), 0, 2)  # whole blocks at every step: taken


def test_a_capture_under_context_parallelism_gets_the_text_keys_and_their_mask():
    """Before: run_split handed the capture the video q, k, v alone, so calibrating a joint-attention family (FLUX)
    under context parallelism scored its candidates without the text keys a run attends. (A split of one rank.)"""
    import torch

    from dit_accel.pipelines.parallel import run_split

    one = Split(ulysses=1, ring=1, ulysses_rank=0, ring_rank=0, ulysses_group=None, ring_group=None)
    q, k, v = (torch.randn(2, 2, 4 + 64, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = torch.ones(2, 1, 1, 4 + 64, dtype=torch.bool)
    mask[1, ..., 3] = False  # the second sample's last text key
    seen = {}
    run_split(dit_accel.SLA(topk=0.5).plan((1, 8, 8)), q, k, v, split=one, num_text=4, text_first=True,
              key_mask=mask, scale=None, backend="torch", capture=lambda *a, **kw: seen.update(args=a, **kw))
    kt, vt, text_mask = seen["text"]
    assert torch.equal(kt, k[:, :, :4]) and torch.equal(vt, v[:, :, :4])
    assert torch.equal(seen["args"][1], k[:, :, 4:]) and text_mask.tolist() == [[True] * 4, [True] * 3 + [False]]
