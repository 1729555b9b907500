"""Token masks and the tile permutation against brute-force definitions written here.

The references below are written independently of dit_accel.patterns: per query
coordinate they compute the allowed keys of each dimension with a NATTEN-style
window-start formula (or the STA tile rule), then enumerate the allowed key
tokens explicitly. No Kronecker products, no shared helpers.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.patterns import TilePermutation, default_tile, gna_mask, tile_mask


# ----------------------------------------------------------------- references
def _ref_keys_1d(x, extent, k, s, d, causal):
    """Allowed key coordinates of query coordinate x along one dimension."""
    r = x % d
    size = len(range(r, extent, d))  # keys sharing x's dilation group
    i = x // d
    if causal:
        last = min((i // s) * s + s - 1, size - 1)
        lo, hi = max(last - k + 1, 0), i
    else:
        leader = min((i // s) * s + s // 2, size - 1)
        lo = min(max(leader - k // 2, 0), size - k)  # shift inward at the borders
        hi = lo + k - 1
    return [j * d + r for j in range(lo, hi + 1)]


def _raster(coords, grid):
    idx = 0
    for c, g in zip(coords, grid):
        idx = idx * g + c
    return idx


def _ref_mask(grid, keys_per_dim):
    n = math.prod(grid)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in itertools.product(*[range(g) for g in grid]):
        qi = _raster(q, grid)
        for kc in itertools.product(*[keys_per_dim[d][q[d]] for d in range(len(grid))]):
            mask[qi, _raster(kc, grid)] = True
    return mask


def _ref_gna(grid, k, s, d, causal):
    nd = len(grid)
    k, s, d = [(v,) * nd if isinstance(v, int) else v for v in (k, s, d)]
    causal = (causal,) * nd if isinstance(causal, bool) else causal
    keys = [[_ref_keys_1d(x, grid[a], k[a], s[a], d[a], causal[a]) for x in range(grid[a])] for a in range(nd)]
    return _ref_mask(grid, keys)


def _ref_sta(grid, tile, window):
    keys = []
    for extent, t, w in zip(grid, tile, window):
        n_tiles = -(-extent // t)
        per = []
        for x in range(extent):
            if w >= n_tiles:
                tiles = range(n_tiles)
            else:
                c = min(max(x // t, w // 2), n_tiles - 1 - w // 2)
                tiles = range(c - w // 2, c + w // 2 + 1)
            per.append([y for y in range(extent) if y // t in tiles])
        keys.append(per)
    return _ref_mask(grid, keys)


def _windows(row):
    nz = row.nonzero().flatten()
    return int(nz.min()), int(nz.max()) + 1


# --------------------------------------------------------- worked examples
@pytest.mark.parametrize("extent,k,s,causal,expected", [
    (7, 3, 1, False, [(0, 3), (0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (4, 7)]),
    (8, 4, 1, False, [(0, 4), (0, 4), (0, 4), (1, 5), (2, 6), (3, 7), (4, 8), (4, 8)]),
    (12, 6, 3, False, [(0, 6)] * 3 + [(1, 7)] * 3 + [(4, 10)] * 3 + [(6, 12)] * 3),
    (10, 4, 4, False, [(0, 4)] * 4 + [(4, 8)] * 4 + [(6, 10)] * 2),
    (8, 4, 2, True, [(0, 1), (0, 2), (0, 3), (0, 4), (2, 5), (2, 6), (4, 7), (4, 8)]),
], ids=["L7k3", "L8k4", "L12k6s3", "L10k4s4", "causal-L8k4s2"])
def test_methods_worked_examples(extent, k, s, causal, expected):
    mask = gna_mask((extent,), k, s, is_causal=causal)
    assert [_windows(r) for r in mask] == expected
    assert all(int(r.sum()) == e - b for r, (b, e) in zip(mask, expected))  # contiguous


# --------------------------------------------------------- brute force GNA
_CASES_1D = [(L, k, s, d, c) for L in (7, 10, 13) for k in (2, 3, 4, 5) for s in range(1, k + 1)
             for d in (1, 2) for c in (False, True) if k * d <= L]


@pytest.mark.parametrize("extent,k,s,d,causal", _CASES_1D,
                         ids=[f"L{L}-k{k}-s{s}-d{d}{'-causal' if c else ''}" for L, k, s, d, c in _CASES_1D])
def test_gna_1d_brute_force(extent, k, s, d, causal):
    assert torch.equal(gna_mask(extent, k, s, d, causal), _ref_gna((extent,), k, s, d, causal))


@pytest.mark.parametrize("grid,k,s,d,causal", [
    ((9, 11), (3, 4), (1, 1), 1, False),
    ((9, 11), (3, 4), (2, 3), (1, 2), False),
    ((9, 11), (4, 5), (4, 5), 1, (False, True)),
    ((8, 8), 4, 4, 1, False),
    ((10, 7), (5, 2), (3, 2), (2, 3), True),
    ((5, 6, 7), (3, 2, 4), (2, 1, 3), (1, 2, 1), False),
    ((5, 6, 7), (2, 3, 3), (1, 3, 2), 1, (True, False, False)),
    ((6, 4, 9), (3, 4, 3), (3, 2, 1), (2, 1, 3), False),
    ((3, 4, 5), (3, 4, 5), 1, 1, False),
], ids=["2d-nat", "2d-stride-dil", "2d-blocked-causalW", "2d-blocked-divisible", "2d-causal-dil",
        "3d-mixed", "3d-causalT", "3d-dil", "3d-full-window"])
def test_gna_nd_brute_force(grid, k, s, d, causal):
    mask = gna_mask(grid, k, s, d, causal)
    assert mask.shape == (math.prod(grid),) * 2
    assert torch.equal(mask, _ref_gna(grid, k, s, d, causal))


def test_gna_window_sizes_and_dense():
    grid, k = (6, 7, 5), (3, 4, 5)
    assert (gna_mask(grid, k, (2, 3, 1)).sum(-1) == math.prod(k)).all()  # exactly prod(k) keys per query
    assert gna_mask(grid, grid).all()  # kernel == extent is dense


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid=(8, 8), kernel_size=1), "kernel_size.*>= 2"),
    (dict(grid=(8, 8), kernel_size=(3, 3, 3)), "kernel_size.*3 values.*2 dimensions"),
    (dict(grid=(8, 8), kernel_size=3, stride=4), "stride.*<= kernel_size"),
    (dict(grid=(8, 8), kernel_size=3, stride=0), "stride.*>= 1"),
    (dict(grid=(8, 8), kernel_size=3, dilation=(1, 3)), "kernel_size\\*dilation.*9.*exceeds.*8"),
    (dict(grid=(8, 8), kernel_size=(3, 9)), "exceeds the grid extent 8"),
    (dict(grid=(8, 8), kernel_size=3, is_causal=(True,)), "is_causal"),
    (dict(grid=(2, 3, 4, 5), kernel_size=2), "grid"),
    (dict(grid=(8, 0), kernel_size=2), "grid"),
], ids=["k<2", "tuple-len", "stride>k", "stride<1", "k*d>extent", "k>extent", "causal-len", "4d-grid", "empty-dim"])
def test_gna_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gna_mask(**kwargs)


def test_gna_type_errors():
    with pytest.raises(TypeError, match="kernel_size"):
        gna_mask((8,), 2.5)
    with pytest.raises(TypeError, match="is_causal"):
        gna_mask((8,), 3, is_causal=1)


# ------------------------------------------------------------- sliding tile
_TILE_CASES = [
    ((12,), (4,), (3,)),
    ((13,), (4,), (3,)),
    ((10, 9), (2, 3), (3, 1)),
    ((7, 11), (3, 4), (3, 3)),
    ((6, 5, 9), (2, 3, 4), (3, 1, 1)),
    ((5, 7, 9), (2, 2, 4), (1, 5, 3)),
    ((3, 5), (4, 2), (3, 7)),  # tile larger than the extent, window wider than the grid
    ((9, 13), (2, 3), (2, 4)),  # even windows (FastVideo's strategies use them): centre +- w//2
    ((6, 8, 10), (2, 2, 2), (2, 3, 4)),
]


@pytest.mark.parametrize("grid,tile,window", _TILE_CASES, ids=lambda v: "x".join(map(str, v)))
def test_tile_mask_matches_sta_definition(grid, tile, window):
    assert torch.equal(tile_mask(grid, tile, window), _ref_sta(grid, tile, window))


@pytest.mark.parametrize("grid,tile,window", [
    ((12,), (4,), (3,)), ((8, 12), (2, 3), (3, 3)), ((6, 8, 8), (2, 2, 4), (3, 1, 1)), ((9, 8, 6), (3, 2, 2), (1, 3, 3)),
], ids=["1d", "2d", "3d", "3d-odd-tile"])
def test_tile_is_gna_for_divisible_extents(grid, tile, window):
    kernel = tuple(w * t for w, t in zip(window, tile))
    assert torch.equal(tile_mask(grid, tile, window), gna_mask(grid, kernel, tile))


def test_even_window_covers_the_tiles_of_the_next_odd_window():
    """FastVideo's STA: an even window w covers centre - w//2 .. centre + w//2, like w + 1."""
    assert torch.equal(tile_mask((8, 12), 2, (2, 4)), tile_mask((8, 12), 2, (3, 5)))
    assert not torch.equal(tile_mask((8, 12), 2, (2, 4)), tile_mask((8, 12), 2, (1, 3)))


