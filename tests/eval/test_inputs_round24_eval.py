"""Round 24 of the eval inputs: `dit-accel eval` as users run it.

- ``--compare`` of two runs on different devices leaves the times out, and says why (before: a CPU run's and a GPU
  run's times were paired as if one change had made the difference);
- a dense entry of ``--method-config`` with options or a label of its own is a row (before: dropped without a word);
  a method row labelled like a dense row is labelled apart;
- ``run_eval`` from Python refuses specs that are not MethodSpec rows, rows of one label and a row labelled like the
  baseline, before the model loads (before: an AttributeError after the dense rows had run, or two rows paired as
  one);
- a dense cache entry timed cold (the first generation of a ``--warmup 0`` run) is timed again by a run with
  warm-up (before: its start-up costs went into every speedup of the later run).
"""
import json
import types

import numpy as np
import pytest


# ------------------------------------------------------------------ --compare of runs on two devices
def _results(device, times):
    from dit_accel.eval.provenance import prompts_sha256

    prompts = ["a cat", "a dog"]
    samples = [{"prompt": p, "seed": 0, "psnr": 30.0 + i, "time_total": t, "time_transformer": t / 2}
               for i, (p, t) in enumerate(zip(prompts, times))]
    return {"settings": {"model": "tiny-wan", "prompts": prompts, "seeds": [0], "device": device.split(":")[0]},
            "provenance": {"prompts_sha256": prompts_sha256(prompts), "device": device},
            "rows": [{"label": "tile", "samples": samples}]}


def test_compare_of_runs_on_two_devices_leaves_the_times_out_and_says_why():
    from dit_accel.eval.compare import compare_results, unpaired_rows

    a = _results("cpu: Intel(R) Xeon(R)", [2.0, 2.2])
    b = _results("cuda: NVIDIA H100 80GB HBM3 (sm_90)", [0.1, 0.12])
    assert {c["metric"] for c in compare_results(a, b)} == {"psnr"}
    (line,) = unpaired_rows(a, b)
    assert "A ran on cpu: Intel(R) Xeon(R), B on cuda: NVIDIA H100" in line and "time_total" in line
    assert "compare the times of two runs on one device" in line
    same = _results("cpu: Intel(R) Xeon(R)", [2.1, 2.3])  # one device: the times are compared, nothing said
    assert {c["metric"] for c in compare_results(a, same)} == {"psnr", "time_total", "time_transformer"}
    assert unpaired_rows(a, same) == []


# ------------------------------------------------------------------ --method-config: dense rows and reserved labels
def _config(tmp_path, obj):
    path = tmp_path / "methods.json"
    path.write_text(json.dumps(obj))
    return str(path)


def test_a_dense_config_entry_with_options_or_its_own_label_is_a_row(tmp_path):
    from dit_accel.eval.runner import load_method_specs

    cfg = _config(tmp_path, [{"method": "dense"}, {"method": "dense", "label": "dense-again"},
                             {"method": "dense", "label": "dense-from-step-1", "dense_steps": 1}])
    specs = load_method_specs(None, cfg)
    assert [s.label for s in specs] == ["dense-again", "dense-from-step-1"]
    assert specs[1].apply_kwargs == {"dense_steps": 1} and type(specs[1].method).__name__ == "Dense"
    # the dict form: {} (or nothing) is the baseline; an option that is no mapping is named, not dropped
    assert load_method_specs(["dense", "tile"], _config(tmp_path, {"dense": {}, "tile": {}}))[0].label == "tile"
    with pytest.raises(ValueError, match="dense: expected a mapping of options, got 5"):
        load_method_specs(None, _config(tmp_path, {"dense": 5}))


def test_a_config_row_labelled_like_a_dense_row_is_labelled_apart(tmp_path):
    from dit_accel.eval.runner import load_method_specs

    cfg = _config(tmp_path, [{"method": "tile", "label": "dense"}, {"method": "tile", "label": "dense~seed"}])
    assert [s.label for s in load_method_specs(None, cfg)] == ["dense'", "dense~seed'"]


