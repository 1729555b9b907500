"""Round 25 (trust): a method flag means the same config in every command that takes it, and the config the Python
API builds; a flag a command does not use is refused, naming what to do, never dropped."""

from __future__ import annotations

import json

import pytest

from dit_accel import GNA, SLA, VSA, Radial, Tile
from dit_accel.cli.main import build_parser, main
from dit_accel.methods import registered_methods

# What a user means by a flag set, as the docs word it: the config the Python API builds.
MEANT = [
    ("tile --tile 6,8,8 --window 3,3,3", Tile(tile=(6, 8, 8), window=(3, 3, 3))),
    ("sta --tile 6x8x8 --window 1,3,3", Tile(tile=(6, 8, 8), window=(1, 3, 3))),
    ("tile --tile 2,4,4 --fit-grid", Tile(tile=(2, 4, 4), fit=True)),
    ("tile --block-size 64", Tile(block_size=64)),
    ("gna --kernel-size 3,5,5", GNA(kernel_size=(3, 5, 5))),
    ("gna --kernel-size 3,5,5 --stride 1,2,2 --dilation 1 --causal --fit-grid --tile 2,4,4",
     GNA(kernel_size=(3, 5, 5), stride=(1, 2, 2), dilation=1, is_causal=True, fit=True, tile=(2, 4, 4))),
    ("vsa --vsa-sparsity 0.9", VSA(sparsity=0.9)),
    ("vsa --vsa-sparsity 9e-1 --tile 4,8,8", VSA(sparsity=0.9, tile=(4, 8, 8))),
    ("vsa --vsa-topk 3", VSA(topk=3)),
    ("sla --topk 1e-1", SLA(topk=0.1)),
    ("sla --topk 0.1 --block-size 128 --block-k 128 --feature-map elu --rounding floor --linear-eps 1e-5",
     SLA(topk=0.1, block_q=128, block_k=128, feature_map="elu", rounding="floor", linear_eps=1e-5)),
    ("radial --decay 0.95 --block-size 64", Radial(decay=0.95, block_size=64)),
    ("radial --sink-frames none --radial-spatial window", Radial(sink_frames=(), spatial="window")),
    ("radial --sink-frames 0,2 --radial-rule reference", Radial(sink_frames=(0, 2), rule="reference")),
]
IDS = [flags.replace(" --", " ").replace(" ", "_") for flags, _ in MEANT]


def _generate_method(flags):
    """``flags``: a text split at spaces, or the argument list."""
    from dit_accel.cli.options import method_from_args

    argv = flags.split() if isinstance(flags, str) else list(flags)
    args = build_parser("generate").parse_args(["generate", "--model", "tiny-wan", "--method", *argv])
    args._parser = None  # (errors as ValueError)
    return method_from_args(args)


def _finetune_method(flags: str, tmp_path):
    from dit_accel.cli.finetune import config_from_args

    args = build_parser("finetune").parse_args(["finetune", "--model", "tiny-wan", "--output", str(tmp_path / "ft"),
                                                "--method", *flags.split()])
    return config_from_args(args).method


@pytest.mark.parametrize("flags, meant", MEANT, ids=IDS)
def test_generate_and_finetune_build_the_config_the_flags_mean(flags, meant, tmp_path):
    """Order of dimensions (T,H,W), ints and floats (0.9 = 9e-1), each flag to its field, in both commands."""
    for built in (_generate_method(flags), _finetune_method(flags, tmp_path)):
        assert built == meant
        assert type(getattr(built, "topk", 0.0)) is type(getattr(meant, "topk", 0.0))
        assert built.ran_dict() == meant.ran_dict()


@pytest.mark.parametrize("name", [n for n in registered_methods() if n not in ("dense", "tile_strategy")])
def test_flag_defaults_are_the_python_defaults(name, tmp_path):
    """``--method NAME`` alone (no model defaults layered) is ``NAME``'s config class with its own defaults."""
    assert _generate_method(name) == registered_methods()[name].cls()
    assert _finetune_method(name, tmp_path) == registered_methods()[name].cls()


@pytest.mark.parametrize("flags, other", [("radial --topk 0.1", "sla"), ("sla --window 3,3,3", "tile"),
                                          ("tile --kernel-size 3", "gna"), ("gna --vsa-sparsity 0.9", "vsa"),
                                          ("dense --tile 2,4,4", "gna/tile/tile_strategy/vsa")])
def test_a_flag_of_another_method_is_refused_in_generate_and_finetune(flags, other, tmp_path):
    flag = flags.split()[1]
    for build in (_generate_method, lambda f: _finetune_method(f, tmp_path)):
        with pytest.raises(ValueError, match=rf"{flag} .*--method {other}|dense has nothing"):
            build(flags)


# ------------------------------------------------------------------ eval: --method-config and --stacks
def _stack(text: str):
    from dit_accel.cli.eval import _stacks

    return _stacks(text, None)[0].method


