"""`dit-accel eval --real/--fid-weights`: a path that is not there is refused before the model loads (exit 2, one
line naming the flag); a FID that was asked for but could not run is a warning in results.json, not only a
skip line."""
import json

import pytest

from dit_accel.cli.main import main


@pytest.fixture
def no_model_load(monkeypatch):
    """A check that is meant to come before the model: loading one fails the test."""
    from dit_accel.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    monkeypatch.delenv("DIT_ACCEL_FID_WEIGHTS", raising=False)


def _inputs(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("not an image")
    (tmp_path / "file.png").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("argv, said", [
    (["--real", "{tmp}/nonexistent"], "--real {tmp}/nonexistent: no such folder; pass a folder of "
                                      ".png/.jpg/.jpeg/.webp images"),
    (["--real", "{tmp}/texts"], "--real {tmp}/texts: no .png/.jpg/.jpeg/.webp images in it"),
    (["--real", "{tmp}/file.png"], "--real {tmp}/file.png: is a file, not a folder"),
    (["--real", ""], "--real is empty; pass a folder of"),
    (["--fid-weights", "{tmp}/nonexistent.pt"], "--fid-weights {tmp}/nonexistent.pt: no such file; pass a "
                                                "TorchScript Inception file"),
    (["--fid-weights", "{tmp}/texts"], "--fid-weights {tmp}/texts: is a folder; pass a TorchScript"),
    (["--fid-weights", "no_such_module_x:make"], "--fid-weights no_such_module_x:make: no module "
                                                 "'no_such_module_x' to import"),
], ids=["real-missing", "real-no-images", "real-a-file", "real-empty", "weights-missing", "weights-a-folder",
        "weights-no-module"])
def test_a_missing_fid_path_is_refused_before_the_model(argv, said, tmp_path, capsys, no_model_load):
    tmp = _inputs(tmp_path)
    argv = [a.format(tmp=tmp) for a in argv]
    out = tmp_path / "out"
    assert main(["eval", "--model", "tiny-shapes", "--methods", "tile", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said.format(tmp=tmp) in err, err
    assert not out.exists()  # nothing written


def test_a_missing_env_weights_file_is_refused_naming_the_variable(tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_FID_WEIGHTS", str(tmp_path / "gone.pt"))
    assert main(["eval", "--model", "tiny-shapes", "--out", str(tmp_path / "out")]) == 2
    assert f"DIT_ACCEL_FID_WEIGHTS {tmp_path / 'gone.pt'}: no such file" in capsys.readouterr().err


def test_run_eval_refuses_a_missing_real_folder_before_loading(tmp_path, no_model_load):
    from dit_accel.eval.runner import EvalSettings, MethodSpec, run_eval

    settings = EvalSettings(model="tiny-shapes", prompts=["a red square moving left"], seeds=[0])
    with pytest.raises(ValueError, match="--real .*nonexistent: no such folder"):
        run_eval(settings, [MethodSpec.parse("tile")], tmp_path / "out", real_dir=str(tmp_path / "nonexistent"))
    assert not (tmp_path / "out").exists()


def test_real_without_fid_weights_runs_and_warns_in_results(tmp_path, capsys, monkeypatch):
    """No Inception weights is not a typo (nothing to check): the run goes on, and the FID-vs-real that --real asked
    for and could not get is in results.json's warnings, not only in "skipped"."""
    from PIL import Image

    monkeypatch.delenv("DIT_ACCEL_FID_WEIGHTS", raising=False)
    real = tmp_path / "real" / "sub"
    real.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(real / "a.png")
    out = tmp_path / "out"
    assert main(["eval", "--model", "tiny-wan", "--methods", "dense", "--prompt", "a cat", "--frames", "5",
                 "--height", "32", "--width", "32", "--steps", "1", "--max-sequence-length", "16", "--warmup", "0",
                 "--floor-backend", "none", "--no-lpips", "--real", str(tmp_path / "real"), "--out", str(out),
                 "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert "FID vs --real skipped: no FID feature extractor (see the FID line)" in res["warnings"]
    assert any(w.startswith("FID skipped: no Inception weights configured") for w in res["warnings"])
    assert not any(w.startswith("CLIP") for w in res["warnings"])  # not asked for: only a skip line
    assert any(w.startswith("CLIP") for w in res["skipped"])
