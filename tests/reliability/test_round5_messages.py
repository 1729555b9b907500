"""Issue 47 item 9: messages a user meets from the CLI and the library are one line that names the thing and
the fix: a full disk names the file (eval, calibrate), a forced backend whose variant failed its self-check
names the variant and ``--backend auto``, a strategy file naming layers the model lacks warns."""

import errno

import numpy as np
import pytest

from dit_accel.cli.main import main
from dit_accel.kernels import selfcheck

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model", "tiny-wan", "--frames", "9", "--height", "32", "--width", "64", "--steps", "2", "--quiet"]


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert not any("Traceback" in line for line in err), err
    return err[-1]


def _full_disk(monkeypatch, module, name, after=64):
    """``module.name`` (a writer taking a path or file) writes ``after`` bytes, then fails as a full disk does:
    OSError ENOSPC without a file name (numpy, Pillow and torch write through file handles)."""
    def write(path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"\0" * after)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, name, write)


def test_eval_on_a_full_disk_names_the_file_in_one_line(tmp_path, capsys, monkeypatch):
    _full_disk(monkeypatch, np, "savez_compressed")
    out = tmp_path / "eval"
    code = main(["eval", *TINY, "--methods", "dense", "--out", str(out), "--no-lpips"])
    line = _error_line(capsys)
    assert code != 0 and "No space left on device" in line and str(out / "cache") in line, line
    assert "free space" in line


def test_calibrate_on_a_full_disk_names_the_file_in_one_line(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".dit_accel-tmp-") and self.name.endswith("plan.json"):
            real(self, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    out = tmp_path / "plan.json"
    code = main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "25", "--out",
                 str(out), "--phases", "1", "--warmup-candidates", "1", "--candidates", "small", "--methods", "tile",
                 "--search-iters", "1", "--cost-terms", "tiles", "--no-progress", "--quiet", "--seeds", "0",
                 "--steps", "2", "--validate", "1"])  # (2 steps: the write that fails comes after the search)
    line = _error_line(capsys)
    assert code != 0 and "No space left on device" in line and str(out) in line, line
    assert not out.exists()


def test_a_forced_triton_backend_whose_variant_failed_is_one_line_naming_it_and_the_fix(tmp_path, capsys,
                                                                                         monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(selfcheck.ENV_FAULT, "block_sparse.triton.fwd")
    monkeypatch.setattr(selfcheck, "_MEMORY", {})
    monkeypatch.setattr(selfcheck, "_FAST", {})
    monkeypatch.setattr(selfcheck, "_LOADED", [])
    monkeypatch.setattr(selfcheck, "_WARNED", set())
    code = main(["generate", "--model", "tiny-wan", "--frames", "9", "--height", "64", "--width", "64", "--steps", "2",
                 "--quiet", "--method", "gna", "--kernel-size", "2,3,3", "--backend", "triton",
                 "--out", str(tmp_path / "v.mp4")])
    line = _error_line(capsys)
    assert code != 0 and "block_sparse.triton.fwd" in line and "auto" in line, line
    assert not (tmp_path / "v.mp4").exists()


def test_a_strategy_file_naming_layers_the_model_lacks_warns(tmp_path):
    import json

    import dit_accel
    from dit_accel.models.tiny import build_tiny_pipeline

    path = tmp_path / "strategy.json"
    path.write_text(json.dumps({f"0_{layer}_{h}": [1, 1, 1] for layer in range(5) for h in range(2)}))
    pipe = build_tiny_pipeline("tiny-wan")
    with pytest.warns(dit_accel.DitAccelWarning, match="names attention layers 2, 3, 4") as record:
        handle = dit_accel.apply(pipe, dit_accel.Tile.from_strategy(path, tile=(1, 2, 2)))
    handle.remove()
    (warning,) = [str(w.message) for w in record if "names attention layers" in str(w.message)]
    assert str(path) in warning and "\n" not in warning
    with pytest.warns(dit_accel.DitAccelWarning) as quiet:  # a strategy of this model: no such warning
        path.write_text(json.dumps({f"0_{layer}_{h}": [1, 1, 1] for layer in range(2) for h in range(2)}))
        dit_accel.apply(pipe, dit_accel.Tile.from_strategy(path, tile=(1, 2, 2))).remove()
        import warnings
        warnings.warn("sentinel", dit_accel.DitAccelWarning)
    assert not [w for w in quiet if "names attention layers" in str(w.message)]
