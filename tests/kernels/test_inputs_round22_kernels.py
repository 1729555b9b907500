"""Kernel entry points and layouts, round 22: each test pins one fault found by calling ``block_sparse_attention``,
``prepare_layout``, ``vsa_layout`` and the Ulysses statistics' backend label as a user (or a pipeline's
statistics) would: a silent wrong answer or label, or a bad name accepted, before the fix.
Numbers are checked against an fp64 brute force written here, at sizes that are not whole blocks."""

import pytest
import torch

import dit_accel
from dit_accel.kernels import BlockLayout, block_sparse_attention
from dit_accel.kernels.block_sparse.api import prepare_layout
from dit_accel.kernels.vsa.layouts import vsa_layout
from dit_accel.kernels.vsa.naive import cubes_of
from dit_accel.patterns import tile_layout, tile_mask


def _qkv(h=2, n=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, d, generator=g) for _ in range(3)]


def _brute(q, k, v, mask):
    """softmax(q k^T / sqrt(D)) v over the token mask ``[N, M]`` in fp64."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


# ------------------------------------------------------------------ 1. raster tensors and a tiled layout
def test_raster_inputs_run_under_a_tiled_layout_with_its_permutation():
    """Before: a grid that divides into the tiles ((8, 8) in (4, 4) tiles) gives a tiled layout as long as the
    raster sequence, so raster q, k, v ran under it without a word, each query attending the wrong keys (1.6 off
    the pattern's result); the lengths cannot tell the orders apart, and there was no way to say "raster".
    Now ``perm=`` takes raster tensors, permuted in and the output (and lse) back."""
    grid, tile, window = (8, 8), (4, 4), (1, 1)
    perm, layout = tile_layout(grid, tile, window, block_q=16, block_k=16)
    assert layout.q_len == perm.num_tokens and not perm.identity  # (the case no length check can catch)
    q, k, v = _qkv()
    want = _brute(q, k, v, tile_mask(grid, tile, window)).float()
    o, lse = block_sparse_attention(q, k, v, layout, backend="torch", perm=perm, return_lse=True)
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)
    assert lse.shape == (1, 2, 64) and torch.isfinite(lse).all()
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout, backend="torch", perm=perm), o)
    # and on a grid the tiling pads: raster in, raster out
    grid, tile = (3, 5, 7), (2, 2, 2)
    perm, layout = tile_layout(grid, tile, (1, 3, 3), block_q=16, block_k=16)
    q, k, v = _qkv(n=105)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout, backend="torch", perm=perm),
                               _brute(q, k, v, tile_mask(grid, tile, (1, 3, 3))).float(), rtol=1e-5, atol=1e-5)


def test_a_permutation_that_is_not_the_layouts_is_refused():
    perm, layout = tile_layout((8, 8), (4, 4), (1, 1), block_q=16, block_k=16)
    other, _ = tile_layout((3, 5, 7), (2, 2, 2), (1, 3, 3), block_q=16, block_k=16)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"orders 144 positions, but the layout was built for q_len=64"):
        block_sparse_attention(q, k, v, layout, backend="torch", perm=other)
    with pytest.raises(TypeError, match=r"perm must be the TilePermutation the layout is over"):
        block_sparse_attention(q, k, v, layout, backend="torch", perm=(4, 4))
    with pytest.raises(ValueError, match=r"q \(1, 2, 32, 16\) has 32 tokens .*\(64 raster tokens\)"):
        block_sparse_attention(q[:, :, :32], k, v, layout, backend="torch", perm=perm)


# ------------------------------------------------------------------ 2. vsa_layout's selection values
def _cubes():
    return cubes_of((5, 6, 7), (4, 4, 4))  # 8 cubes, some partial (element masks)


@pytest.mark.parametrize("bad, what", [(8, "out-of-range"), (-1, "negative"), ("dup", "repeated")],
                         ids=["past-the-cubes", "negative", "repeated"])
def test_vsa_layout_refuses_a_selection_of_bad_cubes(bad, what):
    """Before: a cube index past the cubes raised an indexing error from inside, a negative one was read from the
    end of the mask table, and a cube named twice in a row was visited twice (its keys counted twice), silently."""
    cubes = _cubes()
    selection = torch.arange(3).expand(1, 2, cubes.count, 3).clone()
    selection[0, 1, 5, 2] = selection[0, 1, 5, 0] if bad == "dup" else bad
    with pytest.raises(ValueError, match=r"selection\[0, 1, 5\] = .* must name 3 distinct key cubes in \[0, 8\)"):
        vsa_layout(cubes, selection)


def test_vsa_layout_reads_no_value_of_a_selection_off_the_cpu_by_default(monkeypatch):
    """The value check is a host read: by default only a CPU selection's (a GPU one's would be a sync per call,
    which a CUDA-graph capture forbids; ``check=True`` asks for it there)."""
    from dit_accel.kernels.vsa.layouts import _check_selection

    cubes = _cubes()
    selection = torch.full((1, 2, cubes.count, 3), 99, device="meta", dtype=torch.long)

    def no_read(self, *a, **k):
        raise AssertionError("a host read of the selection")

    for name in ("__int__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    _check_selection(cubes, selection, None)


def test_vsa_layout_refuses_a_selection_of_another_shape_or_dtype():
    cubes = _cubes()
    with pytest.raises(ValueError, match=r"selection must be an integer tensor \(B, H, Cq, k\)"):
        vsa_layout(cubes, torch.zeros(1, 2, cubes.count, 3))  # scores, not indices
    with pytest.raises(ValueError, match=r"selection must be an integer tensor .* got torch.int64 \(8, 3\)"):
        vsa_layout(cubes, torch.zeros(cubes.count, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must have 1 <= k <= 8 key cubes per row"):
        vsa_layout(cubes, torch.arange(9).expand(1, 1, cubes.count, 9))


def test_vsa_layout_of_a_valid_selection_is_unchanged():
    cubes = _cubes()
    g = torch.Generator().manual_seed(3)
    selection = torch.rand(1, 2, cubes.count, cubes.count, generator=g).argsort(-1)[..., :3]
    checked, unchecked = vsa_layout(cubes, selection), vsa_layout(cubes, selection, check=False)
    assert torch.equal(checked.to_dense_mask(), unchecked.to_dense_mask())


# ------------------------------------------------------------------ 3. prepare_layout's backend name
def test_prepare_layout_refuses_a_backend_it_does_not_know():
    """Before: ``prepare_layout(layout, "cpu", backend="nosuch")`` returned the layout, having prepared nothing."""
    layout = BlockLayout.from_dense_mask(torch.ones(40, 40, dtype=torch.bool), 16, 16)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', .*'torch'.*\); got 'nosuch'"):
        prepare_layout(layout, "cpu", backend="nosuch")
    with pytest.raises(TypeError, match=r"backend must be a string"):
        prepare_layout(layout, "cpu", backend=None)
    assert prepare_layout(layout, "cpu", backend="torch") is layout


# ------------------------------------------------------------------ 5. Ulysses statistics with a layout per head
def test_ulysses_backend_label_is_the_ranks_heads_backend():
    """Before: under Ulysses with a window per head the statistics' backend label was asked of every head's layout
    with this rank's share of the tokens (``torch`` on both ranks here), while rank 0's heads ran the one-pass
    kernel and rank 1's masked dense attention. Now each rank's label is what its own heads ran (rows are per
    rank; ``stats(all_ranks=True)`` lists them all)."""
    from dit_accel.pipelines.parallel import Split, _ran_backend

    grid, windows = (4, 16, 16), [(1, 1, 1), (1, 1, 1), (3, 3, 3), (3, 3, 3)]
    plan = dit_accel.Tile(tile=(1, 4, 4), window=windows).plan(grid)
    q, k, v = _qkv(h=4, n=plan.num_tokens)
    labels = []
    with torch.no_grad():
        for rank in (0, 1):
            split = Split(ulysses=2, ring=1, ulysses_rank=rank, ulysses_group=None, ring_rank=0, ring_group=None)
            heads = [x[:, 2 * rank:2 * rank + 2] for x in (q, k, v)]  # this rank's heads, every token
            alone = dit_accel.Tile(tile=(1, 4, 4), window=windows[2 * rank:2 * rank + 2]).plan(grid)
            labels.append(_ran_backend(plan, *heads, split, "auto"))
            assert labels[-1] == alone.backend_for(*heads, "auto")
    assert labels[0] != labels[1]  # (the two ranks' heads run different paths)
