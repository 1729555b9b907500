"""Round 17: a Tile whose explicit block_size is no box of its tile is refused when the config is built (before: at
the first call whose grid made it sparse, deep in a run; a grid its window covered ran dense without a word)."""
import pytest

import dit_accel


def test_a_block_that_is_no_box_of_the_tile_is_refused_when_built():
    with pytest.raises(ValueError, match=r"Tile.block_size=64 is invalid for tile \(2, 4, 4\) \(32 tokens\)"):
        dit_accel.Tile(tile=(2, 4, 4), block_size=64)
    assert dit_accel.Tile(tile=(1, 12, 12), block_size=144).block_size == 144  # a whole tile
    assert dit_accel.Tile(tile=(6, 8, 8), block_size=128).block_size == 128  # two rows of frames
    assert dit_accel.Tile(tile=(2, 4, 4), block_size=16).plan((8, 16, 16)).density < 1
