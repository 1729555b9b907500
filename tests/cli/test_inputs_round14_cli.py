"""Round 14, the command line: a failed run leaves the earlier run's files as they were."""

from __future__ import annotations

import json

import pytest

from dit_accel.cli.main import main

_TINY = ["--model", "tiny-wan", "--steps", "2", "--frames", "5", "--height", "32", "--width", "32", "--quiet"]


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _earlier_run(out) -> dict:
    """An earlier run's video and sidecar at ``out`` (their bytes stand for them)."""
    out.write_bytes(b"the earlier video")
    out.with_name(out.name + ".json").write_text(json.dumps({"output": str(out), "output_shape": [5, 32, 32, 3]}))
    return _files(out.parent)


# ----------------------------------------------------------------------------- generate: record before files
def test_generate_whose_record_fails_leaves_the_earlier_video_and_sidecar(tmp_path, monkeypatch):
    """Before: the video was written first and the record built after it, so a failure in the record (its
    ground-truth scores, provenance) left the new video with the earlier sidecar deleted and none in its place."""
    import dit_accel.cli.generate as generate

    out = tmp_path / "a.mp4"
    before = _earlier_run(out)

    def fail(*args, **kwargs):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(generate, "_quality", fail)
    with pytest.raises(RuntimeError, match="scoring failed"):
        main(["generate", *_TINY, "--seed", "2", "--out", str(out)])
    assert _files(tmp_path) == before


# ----------------------------------------------------------------------------- eval --stacks
def _stack_rows(text: str, model: str = "tiny-wan"):
    from dit_accel.cli.eval import _stacks
    from dit_accel.models.tiny import TINY_METHOD_DEFAULTS

    return _stacks(text, TINY_METHOD_DEFAULTS[model])


def test_stacks_take_the_method_options_their_label_names():
    """Before: everything after the method's ':' was dropped, so the row labelled ``sla:topk=0.1+fbcache`` ran the
    tiny model's top-k 0.4 (measured), and ``tile:window=1/1/1`` its window (3, 1, 1)."""
    sla, tile = _stack_rows("sla:topk=0.1+fbcache,tile:tile=1/4/4;window=1/1/1")
    assert (sla.label, sla.method.topk, sla.cache.name) == ("sla:topk=0.1+fbcache", 0.1, "fbcache")
    assert (tile.method.tile, tile.method.window) == ((1, 4, 4), (1, 1, 1))


def test_a_stack_named_by_an_alias_takes_the_tiny_models_grid_sized_options():
    """Before: ``--stacks sta`` on tiny-wan took the paper's tile (6, 8, 8), not the (1, 8, 8) of ``--methods sta``."""
    (row,) = _stack_rows("sta")
    assert row.method.tile == (1, 8, 8)


@pytest.mark.parametrize("stacks, said", [("tile+", "a name on each side of '+'"),
                                          ("+fbcache", "a name on each side of '+'"),
                                          ("", "names no stack"), (" , ", "names no stack"),
                                          ("sla:topk", "is not key=value"), ("sla:bogus=1", "has no option 'bogus'"),
                                          ("sla:topk=0.1;topk=0.2", "given twice")])
def test_malformed_stacks_are_refused_before_loading(tmp_path, capsys, stacks, said):
    """Before: ``tile+`` ran tile alone under the label ``tile+``; an empty ``--stacks`` ran the default methods,
    exit 0; ``sla:bogus=1`` ran SLA's defaults."""
    assert main(["eval", "--model", "tiny-wan", "--out", str(tmp_path / "e"), "--stacks", stacks]) == 2
    assert said in _one_line(capsys, "eval")
    assert not (tmp_path / "e").exists()


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dit-accel {command}"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- eval: a failed run's folders
def test_an_eval_that_fails_leaves_no_empty_folders_it_made(tmp_path, capsys, monkeypatch):
    """Before: ``--out`` and its ``cache/`` (and their missing parents) were made before the model loaded and left
    behind, empty, when the run failed."""
    import dit_accel.models.loading as loading

    def fail(*args, **kwargs):
        raise loading.ModelLoadError("the model would not load")

    monkeypatch.setattr(loading, "load_pipeline", fail)
    out = tmp_path / "new" / "eval"
    assert main(["eval", "--model", "tiny-wan", "--methods", "tile", "--out", str(out)]) == 2
    assert "the model would not load" in _one_line(capsys, "eval")
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"  # a folder that was there stays, with what it held
    (kept / "cache").mkdir(parents=True)
    (kept / "results.json").write_text("{}")
    assert main(["eval", "--model", "tiny-wan", "--methods", "tile", "--out", str(kept)]) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["cache", "results.json"]


# ----------------------------------------------------------------------------- eval --methods
@pytest.mark.parametrize("methods", ["tile,tile", "sta,STA", "tile,gna,sta"])
def test_a_method_named_twice_is_refused_not_run_again_as_another_row(tmp_path, capsys, methods):
    """Before: the second name ran the same config again as a row labelled ``tile'``, as if another config."""
    assert main(["eval", "--model", "tiny-wan", "--out", str(tmp_path / "e"), "--methods", methods]) == 2
    assert "more than once" in _one_line(capsys, "eval")
