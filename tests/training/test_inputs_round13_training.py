"""Round 13 of the input audit: fine-tuning, weights folders and calibration (the Python API the CLIs call).

Calibration cases stop at the model loader (they are about what is refused before a run of minutes), so they
cost no generation."""

import re

import pytest

from dit_accel.calibrate import CalibrationSettings, calibrate
from dit_accel.models import loading

PROMPTS = ["a red circle moving right", "a blue square moving left"]


def _settings(**kw):
    return CalibrationSettings(**{**dict(model="tiny-shapes", prompts=PROMPTS, min_psnr=25, steps=2, seeds=[0]), **kw})


@pytest.fixture
def no_model(monkeypatch):
    """The model loader refuses: a test passes only if the input was refused before any model loaded."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


# ---------------------------------------------------------------- calibrate: where the plan and report go
@pytest.mark.parametrize("name", ["calibration.json", "report.md"])
def test_a_plan_inside_its_report_folder_under_a_report_name_is_refused(name, tmp_path, no_model):
    """Before: out=REPORT/calibration.json with report_dir=REPORT ran the whole calibration (134 s on tiny-shapes)
    and wrote calibration.json over the plan, silently: the returned run said the plan was written, and
    SparsePlan.load of the file said it was no plan."""
    with pytest.raises(ValueError, match="overlap: the plan and the report files"):
        calibrate(_settings(), tmp_path / "rep" / name, report_dir=tmp_path / "rep", progress=False,
                  log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["out-folder", "out-under-file", "report-dir-file", "report-dir-is-out"])
def test_outputs_that_cannot_be_written_are_refused_before_the_model_loads(case, tmp_path, no_model):
    """Before: each of these ran the dense run, the search and the validation, then failed writing (a folder as
    the plan: IsADirectoryError of a temporary name)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    out, report_dir, says = {
        "out-folder": (tmp_path / "folder", None, "out: path=.* is a folder"),
        "out-under-file": (tmp_path / "afile" / "plan.json", None, "afile is a file, not a folder"),
        "report-dir-file": (tmp_path / "plan.json", tmp_path / "afile", "report_dir=.* is a file"),
        "report-dir-is-out": (tmp_path / "plan.json", tmp_path / "plan.json", "overlap"),
    }[case]
    with pytest.raises(ValueError, match=says):
        calibrate(_settings(), out, report_dir=report_dir, progress=False, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]


@pytest.mark.parametrize("change, says", [
    ({"max_layer_error": "0.1"}, r"--max-layer-error must be a finite number > 0 .*got '0.1'"),
    ({"baseline": "no"}, r"baseline='no' is invalid: True or False"),
    ({"extend_seeds": "no"}, r"extend_seeds='no' is invalid: True or False"),
], ids=["max-layer-error-str", "baseline-str", "extend-seeds-str"])
def test_settings_of_the_wrong_kind_are_refused_by_name(change, says, tmp_path, no_model):
    """Before: a string layer error was TypeError "'>' not supported between instances of 'str' and 'int'";
    baseline="no" and extend_seeds="no" are truthy: the baseline ran and seeds were added, without a word."""
    with pytest.raises(ValueError, match=says):
        calibrate(_settings(**change), tmp_path / "plan.json", progress=False, log=lambda m: None)


