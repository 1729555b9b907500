"""Round 13, the command line: MagCache's calibration on stdout, hub ids read from their cached snapshot."""

from __future__ import annotations

import json

import pytest

import dit_accel
from dit_accel.cli.main import main


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dit-accel {command}"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- magcache:calibrate=true
def test_magcache_calibration_is_one_line_and_recorded_not_diffusers_print(tmp_path, capsys):
    """Before: Diffusers' MagCache printed its calibration onto stdout under --quiet, twice (once per guidance
    branch), as ``[MagCache] Calibration Complete. Copy these values to MagCacheConfig(mag_ratios=...):`` and a
    Python list no flag takes; the sidecar's ``cache`` kept no ratios."""
    out = tmp_path / "a.mp4"
    assert main(["generate", "--model", "tiny-wan", "--steps", "2", "--frames", "5", "--height", "32", "--width",
                 "32", "--cache", "magcache:calibrate=true", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[MagCache]" not in printed and "MagCacheConfig" not in printed
    measured = json.loads(out.with_name("a.mp4.json").read_text())["cache"]["mag_ratios_measured"]
    assert len(measured) == 2 and all(len(ratios) == 2 and ratios[0] == 1.0 for ratios in measured)
    line = next(line for line in printed.splitlines() if line.startswith("magcache calibration:"))
    given = line.split("--cache ")[1].split()[0]
    from dit_accel.pipelines.caches import CacheSpec

    spec = CacheSpec.parse(given)  # the line's advice is a --cache the command line takes
    assert spec.options["mag_ratios"] == pytest.approx(tuple(measured[0]), abs=1e-3)


def test_other_prints_during_a_magcache_calibration_are_passed_on(capsys):
    from dit_accel.cli.generate_report import magcache_ratios
    from dit_accel.pipelines.caches import CacheSpec

    found = []
    with magcache_ratios(CacheSpec.parse("magcache:calibrate=true"), found):
        print("a line of the pipeline's own")
        print("\n[MagCache] Calibration Complete. Copy these values to MagCacheConfig(mag_ratios=...):")
        print("[1.0, 0.5]\n")
    assert found == [[1.0, 0.5]]
    assert capsys.readouterr().out == "a line of the pipeline's own\n"


# ----------------------------------------------------------------------------- hub ids without hub words
def _cached_snapshot(tmp_path, monkeypatch, repo: str, pipeline: str, transformer: str):
    """A hub id's snapshot in a local Hugging Face cache, holding only its model_index.json."""
    cache = tmp_path / "hub"
    owner, name = repo.split("/")
    root = cache / f"models--{owner}--{name}"
    snapshot = root / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("a" * 40)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                           "transformer": ["diffusers", transformer]}))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def test_info_reads_a_cached_hub_id_that_names_no_family_from_its_snapshot(tmp_path, monkeypatch, capsys):
    """Before: ``info --model someone/renamed-flux`` (in the cache) was refused with a list of 60 class names."""
    _cached_snapshot(tmp_path, monkeypatch, "someone/renamed-model", "FluxPipeline", "FluxTransformer2DModel")
    assert main(["info", "--model", "someone/renamed-model", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_settings"]["transformer"] == "FluxTransformer2DModel"


def test_info_on_an_uncached_hub_id_naming_no_family_is_short(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert main(["info", "--model", "baidu/ERNIE-Image"]) == 2
    err = _one_line(capsys, "info")
    assert "WanTransformer3DModel" not in err and "huggingface-cli download baidu/ERNIE-Image" in err


def test_finetune_sizes_a_cached_image_model_as_an_image(tmp_path, monkeypatch):
    """Before: 81 frames at 480x832, refused after the load with ``--frames 81 is invalid for FLUX`` (no --frames
    was given)."""
    from dit_accel.cli.finetune import _size_defaults

    _cached_snapshot(tmp_path, monkeypatch, "someone/renamed-model", "FluxPipeline", "FluxTransformer2DModel")
    assert _size_defaults("someone/renamed-model")["frames"] == 1


def test_calibrate_refuses_a_tile_of_another_rank_for_a_cached_hub_id_before_loading(tmp_path, monkeypatch,
                                                                                     capsys):
    import dit_accel.models.loading as loading

    _cached_snapshot(tmp_path, monkeypatch, "someone/renamed-model", "FluxPipeline", "FluxTransformer2DModel")
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    assert main(["calibrate", "--model", "someone/renamed-model", "--prompts", str(prompts), "--steps", "2",
                 "--min-psnr", "20", "--tile", "2,2,2", "--out", str(tmp_path / "plan.json")]) == 2
    assert "has 2 dimensions" in _one_line(capsys, "calibrate")


# ----------------------------------------------------------------------------- bench sass --json
@pytest.mark.parametrize("kind", ["folder", "under_a_file", "empty"])
def test_bench_sass_checks_its_json_path_before_compiling(tmp_path, capsys, monkeypatch, kind):
    """Before: ``bench sass --json DIR`` compiled 593 kernels (an hour on two cores) and then failed to write."""
    from dit_accel.kernels import sass

    monkeypatch.setattr(sass, "report", lambda *a, **k: pytest.fail("compiled before the --json check"))
    monkeypatch.setattr(sass, "search", lambda *a, **k: pytest.fail("compiled before the --json check"))
    (tmp_path / "file").write_text("x")
    path = {"folder": str(tmp_path), "under_a_file": str(tmp_path / "file" / "sass.json"), "empty": ""}[kind]
    assert main(["bench", "sass", "--json", path]) == 2
    assert "--json" in _one_line(capsys, "bench sass")


# ----------------------------------------------------------------------------- --cp with a numbered device
def test_cp_refuses_a_numbered_device_it_would_replace(tmp_path, capsys, monkeypatch):
    """Before: under torchrun, ``--cp ulysses=2 --device cuda:1`` ran every rank on cuda:LOCAL_RANK, the given
    GPU dropped without a word (on a machine without CUDA it went on to the rendezvous first)."""
    import dit_accel.cli.parallel as parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(parallel, "_rendezvous", lambda world: pytest.fail("joined before the --device check"))
    assert main(["generate", "--model", "tiny-wan", "--cp", "ulysses=2", "--device", "cuda:1",
                 "--out", str(tmp_path / "a.mp4")]) == 2
    err = _one_line(capsys, "generate")
    assert "--device cuda:1" in err and "CUDA_VISIBLE_DEVICES" in err


# ----------------------------------------------------------------------------- eval --cache with no row to take it
@pytest.mark.parametrize("rows", [["--methods", "dense"], ["--stacks", "sla+fbcache"]], ids=["dense", "stacks"])
def test_eval_cache_with_no_row_to_stack_on_is_refused_before_loading(tmp_path, capsys, monkeypatch, rows):
    """Before: ``eval --methods dense --cache fbcache`` ran the dense rows only and exited 0: no row had the cache
    (the baseline stays uncached), and nothing said so."""
    import dit_accel.models.loading as loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["eval", "--model", "tiny-wan", *rows, "--cache", "taylorseer", "--prompt", "a fox",
                 "--out", str(tmp_path / "ev")]) == 2
    err = _one_line(capsys, "eval")
    assert "--cache taylorseer" in err and "--stacks dense+taylorseer" in err


def test_eval_cache_beside_a_method_row_is_taken(tmp_path, monkeypatch):
    from dit_accel.cli import eval as eval_cli

    parser = __import__("argparse").ArgumentParser()
    sub = parser.add_subparsers()
    eval_cli.register(sub)
    args = parser.parse_args(["eval", "--model", "tiny-wan", "--methods", "dense,sla", "--cache", "taylorseer",
                              "--prompt", "a fox", "--out", str(tmp_path / "ev")])
    assert [spec.label for spec in eval_cli._method_specs(args, tiny=True)] == ["sla+taylorseer"]


# ----------------------------------------------------------------------------- size advice within the rotary reach
@pytest.mark.parametrize("height", ["4100", "4112"], ids=["off-the-multiple", "on-the-multiple"])
def test_a_height_past_the_rotary_reach_is_refused_with_a_size_that_fits(tmp_path, capsys, monkeypatch, height):
    """Before: tiny-shapes (rope_max_seq_len 1024, patch 2, VAE 2x: 4096 at most) was told for --height 4100 "give
    --height 4096 or 4112", and 4112 was refused after the load as past the rotary reach."""
    import dit_accel.models.loading as loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "--model", "tiny-shapes", "--method", "dense", "--height", height,
                 "--out", str(tmp_path / "a.mp4")]) == 2
    err = _one_line(capsys, "generate")
    assert "give --height 4096 or less" in err and "4112 " not in err.split("give")[-1]


def test_finetune_takes_an_image_plans_size_which_records_no_frames(tmp_path):
    """calibrate's plan of an image model records height and width, no num_frames (its call takes none):
    ``finetune --plan`` sampled the model's default size then, and the plan made at its own size was refused."""
    from dit_accel.cli.finetune import _size_defaults
    from dit_accel.plans.sparse_plan import Phase, SparsePlan

    plan = SparsePlan([Phase(0, None, default=dit_accel.Tile(tile=(4, 4), window=(3, 3)))], num_layers=2,
                      num_heads=2, provenance={"grids": [[6, 6]], "steps": 2,
                                               "call": {"height": 96, "width": 96, "num_inference_steps": 2}})
    path = tmp_path / "plan.json"
    plan.save(path)
    sizes = _size_defaults("tiny-flux", str(path))
    assert (sizes["frames"], sizes["height"], sizes["width"]) == (1, 96, 96)