def test_tile_bad_arguments():
    with pytest.raises(ValueError, match="window.*>= 1"):
        tile_mask((8, 8), 2, (3, 0))
    with pytest.raises(ValueError, match="tile.*2 dimensions"):
        tile_mask((8, 8), (2, 2, 2), 3)


def test_a_tile_far_longer_than_the_grid_is_refused_at_the_plan():
    """Tile (10**6, 1, 1) at Wan 720p asked for a terabyte, 10**20 overflowed an index; a tile a little longer than
    a small grid (the published (6, 8, 8) on a tiny model) still runs, padded."""
    with pytest.raises(ValueError, match=r"tile=\(1000000, 1, 1\) on the grid \(21, 45, 80\) pads it to "
                                         r"3,600,000,000 tokens, 47,619x its 75,600 \(longer than the grid along "
                                         r"dimension 0\): a tile covers at most the grid's extent"):
        dit_accel.Tile(tile=(10**6, 1, 1), window=(1, 1, 1)).plan((21, 45, 80))
    with pytest.raises(ValueError, match=r"pads it to 1.00e\+60 tokens"):
        dit_accel.Tile(tile=10**20, window=(1, 1, 1)).plan((21, 45, 80))
    assert dit_accel.Tile(tile=(6, 8, 8), window=(1, 1, 1)).plan((4, 12, 12)).density > 0
    assert dit_accel.Tile(tile=(100, 100, 100), window=1).plan((21, 45, 80)).density == 1.0  # (dense: no layout)