def test_a_capture_folder_that_is_a_file_or_holds_captures_is_refused_before_the_model_loads(tmp_path, no_model):
    """Before: a file was a FileExistsError in the middle of the dense run (22 s in, on tiny-shapes); a folder of
    another run's captures got this run's files mixed in, silently (`dit-accel calibrate --capture` refused both)."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        calibrate(_settings(capture_dir=str(tmp_path / "afile")), tmp_path / "plan.json", progress=False,
                  log=lambda m: None)
    held = tmp_path / "captures"
    held.mkdir()
    (held / "layer000_step000.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="already holds 1 capture file"):
        calibrate(_settings(capture_dir=str(held)), tmp_path / "plan.json", progress=False, log=lambda m: None)


def test_good_outputs_reach_the_model_loader(tmp_path, monkeypatch):
    seen = []

    def stop(model, **k):
        seen.append(model)
        raise loading.ModelLoadError("stopped in the test")

    monkeypatch.setattr(loading, "load_pipeline", stop)
    (tmp_path / "captures").mkdir()
    for out, report_dir in ((tmp_path / "plan.json", None), (tmp_path / "plans" / "a.json", tmp_path / "reports"),
                            (tmp_path / "report" / "plan.json", tmp_path / "report")):
        with pytest.raises(loading.ModelLoadError):
            calibrate(_settings(capture_dir=str(tmp_path / "captures"), baseline=False), out, report_dir=report_dir,
                      progress=False, log=lambda m: None)
    assert seen == ["tiny-shapes"] * 3


class _ImagePipeline:
    """A stand-in for an image pipeline (FLUX, SD3, ...): its ``__call__`` takes no ``num_frames``."""

    def __call__(self, prompt=None, height=None, width=None, num_inference_steps=None, guidance_scale=None,
                 max_sequence_length=None, generator=None, output_type=None, callback_on_step_end=None):
        raise AssertionError("not called in the test")

    def set_progress_bar_config(self, **kw):
        pass


@pytest.mark.parametrize("frames, says", [(None, None), (5, r"--frames 5: _ImagePipeline takes no num_frames "
                                                            r"\(it makes images\); drop it")], ids=["default", "five"])
def test_an_image_model_is_called_without_num_frames(frames, says, tmp_path, monkeypatch):
    """Before: every image model failed when the dense run began (tiny-flux after 28 s), with FluxPipeline.__call__'s
    TypeError "got an unexpected keyword argument 'num_frames'" (the tiny image models' default size is one frame;
    the CLI printed the traceback); a --frames the pipeline cannot take is now refused by name."""
    from dit_accel.calibrate import run

    seen = []

    def dense_run(pipe, settings, jobs, call_kwargs, bar):
        seen.append(call_kwargs)
        raise KeyboardInterrupt  # (stops the run here)

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: _ImagePipeline())
    monkeypatch.setattr(run, "_dense_run", dense_run)
    settings = _settings(model="tiny-flux", prompts=["a cat", "a dog"], frames=frames, steps=None)
    if says is None:
        with pytest.raises(KeyboardInterrupt):
            calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
        assert seen and "num_frames" not in seen[0] and seen[0]["height"] == 64
    else:
        with pytest.raises(ValueError, match=says):
            calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
        assert not seen


def test_video_only_methods_on_an_image_model_are_refused_before_it_loads(tmp_path, no_model):
    """Before: calibrate(tiny-flux, methods=("vsa",)) ran 80 s to a plan that is dense everywhere ("allocation,
    lambda 0", candidates: dense alone) and wrote it without a word."""
    with pytest.raises(ValueError, match=r"--methods vsa: tiny-flux makes images .*could only be dense"):
        calibrate(_settings(model="tiny-flux", prompts=["a cat", "a dog"], steps=None, methods=("vsa",)),
                  tmp_path / "plan.json", progress=False, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


class _VideoPipeline(_ImagePipeline):
    def __call__(self, prompt=None, num_frames=None, height=None, width=None, num_inference_steps=None,
                 guidance_scale=None, max_sequence_length=None, generator=None, output_type=None,
                 callback_on_step_end=None):
        raise AssertionError("not called in the test")


@pytest.mark.parametrize("grid, methods, says", [
    ((16, 16), ("radial",), r"radial has candidates on video grids only"),
    ((1, 2, 2), ("tile", "sla"), r"each candidate runs dense there"),
], ids=["image-grid-radial", "tiny-video-grid"])
def test_a_grid_where_no_candidate_is_sparse_is_said_before_the_search(grid, methods, says, tmp_path, monkeypatch):
    """The grid is known once the dense run has sampled it: where no candidate is sparse there, the calibration now
    says so before the scoring and the search. Before, it searched, verified and wrote a plan dense everywhere
    ("allocation, lambda 0"), saying nothing of why."""
    from dit_accel.calibrate import run

    def dense_run(pipe, settings, jobs, call_kwargs, bar):
        return run._DenseRun(sampler=None, buckets=[(0, 2)], layers=1, videos=[], attention_ms=None,
                             transformer=None, timesteps=[], replay=None, heads=1, head_dim=32, grid=grid)

    def searched(*a, **k):
        raise KeyboardInterrupt  # (stops the run at the search)

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: _VideoPipeline())
    monkeypatch.setattr(run, "_dense_run", dense_run)
    monkeypatch.setattr(run, "search_space", searched)
    said = []
    with pytest.raises(KeyboardInterrupt):
        calibrate(_settings(methods=methods, search="warmup"), tmp_path / "plan.json", progress=False, log=said.append)
    note = [m for m in said if "no candidate is sparse" in m]
    assert len(note) == 1 and re.search(rf"token grid {re.escape(str(grid))} .*{says}.*the plan is dense", note[0])
