"""Spatial-window radial attention (``Radial(spatial="window")``) against a brute-force definition written here.

The reference below restates the rule from METHODS.md and the Radial docstring
without dit_accel helpers: the reference frame-pair rule (sink / dist <= 1
dense, power-of-two split rule, half-width ``floor(max(decay * width, B))``),
the window size ``min(2 * floor(L * sqrt((2*half + 1) / S) / 2) + 1, L)`` per
axis, and the inward-clamped window start, evaluated per query and key token.
"""

import math

import pytest
import torch

import dit_accel
from dit_accel.patterns import radial_layout, radial_window_layout, radial_window_mask

WAN21 = (18, 48, 80)  # Wan 2.1, 768x1280, 69 frames


# ----------------------------------------------------------------- reference
def _ref_frame_pair(qf, kf, s, block, decay, sinks):
    """(kh_fraction_source) None = drop, 'full', or the band half-width in tokens."""
    dist = abs(qf - kf)
    if kf in sinks or dist <= 1:
        return "full"
    ref = 2 ** s.bit_length()
    width = ref / 2 ** dist.bit_length()
    if width < block and dist % int(block / width) != 0:
        return None
    return math.floor(max(decay * width, block))


def _ref_window_size(half, extent, s):
    if half == "full":
        return extent
    return min(2 * math.floor(extent * math.sqrt((2 * half + 1) / s) / 2) + 1, extent)


