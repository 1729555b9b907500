"""What a new user meets: help that says what runs, the recommended setting by default, the names users
know, labelled side-by-side videos, output paths checked before the work, one line per bad value."""
import argparse
import re
from pathlib import Path

import numpy as np
import pytest

import dit_accel
from dit_accel.cli.main import main
from dit_accel.cli.options import add_method_options, method_from_args
from dit_accel.methods import Tile
from dit_accel.models.tiny import TINY_DEFAULTS
from dit_accel.cli.generate_args import DEFAULT_MODEL
from dit_accel.models.tiny_shapes import shapes_model

REPO = Path(__file__).resolve().parents[2]


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _error(capsys, argv) -> str:
    """One line on stderr and exit status 2 (argparse's or the command's own)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err), err
    return err[-1]


# ----------------------------------------------------------------------------- help says what runs
def test_top_level_help_names_the_default_model_and_method(capsys):
    text = _help(capsys)
    line = re.search(r"generate\s+(.*?)\s+info\s", text).group(1)
    assert "tiny-shapes" in line and "calibrated plan" in line and "tiny-wan" not in line
    assert "random" not in re.search(r"dit-accel generate\s+#([^\n]*?)dit-accel generate", text).group(1)


def test_generate_help_states_the_defaults_it_uses(capsys):
    text = _help(capsys, "generate")
    assert "with the calibrated plan shipped for it" in text
    assert f"{shapes_model(DEFAULT_MODEL).fallback()} when the call's steps or size differ" in text
    assert "with Tile" not in text
    for name, sizes in TINY_DEFAULTS.items():  # the text lengths the tiny models really use
        assert f"{name}: {sizes['max_sequence_length']}" in text
    assert "recommended setting" in text and "--method dense runs dense attention" in text
    assert "sta = tile" in text


# ----------------------------------------------------------------------------- names users know
def test_sta_is_tile_everywhere():
    parser = argparse.ArgumentParser()
    add_method_options(parser)
    args = parser.parse_args(["--method", "sta", "--tile", "6,8,8", "--window", "3,3,3"])
    assert args.method == "tile"
    assert method_from_args(args) == Tile(tile=(6, 8, 8), window=(3, 3, 3))
    assert dit_accel.method_from_name("STA", tile=(6, 8, 8)) == Tile(tile=(6, 8, 8))
    from dit_accel.eval.runner import load_method_specs

    (spec,) = load_method_specs(["sta"])
    assert spec.method.name == "tile"
    with pytest.raises(ValueError, match="alias of 'tile'"):
        dit_accel.register_method("sta", summary="x")


def test_recommended_is_exported():
    from dit_accel.pipelines.presets import published_settings, recommended

    assert dit_accel.recommended is recommended and "recommended" in dit_accel.__all__
    assert dit_accel.published_settings is published_settings


# ----------------------------------------------------------------------------- the recommended setting by default
@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """tiny-wan saved as a Diffusers folder: to the CLI a real Wan 2.1 model (not an embedded one)."""
    from dit_accel.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("models") / "wan"
    build_tiny_pipeline("tiny-wan").save_pretrained(folder)
    return folder


SMALL = ["--frames", "5", "--height", "64", "--width", "64", "--steps", "1", "--quiet"]


def test_a_real_model_without_method_runs_its_recommended_setting(wan_folder, tmp_path, capsys):
    import json

    from dit_accel.pipelines.presets import published_settings

    out = tmp_path / "wan.mp4"
    assert main(["generate", "--model", str(wan_folder), "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    ref = published_settings("WanTransformer3DModel", None, "Wan 2.1")[0]
    method, _ = ref.build()
    assert sidecar["method"] == json.loads(json.dumps(method.to_dict()))
    assert sidecar["method_choice"].startswith("the recommended setting for Wan 2.1")
    assert ref.source in sidecar["defaults_source"]
    assert re.search(rf"method {ref.method}: the recommended setting for Wan 2.1 .*settings: published", printed)

    assert main(["generate", "--model", str(wan_folder), "--method", "dense", "--out", str(tmp_path / "d.mp4"),
                 *SMALL]) == 0
    assert json.loads((tmp_path / "d.mp4.json").read_text())["method"] == {"method": "dense"}


def test_method_flags_without_method_on_a_real_model_are_one_line(wan_folder, tmp_path, capsys):
    line = _error(capsys, ["generate", "--model", str(wan_folder), "--decay", "0.5", "--out",
                           str(tmp_path / "x.mp4"), *SMALL])
    assert "--decay" in line and "--method" in line


# ----------------------------------------------------------------------------- the side-by-side video is labelled
def test_side_by_side_names_each_half():
    from dit_accel.cli.generate import _side_by_side, _strip_height

    left = np.full((3, 48, 48, 3), 90, np.uint8)
    right = np.full((3, 48, 48, 3), 160, np.uint8)
    out = _side_by_side(left, right, ("dense", "sla"))
    h = _strip_height(48)
    assert out.shape == (3, 48 + h, 98, 3) and h % 2 == 0
    np.testing.assert_array_equal(out[:, h:, :48], left)  # the videos themselves are untouched
    np.testing.assert_array_equal(out[:, h:, 50:], right)
    strip = out[0, :h]
    for half in (strip[:, :48], strip[:, 50:]):
        assert (half > 200).any() and (half < 30).mean() > 0.5  # white letters on black
    assert not np.array_equal(strip[:, :48], strip[:, 50:])  # two different names
    other = _side_by_side(left, right, ("dense", "tile"))[0, :h, 50:]
    assert not np.array_equal(other, strip[:, 50:])


# ----------------------------------------------------------------------------- checked before the work starts
def _never_load(monkeypatch):
    import dit_accel.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad argument was reported")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


def test_an_unwritable_out_fails_before_loading(tmp_path, capsys, monkeypatch):
    _never_load(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _error(capsys, ["generate", "--out", str(blocker / "video.mp4"), "--quiet"])
    assert "--out" in line and str(blocker) in line
    folder = tmp_path / "video.mp4"
    folder.mkdir()
    line = _error(capsys, ["generate", "--out", str(folder), "--quiet"])
    assert "is a folder" in line and str(folder) in line


@pytest.mark.parametrize("argv, needles", [
    (["--seed", "-1"], ["--seed", ">= 0"]),
    (["--model", "tiny-wan", "--method", "tile", "--tile", "2,4"], ["--tile 2,4 has 2 values", "T,H,W"]),
    (["--model", "tiny-wan", "--method", "tile_strategy"], ["--method tile_strategy needs --strategy FILE"]),
    (["--model", "tiny-wan", "--method", "sta", "--window", "1,1"], ["--window 1,1 has 2 values"]),
], ids=["seed", "tile-dims", "strategy", "window-dims"])
def test_bad_values_are_one_line_naming_the_flag(argv, needles, tmp_path, capsys, monkeypatch):
    _never_load(monkeypatch)
    line = _error(capsys, ["generate", *argv, "--out", str(tmp_path / "x.mp4"), "--quiet"])
    assert all(n in line for n in needles), line
    assert "Tile.window" not in line and "TileStrategy.path" not in line


def test_a_sink_frame_the_video_does_not_have_is_refused(tmp_path, capsys):
    line = _error(capsys, ["generate", "--model", "tiny-wan", "--method", "radial", "--sink-frames", "99",
                           "--steps", "1", "--out", str(tmp_path / "x.mp4"), "--quiet"])
    assert "sink_frames=(99,)" in line and "latent frames" in line
    assert not (tmp_path / "x.mp4").exists()


def test_finetune_sizes_follow_the_model():
    from dit_accel.cli.finetune import _size_defaults

    assert _size_defaults("tiny-flux")["frames"] == 1  # an image model: one frame, not 17
    assert _size_defaults("tiny-wan")["frames"] == TINY_DEFAULTS["tiny-wan"]["num_frames"]
    assert _size_defaults("black-forest-labs/FLUX.1-dev")["frames"] == 1
    assert _size_defaults("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")["frames"] == 81


# ----------------------------------------------------------------------------- long jobs say what they do
def test_train_tiny_says_what_it_does_before_the_first_step(tmp_path, capsys, monkeypatch):
    import dit_accel.models.train_tiny as train_tiny

    seen = []

    def first_loss(*args, **kwargs):  # stop at the first step: what was printed before it?
        seen.append(capsys.readouterr().err)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_tiny, "_flow_matching_loss", first_loss)
    with pytest.raises(KeyboardInterrupt):
        train_tiny.train(tmp_path, steps=3, batch_size=1, eval_seeds=())
    assert "training tiny-shapes: 3 steps" in seen[0] and str(tmp_path) in seen[0]


def test_bench_sass_says_what_it_compiles(monkeypatch, capsys):
    """A cold `bench sass` compiles hundreds of kernels for minutes: it says so and shows a progress bar."""
    from dit_accel.kernels import sass

    labels = []

    def fake_map(fn, jobs, workers=2, progress=None):
        labels.append(progress)
        return [{"name": "x"} for _ in jobs]

    monkeypatch.setattr(sass, "_cached", lambda *a: None)
    monkeypatch.setattr(sass, "map_in_workers", fake_map)
    jobs = [(object(), 90)] * 3
    assert len(sass.analyze_many(jobs, workers=2, progress=True)) == 3
    assert labels == ["compiling kernels"] and "compiling 3 kernel configurations" in capsys.readouterr().err
    sass.analyze_many(jobs, workers=2)
    assert labels[-1] is None and capsys.readouterr().err == ""  # the test suite's compiles stay quiet


def test_the_readme_commands_are_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(pip install[^\n]*)\n```", readme)
    assert commands[:2] == ["pip install -c constraints-cpu.txt -e . && dit-accel generate",
                            'pip install -c constraints-cpu.txt -e ".[test]" && python -m pytest -q']
    for part in commands[1].split(" && "):
        assert part in ci


def test_a_run_without_side_by_side_removes_the_earlier_runs_comparison(tmp_path, capsys):
    """generate --side-by-side, then generate at the same --out without it: the earlier comparison video
    (recorded in the earlier sidecar) goes; a file of that name no run recorded stays."""
    import json

    out = tmp_path / "v.mp4"
    pair = tmp_path / "v-vs-dense.mp4"
    common = ["generate", "--model", "tiny-shapes", "--steps", "1", "--out", str(out), "--quiet"]  # 576 tokens
    assert main([*common, "--side-by-side"]) == 0 and pair.exists()
    assert main(common) == 0
    assert not pair.exists() and json.loads((tmp_path / "v.mp4.json").read_text())["compare_dense"][
        "side_by_side"] is None
    pair.write_bytes(b"the user's own file")
    assert main(common) == 0 and pair.read_bytes() == b"the user's own file"
