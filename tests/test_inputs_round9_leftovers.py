"""Round-9 input audit, leftovers in the method configs: the faults found, each with the test that failed before."""

from __future__ import annotations

import numpy as np
import pytest

import dit_accel
from dit_accel.patterns.radial import frame_pair_states


@pytest.mark.parametrize("make", [
    lambda flag: dit_accel.GNA(kernel_size=3, fit=flag),
    lambda flag: dit_accel.Tile(fit=flag),
    lambda flag: dit_accel.GNA(kernel_size=3, is_causal=flag),
    lambda flag: dit_accel.GNA(kernel_size=(3, 3), is_causal=(flag, False)),
], ids=["GNA.fit", "Tile.fit", "GNA.is_causal", "GNA.is_causal-tuple"])
def test_numpy_bools_are_flags_stored_as_python_bools(make):
    """``fit=np.bool_(True)`` was refused ("must be True or False"), ``is_causal=np.bool_(True)`` too ("expected a
    bool or a tuple of bools"), while ``apply()`` takes numpy bools for its switches."""
    config = make(np.bool_(True))
    for name in ("fit", "is_causal"):
        value = getattr(config, name, None)
        for v in value if isinstance(value, tuple) else (value,):
            assert v is None or type(v) is bool, (name, value)
    assert config == make(True) and hash(config) == hash(make(True))


def test_a_string_flag_is_still_refused():
    with pytest.raises(ValueError, match=r"GNA.fit='yes' is invalid: must be True or False"):
        dit_accel.GNA(fit="yes")
    with pytest.raises(TypeError, match=r"GNA.is_causal='no' is invalid"):
        dit_accel.GNA(is_causal="no")


def test_at_density_refuses_a_search_option_the_method_does_not_take():
    """``GNA().at_density(grid, d, tile=...)``: a TypeError naming the private ``_at_density`` before."""
    with pytest.raises(TypeError) as err:
        dit_accel.GNA().at_density((8, 16, 16), 0.3, tile=(1, 16, 8))
    message = str(err.value)
    assert message.startswith("GNA.at_density") and "tile" in message and "_at_density" not in message
    assert "takes no search options" in message
    with pytest.raises(TypeError, match=r"Tile.at_density.*'tiles'.*it takes tile="):
        dit_accel.Tile().at_density((8, 16, 16), 0.3, tiles=(1, 16, 8))
    assert dit_accel.Tile().at_density((8, 16, 16), 0.3, tile=(1, 16, 8)).tile == (1, 16, 8)  # (still searched)


def test_radial_refuses_duplicate_sink_frames():
    """``Radial(sink_frames=(0, 0))`` was accepted with the duplicate kept: the config differs from ``(0,)`` (its
    own plan cache entry) for the same mask (METHODS.md's rule is ``kf in sink_frames``)."""
    for frames, block in ((6, 64), (9, 128)):  # the rule reads membership: a duplicate changes nothing
        once, twice = (frame_pair_states(frames, 16 * 16, block, 1.0, sinks) for sinks in ((0, 3), (0, 3, 0)))
        assert all((a == b).all() if hasattr(a, "all") else a == b for a, b in zip(once, twice))
    with pytest.raises(ValueError, match=r"Radial.sink_frames=\(0, 0\) is invalid: frame 0 is listed twice"):
        dit_accel.Radial(sink_frames=(0, 0))
    with pytest.raises(ValueError, match=r"frames 0, 2 are listed twice"):
        dit_accel.Radial(sink_frames=[2, 0, 2, 0])
    assert dit_accel.Radial(sink_frames=(3, 0)).sink_frames == (3, 0)


def test_layout_rows_take_method_names_as_the_cli_does():
    """``layout_rows(methods=["STA"])`` gave no rows (the name matched none), with no error."""
    from dit_accel.eval.bench_layouts import layout_rows

    rows = layout_rows(["tiny-shapes-63"], ["STA"])
    assert rows and {r["method"] for r in rows} == {"tile"}
    assert rows == layout_rows(["tiny-shapes-63"], ["tile"])
