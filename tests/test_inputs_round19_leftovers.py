"""Round 19: the leftovers of earlier rounds (each test failed before its fix)."""
import pytest

from dit_accel.cli.main import build_parser


@pytest.mark.parametrize("flag, text", [("--dense-layers", "1x2"), ("--dense-layers", "0 x 3")])
def test_a_layer_list_with_an_x_is_refused_not_read_as_two_layers(capsys, flag, text):
    """Before: ``--dense-layers 1x2`` ran layers 1 and 2 dense (``x`` separates a grid's sizes, 6x8x8), for a typo
    of 1,2 or 12."""
    with pytest.raises(SystemExit) as exc:
        build_parser("generate").parse_args(["generate", "--model", "tiny-wan", flag, text])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "separate them by commas" in err
    assert build_parser("generate").parse_args(["generate", flag, "1,2"]).dense_layers == [1, 2]


def test_calibrate_seeds_refuse_an_empty_item():
    """Before: ``--seeds 0,,1`` dropped the empty item (two seeds where three were meant, a value left out)."""
    import argparse

    from dit_accel.cli.calibrate import _int_list

    assert _int_list("0,1") == [0, 1]
    for text in ("0,,1", "1x2"):
        with pytest.raises(argparse.ArgumentTypeError):
            _int_list(text)