def _ref_mask(grid, block, decay, sinks):
    """bool [N, N], raster order, one query token at a time."""
    f, h, w = grid
    s = h * w
    n = f * s
    hs, ws = torch.arange(s) // w, torch.arange(s) % w
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qf in range(f):
        for kf in range(f):
            half = _ref_frame_pair(qf, kf, s, block, decay, sinks)
            if half is None:
                continue
            kh, kw = _ref_window_size(half, h, s), _ref_window_size(half, w, s)
            for q in range(s):
                y0 = min(max(int(hs[q]) - (kh - 1) // 2, 0), h - kh)
                x0 = min(max(int(ws[q]) - (kw - 1) // 2, 0), w - kw)
                ok = (hs >= y0) & (hs < y0 + kh) & (ws >= x0) & (ws < x0 + kw)
                mask[qf * s + q, kf * s:(kf + 1) * s] = ok
    return mask


def _raster_view(perm, layout):
    """Layout's token mask back in raster order, and whether any padded key is allowed."""
    dense = layout.to_dense_mask()[0]
    real = (perm.order >= 0).nonzero().flatten()
    raster = torch.empty(perm.num_tokens, perm.num_tokens, dtype=torch.bool)
    order = perm.order[real]
    raster[order[:, None], order[None, :]] = dense[real][:, real]
    return raster, bool(dense[:, perm.order < 0].any())


def _token_density(perm, layout):
    """Allowed (real query, real key) pairs / N^2 from the block lists, without N x N."""
    visited, ids = layout.block_masks()
    visited, ids = visited[0], ids[0]
    real = (perm.order >= 0).view(-1, layout.block_q)
    patterns, pid = torch.unique(real, dim=0, return_inverse=True)  # few distinct real-token patterns per block
    count_real = real.sum(-1).double()
    total = (count_real[:, None] * count_real[None, :] * (visited & (ids < 0))).sum()
    qi, ki = (visited & (ids >= 0)).nonzero(as_tuple=True)
    # Group partial blocks by (mask, query pattern, key pattern); count each group's allowed pairs once.
    key = torch.stack([ids[qi, ki].long(), pid[qi], pid[ki]], 1)
    groups, size = torch.unique(key, dim=0, return_counts=True)
    tab = layout.mask_table[groups[:, 0]] & patterns[groups[:, 1]][:, :, None] & patterns[groups[:, 2]][:, None, :]
    return float(total + (tab.sum((1, 2)) * size).sum()) / perm.num_tokens ** 2


CASES = [
    pytest.param((9, 21, 27), 64, 1.0, (0,), None, id="9x21x27-b64-decay1-sink"),
    pytest.param((9, 21, 27), 64, 0.2, (), None, id="9x21x27-b64-decay0.2-nosink"),
    pytest.param((6, 17, 23), 128, 1.0, (0,), None, id="6x17x23-b128-decay1-sink"),
    pytest.param((7, 30, 26), 64, 0.5, (0, 3), (1, 8, 8), id="7x30x26-b64-tile1x8x8-sinks0,3"),
    pytest.param((5, 24, 40), 128, 1.0, (), (1, 8, 16), id="5x24x40-b128-tile1x8x16"),
]


@pytest.mark.parametrize("grid,block,decay,sinks,tile", CASES)
def test_mask_and_layout_match_brute_force(grid, block, decay, sinks, tile):
    expected = _ref_mask(grid, block, decay, sinks)
    assert not expected.all()
    mask = radial_window_mask(grid, block, decay, sinks)
    assert torch.equal(mask, expected)
    perm, layout = radial_window_layout(grid, block, decay, sinks, tile=tile)
    assert layout.block_q == layout.block_k == block and layout.q_len == perm.num_padded
    assert perm.tile[0] == 1 and (tile is None or perm.tile == tile)
    raster, padded_keys = _raster_view(perm, layout)
    assert torch.equal(raster, expected) and not padded_keys
    assert _token_density(perm, layout) == pytest.approx(expected.double().mean().item(), abs=1e-12)
    assert layout.density() < 1


def test_every_query_of_a_frame_sees_the_same_count():
    grid = (9, 21, 27)
    counts = radial_window_mask(grid, 64, 1.0, (0,)).sum(-1).view(grid[0], -1)
    assert (counts == counts[:, :1]).all()  # windows pushed inward at borders, never cut


def _keys_per_frame(grid, block, query_frame):
    s = grid[1] * grid[2]
    mask = radial_window_mask(grid, block, 1.0, ()).view(grid[0], s, grid[0], s)
    return (mask[query_frame].sum((0, 2)) // s).tolist()  # keys per query, per key frame


def test_window_shrinks_with_distance():
    s = 21 * 27  # ref 1024: width 256 at distance 2-3, 128 at 4-7, 64 at 8
    keys = _keys_per_frame((9, 21, 27), 64, 0)
    assert keys[:2] == [s, s]  # same and adjacent frames dense
    assert keys[2] == keys[3] > keys[4] == keys[7] > keys[8] > 0


def test_far_pairs_drop_by_the_split_rule():
    s = 13 * 19  # ref 256, B 64: width 64 at distance 2-3 (kept), 32 at 4-7 (even kept, odd dropped), 16 at 8
    keys = _keys_per_frame((9, 13, 19), 64, 0)
    assert [k > 0 for k in keys] == [True, True, True, True, True, False, True, False, True]
    assert keys[2] == keys[4] < s  # the minimum half-width B: a 2-D window smaller than the frame


@pytest.mark.parametrize("decay", [1.0, 0.2], ids=["decay1", "decay0.2"])
def test_density_on_wan21_below_dense_and_comparable_to_band(decay):
    perm, layout = radial_window_layout(WAN21, 128, decay, (0,))
    band = radial_layout(WAN21, 128, decay, (0,)).density()  # block-level pattern: token density == block density
    tokens = _token_density(perm, layout)
    assert perm.tile == (1, 8, 16) and perm.num_padded == perm.num_tokens
    assert tokens < 0.5 and layout.density() < 0.65
    assert abs(tokens - band) / band < 0.1  # the window keeps about as many keys as the band
    assert tokens <= layout.density()  # blocks on window borders are partial


def test_large_grid_builds_without_n_by_n():
    # 30x48x80: N = 115200, a dense mask would be 13 GB; the layout needs per-frame tables only.
    perm, layout = radial_window_layout((30, 48, 80), 64, 1.0, (0,))
    assert layout.num_q_blocks == 30 * 48 * 80 // 64 and 0 < layout.density() < 0.6
    assert layout.mask_table.shape[0] < 2000


def test_bad_arguments():
    with pytest.raises(ValueError, match="grid"):
        radial_window_layout((8, 8))
    with pytest.raises(ValueError, match="one frame"):
        radial_window_layout((4, 16, 16), 64, tile=(2, 4, 8))
    with pytest.raises(ValueError, match="one frame"):
        radial_window_layout((4, 16, 16), 64, tile=(1, 5, 5))
    with pytest.raises(ValueError, match="decay"):
        radial_window_mask((4, 8, 8), decay=1.5)
    with pytest.raises(ValueError, match="Radial.spatial"):
        dit_accel.Radial(spatial="grid")
    assert dit_accel.Radial().spatial == "band"