# ------------------------------------------------------------------ run_eval's arguments from Python
def _settings(**kw):
    from dit_accel.eval.runner import EvalSettings

    return EvalSettings(**{"model": "fake", "prompts": ["a cat"], "seeds": [0], "frames": 2, "height": 8,
                           "width": 8, "steps": 1, "warmup": 0, **kw})


class _NoPipe:
    """Fails the test if run_eval gets as far as generating."""

    def __getattr__(self, name):
        raise AssertionError(f"run_eval went on to use the pipeline ({name})")


@pytest.mark.parametrize("specs, message", [
    ("tile", r"specs='tile' is invalid: run_eval takes a list of MethodSpec rows, e.g. load_method_specs"),
    ("names", r"specs\[0\] is str 'tile', not a MethodSpec: MethodSpec.parse\(name, options\) builds one"),
    ("method", r"specs\[0\] is Tile .*, not a MethodSpec: MethodSpec\('tile', specs\[0\]\) wraps it"),
    ("twice", r"specs\[0\] and specs\[1\] are both labelled 'tile'; give each row its own label"),
    ("dense", r"specs\[0\] is labelled 'dense', the label of a dense row run_eval adds itself"),
], ids=["a-name", "a-list-of-names", "a-method-config", "one-label-twice", "the-baseline-label"])
def test_run_eval_refuses_specs_it_cannot_label_before_the_model_loads(tmp_path, specs, message):
    import dit_accel
    from dit_accel.eval.runner import MethodSpec, run_eval

    tile = {"tile": (1, 2, 2), "window": (1, 1, 1)}
    specs = {"names": ["tile"], "method": [dit_accel.Tile(**tile)], "twice": [MethodSpec.parse("tile", tile)] * 2,
             "dense": [MethodSpec.parse("tile", tile, label="dense")]}.get(specs, specs)
    with pytest.raises(ValueError, match=message):
        run_eval(_settings(), specs, tmp_path / "out", pipe=_NoPipe(), log=lambda *a: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings, out, message", [
    ({"model": "tiny-wan", "prompts": ["a cat"]}, "out", r"settings=\{'model'.* is invalid: run_eval takes an "
                                                         r"EvalSettings, e.g. EvalSettings\(model="),
    (None, None, r"out_dir=None is invalid: give the folder .* that results.json"),
], ids=["settings-a-dict", "out-dir-none"])
def test_run_eval_refuses_settings_or_out_dir_of_another_kind(tmp_path, settings, out, message):
    from dit_accel.eval.runner import run_eval

    settings = settings if settings is not None else _settings()
    with pytest.raises(ValueError, match=message):
        run_eval(settings, [], out if out is None else tmp_path / out, pipe=_NoPipe(), log=lambda *a: None)


# ------------------------------------------------------------------ dense cache entries timed cold
class _Pipe:
    """Frames of one grey level per prompt and seed (no model), counting its calls."""

    def __init__(self):
        self.calls = 0

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, generator=None, output_type="np", num_frames=2, height=8, width=8,
                 num_inference_steps=1):
        self.calls += 1
        level = (len(prompt) * 7 + generator.initial_seed()) % 10 / 10
        return types.SimpleNamespace(frames=np.full((1, num_frames, height, width, 3), level, np.float32))


def _dense(settings, samples, cache, lines):
    from dit_accel.eval.runner import _dense_row
    from dit_accel.eval.timing import StageTimer

    pipe = _Pipe()
    with StageTimer(pipe, "cpu") as timer:
        row, generated = _dense_row(pipe, timer, settings, samples, cache, lines.append, model_sha256="state:fake")
    return row, generated, pipe.calls


