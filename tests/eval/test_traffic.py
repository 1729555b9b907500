"""The modelled traffic of the PyTorch operators around the kernels (dit_accel.eval.traffic): the counting rule,
and bounds that keep the permutation's backward a gather and VSA's gated term in its kernels. The counts are
deterministic (shapes and dtypes only), so they are bounded here; BENCHMARKS.md records them at Wan's grids."""

import pytest
import torch

from dit_accel.kernels.backends import triton_reason

pytestmark = pytest.mark.skipif(triton_reason("cpu") is not None, reason="needs the Triton interpreter on the CPU")


def test_the_counting_rule():
    """Each operator reads its inputs once and writes its outputs once; a view, an allocation and the read of an
    expanded input's repeated elements cost nothing; an in-place output is counted once, as read."""
    from dit_accel.eval.traffic import count_traffic

    a, b = torch.ones(1000), torch.ones(1000)
    c = torch.ones(10, 1)

    def fn():
        x = a + b  # 4000 + 4000 read, 4000 written
        x.view(10, 100).add_(c.expand(10, 100))  # 4000 + 40 read (in place: not written again)
        torch.empty(5000)  # an allocation

    assert count_traffic(fn) == {"ops": 2, "bytes": 12000 + 4040}


@pytest.fixture(scope="module")
def traffic():
    from dit_accel.eval.traffic import measure_traffic
    from dit_accel.kernels.vsa import fine
    from dit_accel.methods import Tile

    saved = dict(fine._TEMPLATES)
    try:  # a grid with a partial dimension (t: 6 = 4 + 2), and one that every cube divides
        tile = Tile(tile=(2, 4, 8), window=(1, 3, 3))  # (sparse at these grids: Wan's own covers them whole)
        yield {grid: measure_traffic(grid=grid, heads=1, head_dim=64, tile=tile) for grid in ((6, 16, 16),
                                                                                             (8, 16, 16))}
    finally:
        fine._TEMPLATES.clear()
        fine._TEMPLATES.update(saved)


def test_every_case_runs_and_the_kernels_come_back(traffic):
    from dit_accel.eval.traffic import CASES
    from dit_accel.kernels.block_sparse import triton as bs
    from dit_accel.kernels.vsa import fine, triton as vsa_triton

    for result in traffic.values():
        assert set(result) == set(CASES) and all(row["bytes"] > 0 and row["ops"] > 0 for name, row in result.items()
                                                 if name not in ("tile_raster", "tile_train_raster"))
    assert not isinstance(bs._fwd_kernel, type(None)) and type(bs._fwd_kernel).__name__ != "_StubKernel"
    assert vsa_triton.coarse_triton.__name__ == "coarse_triton" and fine._direct.__name__ == "_direct"
    assert fine._launch.__name__ == "_launch" and bs.triton_backward.__name__ == "triton_backward"  # (counted)
    from dit_accel.kernels.sla import api as sla_api

    assert sla_api._fused.__name__ == "_fused" and hasattr(sla_api._fused, "cache_info")


@pytest.mark.parametrize("grid", [(6, 16, 16), (8, 16, 16)], ids=["partial-t", "whole-cubes"])
def test_the_raster_reading_forward_moves_nothing_around_the_kernel(traffic, grid):
    """Tile's inference call with the kernel reading raster order (kernels/block_sparse/gather.py): no operator of
    the tokens' size around the launch, where the gathering path's q, k, v and o passes are 8 q-sized units."""
    result = traffic[grid]
    assert result["tile_raster"]["units"] < 0.05 and result["tile"]["units"] >= 7.5, result


@pytest.mark.parametrize("grid", [(6, 16, 16), (8, 16, 16)], ids=["partial-t", "whole-cubes"])
def test_a_training_call_reading_raster_order_both_ways_moves_nothing_around_the_kernels(traffic, grid):
    """Tile's training call with the forward and the two-pass backward reading and writing raster order: no
    operator of the tokens' size, where the gathering path adds dO's gather and the three gradients' scatters."""
    result = traffic[grid]
    assert result["tile_train_raster"]["units"] < 0.05 and result["tile_train"]["units"] >= 15.0, result


def test_vsa_reading_raster_order_adds_the_gated_term_in_the_fine_launch(traffic):
    """VSA's inference call with both branches reading raster order (kernels/vsa/raster.py): no copy into cube order
    and none back, and the gated sum no pass of its own (it was 3.5-5 units: read fine, gate and the cube rows,
    write): the fine launch reads the gate once and the cube rows (about 1.1 units, counted as its kernel's)."""
    for result in traffic.values():
        raster = result["vsa_raster"]
        assert raster["units"] <= 1.0 and 1.0 <= raster["kernel_units"] <= 1.3, raster
        assert result["vsa"]["units"] - raster["units"] >= 8.0, result


