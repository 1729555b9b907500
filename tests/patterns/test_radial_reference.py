"""``Radial(rule="reference")`` against an independent transcription of the reference code's block mask.

The transcription follows mit-han-lab/radial-attention (commit 72788d4, radial_attn/attn_mask.py,
``gen_log_mask_shrinked``) step by step, written here without dit_accel's code: the tokens are
padded to a block multiple, the block row and column that hold the last video tokens count as
"text" (dense); every frame pair builds its own token mask (attention sink on key frame 0 for
Wan, a band ``|c - r| <= width`` with ``width`` the frame for distances <= 1, else
``max(2**bitlen(S) / 2**bitlen(d) * decay, B)``, times a split mask that keeps the pair
iff ``2**bitlen(S) / 2**bitlen(d) >= 128`` or ``d % int(128 / that) == 0``), places it at
the frames' offsets inside a ``rem + ceil(S/B)*B`` square, keeps the first ``ceil(S/B)``
blocks each way, reduces with "more than 60% of the non-empty columns denser than 1/3"
(column density = count / B) and ORs the result in at the pair's block offsets.
Identical (mask, offsets) pairs are computed once, and a block's row counts come from a
running sum over the frame's rows instead of a padded copy (the same counts).
"""

import pytest
import torch

import dit_accel
from dit_accel.patterns import radial_layout


def _pair_token_mask(i, j, s, block, decay, wan_sink):
    """The reference's local mask of frame pair (i, j) as a hashable description + a builder."""
    dist = abs(i - j)
    if j == 0 and wan_sink:
        return ("ones",)
    group = dist.bit_length()
    if dist <= 1:
        width = s
    else:
        decayed = 2 ** s.bit_length() / 2 ** group * decay
        width = decayed if decayed >= block else block
    split_length = 2 ** s.bit_length() / 2 ** group
    keep = split_length >= 128 or dist % int(128 / split_length) == 0  # 128: hard-coded in the reference
    return ("band", width) if keep else ("zeros",)


def _build(kind, s):
    if kind[0] == "ones":
        return torch.ones(s, s, dtype=torch.bool)
    if kind[0] == "zeros":
        return torch.zeros(s, s, dtype=torch.bool)
    pos = torch.arange(s, dtype=torch.int32)
    return (pos[None, :] - pos[:, None]).abs() <= kind[1]


def _shrink(rows_cumsum, s, block, rem_row, rem_col):
    """The reference's strict shrink of one frame pair's mask placed at offsets (rem_row, rem_col) in a
    ``rem + ceil(S/B)*B`` square and cut to ``ceil(S/B)`` blocks each way: column density = rows of the
    block inside the mask / B, then "more than 60% of the non-empty columns denser than 1/3".
    A block's rows are summed as a difference of the running row sum (same counts, no padded copy)."""
    per = (s - 1) // block + 1
    edges = torch.clamp(torch.arange(per + 1) * block - rem_row, 0, s)  # frame rows of each query block
    counts = rows_cumsum[edges[1:]] - rows_cumsum[edges[:-1]]  # [per, S]
    placed = torch.zeros(per, rem_col + per * block, dtype=counts.dtype)
    placed[:, rem_col:rem_col + s] = counts
    density = placed[:, :per * block].reshape(per, per, block) / block  # [query block, key block, column]
    nonzero = (density > 0).sum(-1)
    high = (density > 1 / 3).sum(-1)
    return high / (nonzero + 1e-9) > 0.6


def reference_code_blocks(grid, block, decay, wan_sink):
    frames, s = grid[0], grid[1] * grid[2]
    video = frames * s
    padded = -(-video // block) * block
    final = torch.zeros(padded // block, padded // block, dtype=torch.bool)
    border = video // block
    final[border:] = True
    final[:, border:] = True
    per = (s - 1) // block + 1
    cumsums, cache = {}, {}
    for i in range(frames):
        for j in range(frames):
            kind = _pair_token_mask(i, j, s, block, decay, wan_sink)
            rem_row, rem_col = (i * s) % block, (j * s) % block
            key = (kind, rem_row, rem_col)
            if key not in cache:
                if kind not in cumsums:
                    mask = _build(kind, s).to(torch.int32)
                    cumsums[kind] = torch.cat([torch.zeros(1, s, dtype=torch.int32), mask.cumsum(0, dtype=torch.int32)])
                cache[key] = _shrink(cumsums[kind], s, block, rem_row, rem_col)
            r0, c0 = (i * s) // block, (j * s) // block
            final[r0:r0 + per, c0:c0 + per] |= cache[key]
    return final


# Wan 2.1 480p (81 frames), Wan 2.2 TI2V-5B 704x1280x121 (block 64, decay 0.8), HunyuanVideo 768x1280x117,
# and small frames (< 256 tokens: the reference drops some adjacent frames too).
CASES = [
    ((21, 30, 52), 128, 0.2, True),
    ((31, 22, 40), 64, 0.8, True),
    ((30, 48, 80), 128, 0.95, False),
    ((9, 6, 10), 64, 1.0, True),
]
IDS = ["wan480p", "wan22-ti2v-b64", "hunyuan", "small-frames"]


@pytest.mark.parametrize("grid,block,decay,wan_sink", CASES, ids=IDS)
def test_reference_rule_equals_the_reference_code(grid, block, decay, wan_sink):
    layout = radial_layout(grid, block, decay, (0,) if wan_sink else (), rule="reference")
    expected = reference_code_blocks(grid, block, decay, wan_sink)
    assert layout.num_q_blocks == expected.shape[0] and layout.partial_fraction() == 0.0
    assert torch.equal(layout.block_masks()[0][0], expected)


@pytest.mark.parametrize("grid,block,decay,reference,union", [
    ((21, 30, 52), 128, 0.2, 0.3438, 0.3368),
    ((31, 22, 40), 64, 0.8, 0.2751, 0.3055),
], ids=["wan480p", "wan22-ti2v-b64"])
def test_reference_and_union_densities(grid, block, decay, reference, union):
    """The issue's measurements: the union rule keeps blocks that straddle frames differently, and at
    block 64 the reference's fixed 128 in the frame-drop test drops ~5,500 more blocks."""
    ref = radial_layout(grid, block, decay, (0,), rule="reference")
    uni = radial_layout(grid, block, decay, (0,))
    assert ref.density() == pytest.approx(reference, abs=5e-5)
    assert uni.density() == pytest.approx(union, abs=5e-5)
    if block == 64:
        extra = (uni.density() - ref.density()) * uni.num_q_blocks ** 2
        assert extra > 5000


def test_rules_agree_where_frames_fill_whole_blocks_at_block_128():
    for grid, sinks in (((18, 48, 80), (0,)), ((12, 8, 16), ())):
        union = radial_layout(grid, 128, 0.5, sinks).block_masks()[0]
        assert torch.equal(radial_layout(grid, 128, 0.5, sinks, rule="reference").block_masks()[0], union)


def test_radial_config_rule():
    assert dit_accel.Radial().rule == "union"
    method = dit_accel.Radial(decay=0.2, rule="reference")
    grid = (21, 30, 52)
    assert method.plan(grid).density == pytest.approx(radial_layout(grid, 128, 0.2, (0,), rule="reference").density())
    with pytest.raises(ValueError, match="Radial.rule"):
        dit_accel.Radial(rule="exact")
    with pytest.raises(ValueError, match="spatial='band'"):
        dit_accel.Radial(rule="reference", spatial="window")
    with pytest.raises(ValueError, match="rule="):
        radial_layout((4, 8, 8), 64, rule="paper")