@pytest.mark.parametrize("flags, config, stack", [
    ("tile --tile 6,8,8 --window 1,3,3", {"tile": {"tile": [6, 8, 8], "window": [1, 3, 3]}},
     "tile:tile=6/8/8;window=1/3/3"),
    ("gna --kernel-size 3,5,5 --causal --fit-grid", {"gna": {"kernel_size": [3, 5, 5], "is_causal": True, "fit": True}},
     "gna:kernel_size=3/5/5;is_causal=true;fit=true"),
    ("vsa --vsa-sparsity 0.9", {"vsa": {"sparsity": 0.9}}, "vsa:sparsity=0.9"),
    ("sla --topk 0.1 --block-size 128", {"sla": {"topk": 0.1, "block_q": 128}}, "sla:topk=0.1;block_q=128"),
    ("radial --decay 0.95 --sink-frames 0", {"radial": {"decay": 0.95, "sink_frames": [0]}},
     "radial:decay=0.95;sink_frames=0"),
], ids=["tile", "gna", "vsa", "sla", "radial"])
def test_eval_method_config_and_stacks_equal_the_flags_config(flags, config, stack, tmp_path):
    from dit_accel.eval.runner import load_method_specs

    path = tmp_path / "methods.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    (spec,) = load_method_specs(None, str(path))
    wanted = _generate_method(flags)
    assert spec.method == wanted == _stack(stack)
    assert {k: v for k, v in spec.describe().items() if k != "label"} == wanted.ran_dict()


@pytest.mark.parametrize("stack, flags", [("radial:sink_frames=0", "radial --sink-frames 0"),
                                          ("radial:sink_frames=none", "radial --sink-frames none"),
                                          ("tile:tile=6x8x8", "tile --tile 6x8x8"),
                                          ("sta:tile=1x8x8;window=3", "tile --tile 1,8,8 --window 3")])
def test_eval_stacks_take_a_value_as_generates_flag_reads_it(stack, flags):
    """Before: ``radial:sink_frames=0`` and ``=none`` and ``tile:tile=6x8x8`` were refused ("expected a tuple"),
    where ``--sink-frames 0`` / ``none`` and ``--tile 6x8x8`` run."""
    assert _stack(stack) == _generate_method(flags)


@pytest.mark.parametrize("argv, stack", [
    (["--tile", "2,4,4"], "tile:tile=2/4/4"),
    (["--window", "1x3x3"], "tile:window=1/3/3"),
    (["--causal"], "gna:is_causal=true"),
    (["--fit-grid"], "tile:fit=true"),
    (["--vsa-sparsity", "0.9"], "vsa:sparsity=0.9"),
    (["--block-size", "128"], "sla:block_q=128"),
    (["--sink-frames", "none"], "radial:sink_frames=none"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_eval_refuses_generates_method_flags_naming_the_config_to_give(argv, stack, tmp_path, capsys):
    """Before: "unrecognized arguments: --tile 2,4,4" (and "ambiguous option: --method"); the stack the message
    offers builds what the flag does in generate."""
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", "tiny-wan", "--out", str(tmp_path / "e"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{argv[0]} is a flag of generate and finetune; eval takes" in err and stack in err
    method = stack.split(":")[0]
    assert _stack(stack) == _generate_method(" ".join([method, *argv]))
    assert not (tmp_path / "e").exists()


def test_eval_refuses_method_pointing_to_methods(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "tiny-wan", "--out", str(tmp_path / "e"), "--method", "sla"])
    assert "--method is a flag of generate and finetune; eval compares methods: name them with --methods (e.g. " \
           "--methods dense,sla)" in capsys.readouterr().err


# ------------------------------------------------------------------ calibrate --methods / --tile, bench --tile
def _calibrate_args(tmp_path, *extra):
    from dit_accel.cli.calibrate import check_args

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n", encoding="utf-8")
    args = build_parser("calibrate").parse_args(
        ["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--out", str(tmp_path / "plan.json"),
         "--min-psnr", "20", "--device", "cpu", *extra])
    check_args(args)
    return args


def test_calibrate_tile_is_spelled_as_generates(tmp_path):
    """Before: ``calibrate --tile 1x8x8`` was refused ("not a list of integers ... x separates a grid's sizes, as in
    6x8x8"), where generate takes it."""
    for text in ("1x8x8", "1,8,8", "1 8 8"):
        assert tuple(_calibrate_args(tmp_path, "--tile", text).tile) == _generate_method(["tile", "--tile", text]).tile


def test_calibrate_refuses_tile_when_no_candidate_uses_it(tmp_path):
    """Before: ``--methods sla,radial --tile 1,8,8`` ran, the tile dropped without a word."""
    from dit_accel.cli.calibrate import _UsageError

    with pytest.raises(_UsageError, match=r"--tile is the tile of the Tile and GNA candidates, and --methods "
                                          r"sla,radial has neither: add tile or gna to --methods, or drop --tile"):
        _calibrate_args(tmp_path, "--methods", "sla,radial", "--tile", "1,8,8")
    assert _calibrate_args(tmp_path, "--methods", "gna,sla", "--tile", "1,8,8").tile == [1, 8, 8]


def test_calibrate_methods_take_the_names_other_commands_take(tmp_path):
    """Before: ``--methods sta`` and ``TILE`` were refused (eval, bench and generate take them), and ``tile,tile``
    ran."""
    from dit_accel.cli.calibrate import _UsageError

    assert _calibrate_args(tmp_path, "--methods", "STA,sla").methods == "tile,sla"
    with pytest.raises(_UsageError, match="names tile more than once"):
        _calibrate_args(tmp_path, "--methods", "tile,sta")


def test_bench_modelled_tile_is_spelled_as_generates(capsys):
    """Before: ``bench kernels --modelled --tile 1x16x8`` was refused as not comma-separated ints; now it is read
    (and here refused for its rank on the 2-D FLUX shapes, naming the tile)."""
    assert main(["bench", "kernels", "--modelled", "--shapes", "FLUX", "--densities", "0.1", "--tile", "1x16x8"]) == 2
    assert "--tile 1x16x8 has 3 value(s), but the grids of the shapes kept have 2" in capsys.readouterr().err
