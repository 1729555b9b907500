"""``eval`` under faults: the dense cache follows the model's content, damaged entries are generated again,
a killed eval leaves nothing a later one trusts wrongly, and bad input files are one line."""

import json

import numpy as np
import pytest
import torch

from dit_accel.cli.main import main
from dit_accel.eval.runner import EvalSettings, load_method_specs, run_eval
from dit_accel.models.tiny import build_tiny_pipeline

from .faults import KINDS, damage, kill_points, run_killed, write_points

pytestmark = pytest.mark.usefixtures("one_thread")
GNA = {"gna": {"kernel_size": (2, 2, 2)}}


def _settings(model):
    return EvalSettings(model=str(model), prompts=["a red cat"], seeds=[0], frames=9, height=32, width=64, steps=2,
                        warmup=0)


def _eval(model, out, log=None, **kw):
    specs = load_method_specs(["gna"], None, defaults=GNA)
    lines = [] if log is None else log
    return run_eval(_settings(model), specs, out, lpips=False, log=lines.append, **kw)


def _psnr(results):
    return [row.get("psnr") for row in results["rows"]]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-wan"
    build_tiny_pipeline("tiny-wan").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clean(tmp_path_factory, model_folder):
    out = tmp_path_factory.mktemp("eval") / "clean"
    results = _eval(model_folder, out)
    return {"out": out, "psnr": _psnr(results), "dense": _dense_frames(out)}


def _dense_frames(out):
    (entry,) = sorted((out / "cache").glob("dense_*.npz"))
    with np.load(entry) as data:
        return data["frames"].copy()


def test_changed_weights_in_the_model_folder_are_not_served_from_the_cache(tmp_path, model_folder, clean):
    import shutil

    from diffusers import WanTransformer3DModel

    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    out = tmp_path / "out"
    shutil.copytree(clean["out"] / "cache", out / "cache")
    first = _eval(folder, out)
    assert first["dense_cached"] == 1  # same files, other path: still the same content
    transformer = WanTransformer3DModel.from_pretrained(folder / "transformer")
    with torch.no_grad():
        for p in transformer.parameters():
            p.mul_(1.5)
    transformer.save_pretrained(folder / "transformer")
    second = _eval(folder, out)
    assert second["dense_generated"] == 1 and second["dense_cached"] == 0
    assert not np.array_equal(_dense_frames_newest(out), clean["dense"])


def _dense_frames_newest(out):
    entry = max((out / "cache").glob("dense_*.npz"), key=lambda p: p.stat().st_mtime_ns)
    with np.load(entry) as data:
        return data["frames"].copy()


def test_an_in_memory_model_is_keyed_by_its_state_dict(tmp_path):
    pipe = build_tiny_pipeline("tiny-wan")
    out = tmp_path / "out"
    assert _eval("tiny-wan", out, pipe=pipe)["dense_generated"] == 1
    assert _eval("tiny-wan", out, pipe=pipe)["dense_cached"] == 1
    with torch.no_grad():
        next(pipe.transformer.parameters()).add_(0.5)
    assert _eval("tiny-wan", out, pipe=pipe)["dense_generated"] == 1


@pytest.mark.parametrize("kind", KINDS + ("float-frames", "no-times"))
def test_damaged_cache_entry_is_dropped_with_a_warning_and_generated_again(tmp_path, model_folder, clean, kind):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(clean["out"] / "cache", out / "cache")
    (entry,) = sorted((out / "cache").glob("dense_*.npz"))
    if kind == "float-frames":
        np.savez_compressed(entry, frames=clean["dense"].astype(np.float32), times="{}")
    elif kind == "no-times":
        np.savez_compressed(entry, frames=clean["dense"])
    else:
        damage(entry, kind)
    log = []
    results = _eval(model_folder, out, log)
    warning = [line for line in log if line.startswith("warning: dense cache entry dropped")]
    assert len(warning) == 1 and "\n" not in warning[0] and entry.name in warning[0], log
    assert results["dense_generated"] == 1 and _psnr(results) == clean["psnr"]
    np.testing.assert_array_equal(_dense_frames(out), clean["dense"])


@pytest.mark.parametrize("kind", ["truncated", "binary"])
def test_damaged_model_hash_memo_is_a_warning(tmp_path, model_folder, clean, kind):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(clean["out"] / "cache", out / "cache")
    damage(out / "cache" / "model_hashes.json", kind)
    log = []
    results = _eval(model_folder, out, log)
    assert results["dense_cached"] == 1 and _psnr(results) == clean["psnr"]
    (warning,) = [line for line in log if "model_hashes.json" in line]
    assert warning.startswith("warning: ") and "\n" not in warning
    json.loads((out / "cache" / "model_hashes.json").read_text())  # written again, whole


def test_killed_eval_leaves_nothing_a_later_eval_trusts_wrongly(tmp_path, model_folder, clean):
    total = write_points(lambda: _eval(model_folder, tmp_path / "count"))
    assert total >= 8
    for k in kill_points(total, 3):
        out = tmp_path / f"kill{k}"
        assert run_killed(lambda: _eval(model_folder, out), k) == "killed"
        for name in ("results.json", "model_hashes.json"):
            for path in out.rglob(name):
                json.loads(path.read_text())  # present means whole
        log = []
        results = _eval(model_folder, out, log)
        assert _psnr(results) == clean["psnr"], k
        assert not any(line.startswith("warning") for line in log), (k, log)
        np.testing.assert_array_equal(_dense_frames(out), clean["dense"])


@pytest.mark.parametrize("kind", ["empty", "binary", "comments"])
def test_prompts_file_errors_name_the_file(tmp_path, capsys, kind):
    path = tmp_path / "prompts.txt"
    path.write_bytes({"empty": b"", "binary": b"\x89PNG\x00\x00", "comments": b"# only\n\n"}[kind])
    rc = main(["eval", "--model", "tiny-wan", "--prompts", str(path), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in out and str(path) in out, out
    assert "pass --prompts" not in out
    assert {"empty": "is empty", "binary": "is binary", "comments": "holds no prompts"}[kind] in out


def test_binary_method_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "methods.json"
    path.write_bytes(b"\xff\xfe\x00\x01")
    rc = main(["eval", "--model", "tiny-wan", "--method-config", str(path), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in out and str(path) in out and "is binary" in out, out