def test_a_dense_entry_timed_without_warm_up_is_timed_again_by_a_run_with_warm_up(tmp_path):
    """The first generation of a ``--warmup 0`` run carries the start-up costs (lazy init, CUDA autotune); a later
    run with warm-up took its time as the dense baseline's, so every speedup came out too large."""
    samples = [("a cat", 0), ("a red dog", 0)]
    lines = []
    _, generated, _ = _dense(_settings(prompts=["a cat", "a red dog"], warmup=0), samples, tmp_path, lines)
    assert generated == 2
    cold = [bool(np.load(p)["cold"]) for p in sorted(tmp_path.glob("dense_*.npz"), key=lambda p: p.stat().st_mtime_ns)]
    assert cold == [True, False]  # only the first sample was timed cold
    warm = _settings(prompts=["a cat", "a red dog"], warmup=1)
    row, generated, calls = _dense(warm, samples, tmp_path, lines)
    assert (generated, calls) == (1, 2)  # the cold one again (after one warm-up); the other from the cache
    assert any("was timed without a warm-up (--warmup 0); generated again" in str(line) for line in lines)
    assert not any(bool(np.load(p)["cold"]) for p in tmp_path.glob("dense_*.npz"))
    _, generated, calls = _dense(warm, samples, tmp_path, lines)
    assert (generated, calls) == (0, 0)  # now warm: reused
    _, generated, _ = _dense(_settings(prompts=["a cat", "a red dog"], warmup=0), samples, tmp_path, lines)
    assert generated == 0  # a --warmup 0 run reuses warm entries
    assert all(isinstance(v, np.ndarray) and v.dtype == np.uint8 for v in row["videos"])


def test_a_dense_entry_of_an_earlier_version_without_the_cold_flag_is_reused(tmp_path):
    from dit_accel.eval.runner import _read_dense_entry

    path = tmp_path / "dense_0123.npz"
    np.savez_compressed(path, frames=np.zeros((2, 8, 8, 3), np.uint8), times=json.dumps({"total": 1.0}))
    frames, times, cold = _read_dense_entry(path)
    assert frames.shape == (2, 8, 8, 3) and times == {"total": 1.0} and cold is False


# ------------------------------------------------------------------ a label that is no text
@pytest.mark.parametrize("label", [1, ["x"], "  "], ids=["a-yaml-number", "a-list", "blank"])
def test_a_config_label_that_is_no_text_is_refused_naming_the_row(tmp_path, label):
    """Before: YAML's ``label: 1`` (an int) ran as the row's label, and results.json was then refused by
    ``load_results`` ("row 3 has no label"); two such rows were a TypeError ("unsupported operand type(s) for +=")."""
    from dit_accel.eval.runner import load_method_specs

    cfg = _config(tmp_path, [{"method": "tile", "label": label}])
    with pytest.raises(ValueError, match=r"--method-config .*methods.json: tile: label=.* is invalid: expected a "
                                         r"non-empty text such as 'tile-small' \(in YAML, quote a number"):
        load_method_specs(None, cfg)


# ------------------------------------------------------------------ temporal error of videos of other lengths
def test_temporal_error_of_videos_of_other_lengths_says_which_and_what_to_do():
    from dit_accel.eval.temporal import temporal_report

    video = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"frame shapes differ: method \(3, 3, 8, 8\) vs dense \(2, 3, 8, 8\); "
                                         r"generate both with the same --frames"):
        temporal_report(video, video[:2])


# ------------------------------------------------------------------ a dense cache entry of another frame count
def test_a_dense_cache_entry_of_another_frame_count_is_named_and_removed(tmp_path):
    """Before: an entry replaced by one of 3 frames (where this run makes 5) passed the size check and the run ended,
    after every row had been generated, in "frame shapes differ ... generate both with the same --frames", which
    they had; the entry stayed, so every rerun ended so too. (run_eval checks the dense row against its method rows'
    videos so before scoring; a fake cache here, as a tiny model's two runs take seconds.)"""
    from dit_accel.eval.runner_checks import check_dense_shapes

    paths = [tmp_path / "dense_a.npz", tmp_path / "dense_b.npz"]
    for path in paths:
        path.write_bytes(b"entry")
    good, short = np.zeros((5, 8, 8, 3), np.uint8), np.zeros((3, 8, 8, 3), np.uint8)
    check_dense_shapes([good, good], [good], paths.__getitem__)  # one shape: nothing said
    check_dense_shapes([good, short], [], paths.__getitem__)  # no method row made a video: nothing to tell by
    with pytest.raises(ValueError, match=r"dense cache entry .*dense_b.npz holds frames \(3, 8, 8, 3\) .* but this "
                                         r"run's videos are \(5, 8, 8, 3\) .*it is removed; run the eval again"):
        check_dense_shapes([good, short], [good, good], paths.__getitem__)
    assert paths[0].exists() and not paths[1].exists()