# -------------------------------------------------------------- permutation
@pytest.mark.parametrize("grid,tile", [((10,), (4,)), ((5, 7), (2, 4)), ((3, 5, 6), (2, 2, 4)), ((4, 8, 8), (2, 4, 8))],
                         ids=["1d-pad", "2d-pad", "3d-pad", "3d-exact"])
def test_tile_permutation(grid, tile):
    perm = TilePermutation(grid, tile)
    n = math.prod(grid)
    padded = tuple(-(-g // t) * t for g, t in zip(grid, tile))
    assert perm.num_tokens == n and perm.padded_grid == padded and perm.num_padded == math.prod(padded)

    # Reference order: tile coordinates first, then coordinates inside the tile, both raster.
    n_tiles = [p // t for p, t in zip(padded, tile)]
    expected = []
    for tc in itertools.product(*[range(m) for m in n_tiles]):
        for ic in itertools.product(*[range(t) for t in tile]):
            c = [a * t + b for a, t, b in zip(tc, tile, ic)]
            expected.append(_raster(c, grid) if all(x < g for x, g in zip(c, grid)) else -1)
    assert perm.order.tolist() == expected

    x = torch.randn(2, n, 3, requires_grad=True)
    y = perm.permute(x, dim=1)
    assert y.shape == (2, perm.num_padded, 3)
    assert (y[:, perm.order < 0] == 0).all()
    assert torch.equal(y[:, perm.order >= 0], x[:, perm.order[perm.order >= 0]])
    assert torch.equal(perm.unpermute(y, dim=1), x)
    (perm.unpermute(y * 2, dim=1)).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))

    z = torch.randn(2, 3, n, 4)
    assert torch.equal(perm.unpermute(perm.permute(z)), z)  # default dim=-2, any leading dims
    with pytest.raises(ValueError, match="dim"):
        perm.permute(z, dim=-1)


def test_default_tile():
    for grid, block in [((30, 48, 80), 64), ((30, 48, 80), 128), ((21, 60, 104), 64), ((64, 64), 64), ((100,), 64),
                        ((3, 5, 7), 64)]:
        tile = default_tile(grid, block)
        assert len(tile) == len(grid) and math.prod(tile) == block
    assert default_tile((30, 48, 80), 64) == (2, 4, 8)  # no padding, most cube-like
    assert default_tile((30, 48, 80), 128) == (2, 8, 8)
    with pytest.raises(ValueError, match="block"):
        default_tile((8, 8), 0)


def test_gna_per_head_kernel_sizes_give_each_head_its_own_window():
    """GNA(kernel_size=(k0, k1)) plans one per-head layout: head h's mask in raster order is exactly the
    brute-force GNA mask of k_h (written out here from the definition, not through the library)."""
    import itertools

    import dit_accel

    grid, kernels = (4, 6, 10), ((3, 3, 3), (2, 5, 7))
    plan = dit_accel.GNA(kernel_size=kernels).plan(grid)
    assert plan.layout.num_heads == 2 and dit_accel.GNA(kernel_size=kernels).heads == 2
    tiled = plan.layout.to_dense_mask()
    inv = plan.perm.inverse  # tiled position of each raster token
    coords = list(itertools.product(*[range(g) for g in grid]))

    def start(i, k, n):  # NATTEN: the window is centred, shifted inside the extent
        return min(max(i - k // 2, 0), n - k)

    for h, ks in enumerate(kernels):
        raster = tiled[h][inv][:, inv]
        for a, qa in enumerate(coords):
            for b, kb in enumerate(coords):
                inside = all(start(q, k, n) <= j < start(q, k, n) + k for q, j, k, n in zip(qa, kb, ks, grid))
                assert bool(raster[a, b]) == inside, (h, qa, kb)


@pytest.mark.parametrize("grid, tile, window, block", [((7, 6, 6), (1, 6, 6), (3, 1, 1), 36),
                                                       ((9, 6, 6), (1, 6, 6), (1, 1, 1), 12),
                                                       ((5, 5, 6), (1, 5, 6), (3, 1, 1), 30)],
                         ids=["frames-of-36", "frames-in-rows-of-12", "frames-of-30"])
def test_tile_block_size_runs_whole_tiles_as_blocks(grid, tile, window, block):
    """Frames that hold no whole 64-token block (12x12 tokens) run as blocks of whole tiles: the layout has no
    partial block, visits exactly the STA window's share, and the plan's output is the masked oracle's."""
    import dit_accel
    from tests.utils import make_qkv, reference

    method = dit_accel.Tile(tile=tile, window=window, block_size=block)
    plan = method.plan(grid)
    layout = plan.layout
    assert (layout.block_q, layout.block_k) == (block, block) and layout.partial_fraction() == 0.0
    want = _ref_sta(grid, tile, window)
    assert layout.density() == pytest.approx(want.float().mean().item())
    q, k, v = make_qkv(1, 2, math.prod(grid), math.prod(grid), 16, device="cpu")
    o, _ = plan.run(q, k, v, backend="torch")
    torch.testing.assert_close(o, reference(q, k, v, want)[0], atol=2e-5, rtol=2e-5)


def test_tile_block_size_checks_and_serialisation():
    import dit_accel

    with pytest.raises(ValueError, match="block_size=64 is invalid for tile"):
        dit_accel.Tile(tile=(1, 12, 12), window=(3, 1, 1), block_size=64).plan((8, 12, 12))
    with pytest.raises(ValueError, match="positive int"):
        dit_accel.Tile(tile=(1, 12, 12), window=(3, 1, 1), block_size=0)
    # Unset, the field stays out of the dict, so plans written before it existed are the same JSON.
    assert "block_size" not in dit_accel.Tile(tile=(4, 4, 4), window=(1, 3, 3)).to_dict()
    framed = dit_accel.Tile(tile=(1, 12, 12), window=(3, 1, 1), block_size=144)
    from dit_accel.checkpoints.finetuned import method_from_dict

    assert method_from_dict(framed.to_dict()) == framed
    # A numpy scalar (a size computed with numpy) is stored as a plain int, so plans serialise it as JSON.
    assert type(dit_accel.Tile(tile=(1, 12, 12), window=(3, 1, 1), block_size=np.int64(144)).block_size) is int


@pytest.mark.parametrize("grid, tile, window, block", [((7, 6, 6), (1, 6, 6), (3, 1, 1), 36),
                                                       ((9, 6, 6), (1, 6, 6), (1, 1, 1), 12),
                                                       ((5, 5, 6), (1, 5, 6), (3, 1, 1), 30)],
                         ids=["frames-of-36", "frames-in-rows-of-12", "frames-of-30"])
def test_whole_tile_blocks_run_the_triton_kernel_over_packed_tiles(grid, tile, window, block):
    """Blocks of a whole tile that no kernel takes: calls that force a kernel backend run the same pattern in
    64-token blocks over packed tiles, every visited block full or a column length, and the Triton kernel's result
    (the interpreter here) is the brute-force STA mask's. The PyTorch twin and CPU auto keep the whole-tile blocks;
    so does CUDA's auto for these small tiles (a 36-token tile in a 64-token block is 3.2x the work)."""
    import dit_accel
    from dit_accel.kernels.geometry import kernel_length_tiles
    from dit_accel.patterns.permutation import PackedTilePermutation
    from tests.utils import make_qkv, reference

    plan = dit_accel.Tile(tile=tile, window=window, block_size=block).plan(grid)
    runner = plan.call_plan("cuda", "triton")
    assert plan.call_plan("cpu") is plan and plan.call_plan("cuda", "torch") is plan
    assert plan.call_plan("cuda") is plan  # auto: the twin rather than (64 / 36)^2 = 3.2x the work or more
    assert plan.call_plan("cpu", "triton") is runner and plan.call_plan("cuda", "flex") is runner
    assert isinstance(runner.perm, PackedTilePermutation) and runner.perm.tile == tile
    assert (runner.layout.block_q, runner.layout.block_k) == (64, 64)
    assert plan.kernel_layout("cuda", "triton") is runner.kernel_layout("cuda", "triton")
    assert plan.kernel_layout("cpu") is plan.layout
    assert kernel_length_tiles(runner.layout) in (None, 1.0)  # no bit-masked block
    want = _ref_sta(grid, tile, window)
    q, k, v = make_qkv(1, 2, math.prod(grid), math.prod(grid), 16, device="cpu")
    o, density = plan.run(q, k, v, backend="triton")
    torch.testing.assert_close(o, reference(q, k, v, want)[0], atol=2e-5, rtol=2e-5)
    assert float(density) == plan.density  # the plan's own figure, whichever layout ran
    from dit_accel.kernels.block_sparse.launches import launched_variants

    assert launched_variants(runner.layout_on("cpu"))["forward"], "the Triton forward did not run"


def test_cuda_auto_runs_144_token_frames_over_packed_frames(monkeypatch):
    """The main job's frames (12 x 12 tokens, blocks of 144): CUDA's auto takes the packed plan ((192 / 144)^2 =
    1.78x the work, within KERNEL_PACKED_WORK), as does $DIT_ACCEL_BACKEND=triton on the CPU; $DIT_ACCEL_BACKEND=torch
    keeps the frames as blocks everywhere."""
    import dit_accel
    from dit_accel.patterns.tile import KERNEL_PACKED_WORK, packed_work

    assert packed_work(144) == pytest.approx((192 / 144) ** 2) and packed_work(144) <= KERNEL_PACKED_WORK
    assert packed_work(36) > KERNEL_PACKED_WORK and packed_work(128) == 1.0
    plan = dit_accel.Tile(tile=(1, 12, 12), window=(3, 1, 1), block_size=144).plan((8, 12, 12))
    runner = plan.call_plan("cuda")
    assert runner is not plan and runner.perm.slot == 192 and plan.call_plan("cpu") is plan
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "triton")
    assert plan.call_plan("cpu") is runner
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "torch")
    assert plan.call_plan("cuda") is plan


def test_whole_frame_blocks_are_refused_by_the_gpu_kernels_with_the_reason(monkeypatch):
    """144-token blocks: the CPU's auto takes the PyTorch twin; on CUDA the Triton and FlexAttention kernels say why
    they cannot (their tiles are powers of two), so auto never hands them such a layout."""
    from dit_accel.kernels import backends
    from dit_accel.kernels.request import Request

    cpu = Request(torch.device("cpu"), torch.float32, 32, False, 144, 144)
    assert backends.resolve("block_sparse", "auto", cpu) == "torch"
    cuda = Request(torch.device("cuda"), torch.bfloat16, 32, False, 144, 144)
    monkeypatch.setattr(backends, "triton_reason", lambda device: None)  # as on a machine with a GPU
    monkeypatch.setattr(backends, "_flex_reason", lambda device: None)
    assert "rebuild the layout with blocks of 64 or 128" in backends._block_sparse_triton(cuda)
    assert "power of two" in backends._block_sparse_flex(cuda)
    assert backends._block_sparse_flex(Request(torch.device("cuda"), torch.bfloat16, 32, False, 64, 128)) is None