@pytest.mark.parametrize("grid", [(6, 16, 16), (8, 16, 16)], ids=["partial-t", "whole-cubes"])
def test_vsa_training_reading_raster_order_drops_the_cube_order_copies(traffic, grid):
    """VSA's training call with both branches reading raster order both ways (kernels/vsa/raster.py): no copy of q,
    k, v into cube order, none of the fine output and lse back, and in the backward no scatter of the gradient into
    cube order, no sum of the two branches' gradients in cube order and no scatter back: more than 18 q-sized units
    fewer (29.4 and 21.2 counted at these grids), about 15-18 left (the gated term both ways, each cube's gradient
    added over its tokens in place, the coarse branch's own work)."""
    result = traffic[grid]
    assert result["vsa_train"]["units"] - result["vsa_train_raster"]["units"] >= 18.0, result
    assert result["vsa_train_raster"]["units"] <= 20.0, result


@pytest.mark.parametrize("grid", [(6, 16, 16), (8, 16, 16)], ids=["partial-t", "whole-cubes"])
def test_backward_permutations_are_gathers(traffic, grid):
    """The Tile call's backward adds at most the four inverse gathers (q, k, v back to raster order, o's gradient
    to tiled order with its padding zeroed: about 2.2 q-sized passes each) and nothing else of the tokens' size;
    autograd's scatter-adds into zero-filled tensors made it about 3.5 each."""
    result = traffic[grid]
    backward = result["tile_train"]["units"] - result["tile"]["units"]
    assert backward <= 4 * 2.5, result


@pytest.mark.parametrize("grid", [(6, 16, 16), (8, 16, 16)], ids=["partial-t", "whole-cubes"])
def test_the_gated_term_is_one_pass(traffic, grid):
    """The gate costs one pass over gate and fine writing the output (3 q-sized units) and, on a grid with a
    partial dimension, the cube rows gathered along it (a quarter of the tokens in fp32 at most: 0.5 units more).
    The per-token fp32 product, sum and cast cost about 13 more. On a grid of whole cubes that pass reads the fine
    output in tiled order, so the ungated call's way back to raster order (2 units) is not made: about 1 more."""
    result = traffic[grid]
    gated = result["vsa"]["units"] - result["vsa_nogate"]["units"]
    assert gated <= (1.1 if grid == (8, 16, 16) else 3.7), result


def test_index_operators_are_charged_the_rows_they_name():
    """A gather of 3 rows of 100 reads those 3 rows (and its index), an index fill of 2 rows writes those 2: the
    padded permutation's fill and its way back read no padding rows (the general rule charged whole tensors)."""
    from dit_accel.eval.traffic import count_traffic

    x = torch.ones(100, 10)  # 40 bytes a row
    index = torch.tensor([5, 7, 9])  # 24 bytes
    cols = torch.zeros(100, 1, dtype=torch.int64)

    def select():
        x.index_select(0, index)  # 3 rows read, 3 written

    def fill():
        x.index_fill_(0, index[:2], 0.0)  # 2 rows written, the index read

    def gather():
        x.gather(1, cols)  # 100 elements read, 100 written

    assert count_traffic(select) == {"ops": 1, "bytes": 3 * 40 + 24 + 3 * 40}
    assert count_traffic(fill) == {"ops": 1, "bytes": 16 + 2 * 40}
    assert count_traffic(gather) == {"ops": 1, "bytes": 100 * 4 + 800 + 100 * 4}


@pytest.mark.parametrize("argv,says", [
    (["--grid", "4,4"], "three positive ints"), (["--grid", "0,4,4"], "three positive ints"),
    (["--grid", "a,b,c"], "not comma-separated ints"), (["--heads", "0"], "0 must be >= 1"),
    (["--grid", "1,1,1"], "--grid 1,1,1 --heads 2 --head-dim 64: attention backend 'triton' cannot run")])
def test_the_command_refuses_bad_arguments_with_the_reason(argv, says, capsys):
    """``python -m dit_accel.eval.traffic``: a grid that is not three positive ints, a count below 1, or a grid
    too small for the cases' kernels ends with a usage error naming the argument, not a traceback."""
    from dit_accel.eval.traffic import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("grid", [(6, 16, 16), (8, 16, 16)])
def test_the_sla_backward_glue_kernels_take_most_of_its_traffic_off_the_host(traffic, grid):
    """SLA's training call with its glue in Triton kernels (``DIT_ACCEL_SLA_GLUE=1``): around the kernels, the
    projection (its GEMMs) and the transposed block lists; d num, d den and their scale, the features, the global
    sums' gradients and phi's backward (about 110 units of mostly fp32 operators without the kernels) are gone.
    Counting the glue kernels' own operands too, it moves under 40% of what it did."""
    rows = traffic[grid]
    host, glued = rows["sla_train"], rows["sla_train_glue"]
    assert glued["units"] < 0.1 * host["units"], (glued, host)
    assert glued["units"] + glued["kernel_units"] < 0.4 * (host["units"] + host["kernel_units"]), (glued, host)
    # (the kernels' operands: q, k, v, d num and the fp32 gradients, each once; phi(K) and the sums' partials)
    assert 20 < glued["kernel_units"] - host["kernel_units"] < 30, (glued, host)
