"""dit-accel calibrate: every bad argument and input file is refused before any model loads (stderr, exit 2, one line)."""

import os

import pytest
import torch

from dit_accel.cli.main import main
from dit_accel.models import loading


@pytest.fixture
def files(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x89PNG\r\n\x00\x00\xff")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    comments = tmp_path / "comments.txt"
    comments.write_text("# only a comment\n\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    yield {"prompts": prompts, "binary": binary, "empty": empty, "comments": comments, "locked": locked,
           "a_file": a_file, "tmp": tmp_path}
    locked.chmod(0o700)


# (id, argv replacing/adding to the good ones, what the one line must name)
CASES = [
    ("min-psnr-500", ["--min-psnr", "500"], "--min-psnr"),
    ("min-psnr-negative", ["--min-psnr", "-5"], "--min-psnr"),
    ("min-psnr-nan", ["--min-psnr", "nan"], "--min-psnr"),
    ("min-psnr-inf", ["--min-psnr", "inf"], "--min-psnr"),
    ("min-psnr-zero", ["--min-psnr", "0"], "--min-psnr"),
    ("max-layer-error-zero", ["--max-layer-error", "0"], "--max-layer-error"),
    ("max-layer-error-nan", ["--max-layer-error", "nan"], "--max-layer-error"),
    ("no-budget", ["--min-psnr", None], "budget"),
    ("methods-foo", ["--methods", "foo"], "--methods"),
    ("methods-empty", ["--methods", ","], "--methods"),
    ("methods-one-bad", ["--methods", "tile,nope"], "--methods"),
    ("arch-z80", ["--arch", "z80"], "--arch"),
    ("kernel-bad", ["--kernel", "warp9"], "--kernel"),
    ("arch-without-the-variant", ["--arch", "h200", "--kernel", "ws"], "--arch h200 --kernel ws"),
    ("frames-0", ["--frames", "0"], "--frames"),
    ("height-negative", ["--height", "-48"], "--height"),
    ("width-0", ["--width", "0"], "--width"),
    ("steps-0", ["--steps", "0"], "--steps"),
    ("max-sequence-length-0", ["--max-sequence-length", "0"], "--max-sequence-length"),
    ("guidance-nan", ["--guidance-scale", "nan"], "--guidance-scale"),
    ("phases-0", ["--phases", "0"], "--phases"),
    ("samples-per-bucket-0", ["--samples-per-bucket", "0"], "--samples-per-bucket"),
    ("search-iters-negative", ["--search-iters", "-1"], "--search-iters"),
    ("batch-size-0", ["--batch-size", "0"], "--batch-size"),
    ("layer-groups-negative", ["--layer-groups", "-1"], "--layer-groups"),
    ("max-sample-mb-0", ["--max-sample-mb", "0"], "--max-sample-mb"),
    ("seeds-empty", ["--seeds", ","], "--seeds"),
    ("seeds-negative", ["--seeds", "-1"], "--seeds"),
    ("seeds-repeated", ["--seeds", "0,0"], "--seeds"),
    ("warmup-negative", ["--warmup-candidates", "-1"], "--warmup-candidates"),
    ("model-tiny-nope", ["--model", "tiny-nope"], "tiny-nope"),
    ("model-bad-name", ["--model", "./no/such/folder"], "--model"),
    ("hub-model-without-steps", ["--model", "someone/some-model"], "--steps"),
    ("groundtruth-require-on-tiny-wan", ["--model", "tiny-wan", "--groundtruth", "require"], "--groundtruth"),
    ("device-bogus", ["--device", "abacus"], "--device"),
    ("prompts-missing", ["--prompts", "{tmp}/nope.txt"], "nope.txt"),
    ("prompts-binary", ["--prompts", "{binary}"], "binary.txt"),
    ("prompts-empty", ["--prompts", "{empty}"], "empty.txt"),
    ("prompts-only-comments", ["--prompts", "{comments}"], "comments.txt"),
    ("prompts-folder", ["--prompts", "{tmp}"], "--prompts"),
    ("out-unwritable", ["--out", "{locked}/plan.json"], "--out"),
    ("out-is-a-folder", ["--out", "{tmp}"], "--out"),
    ("out-under-a-file", ["--out", "{a_file}/plan.json"], "--out"),
    ("report-dir-unwritable", ["--report-dir", "{locked}/report"], "--report-dir"),
    ("report-dir-is-a-file", ["--report-dir", "{a_file}"], "--report-dir"),
    ("capture-unwritable", ["--capture", "{locked}/qkv"], "--capture"),
    ("validate-negative", ["--validate", "-1"], "--validate"),
    ("tile-zero", ["--tile", "0,8,8"], "--tile"),
    ("out-on-a-read-only-filesystem", ["--out", "/proc/dit_accel_plan.json"], "--out"),
    ("report-dir-on-a-read-only-filesystem", ["--report-dir", "/proc/dit_accel_report"], "--report-dir"),
]
if not torch.cuda.is_available():
    CASES.append(("device-cuda-on-cpu", ["--device", "cuda"], "--device cuda"))


def _argv(files, change):
    args = {"--model": "tiny-shapes", "--prompts": str(files["prompts"]), "--out": str(files["tmp"] / "plan.json"),
            "--min-psnr": "30", "--steps": "2"}
    for flag, value in zip(change[::2], change[1::2]):
        args[flag] = None if value is None else value.format(**{k: str(v) for k, v in files.items()})
    if args["--model"] not in ("tiny-shapes", "tiny-wan"):
        args.pop("--steps")
    argv = ["calibrate", "--no-progress"]
    for flag, value in args.items():
        if value is not None:
            argv += [flag, value]
    return argv


@pytest.mark.parametrize("change, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_on_stderr_before_any_model_loads(files, monkeypatch, capsys, change, names):
    if change[-1] and "{locked}" in change[-1] and os.access(files["locked"], os.W_OK):
        pytest.skip("running as a user who can write into a read-only folder (root)")

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_pipeline", no_load)
    code = main(_argv(files, change))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert out == ""
    assert len(lines) == 1 and lines[0].startswith("dit-accel calibrate: "), err
    assert names in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (files["tmp"] / "plan.json").exists()
    assert not [p for p in files["tmp"].iterdir() if p.name.startswith(".")]  # the write probe left nothing


def test_good_input_passes_the_checks_and_reaches_the_loader(files, monkeypatch, capsys):
    """The checks refuse only bad input: the good arguments reach the model loader (patched to stop there)."""
    seen = []

    def stop(model, **k):
        seen.append(model)
        raise loading.ModelLoadError("stopped in the test")

    monkeypatch.setattr(loading, "load_pipeline", stop)
    code = main(_argv(files, ["--methods", "tile,sla", "--arch", "h100", "--seeds", "0,1"]))
    assert code == 2 and seen == ["tiny-shapes"]
    assert "stopped in the test" in capsys.readouterr().err
