"""Bad input at public boundaries gives a clear error naming the argument (review findings).

Each test here pins one defect found by using the API the way users of
FlashAttention / NATTEN / torchmetrics would: a raw ZeroDivisionError, a
broadcasting RuntimeError or a silently wrong result before the fix.
"""

import numpy as np
import pytest
import torch

from dit_accel.eval.metrics import psnr_per_frame, to_frames
from dit_accel.kernels import BlockLayout, dense_attention_reference, merge_attention
from dit_accel.patterns import TilePermutation


def _mask(n=70):
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= 5


# ------------------------------------------------------------ BlockLayout
@pytest.mark.parametrize("kwargs, name", [
    ({"block_q": 0}, "block_q"), ({"block_q": -1}, "block_q"), ({"block_k": 0}, "block_k"),
    ({"block_q": 64.0}, "block_q"), ({"block_k": True}, "block_k"),
], ids=["bq0", "bq-1", "bk0", "bq-float", "bk-bool"])
def test_from_dense_mask_rejects_bad_block_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockLayout.from_dense_mask(_mask(), **kwargs)


def test_from_dense_mask_rejects_non_tensor_and_empty():
    with pytest.raises(TypeError, match="torch bool tensor"):
        BlockLayout.from_dense_mask(_mask().numpy())
    with pytest.raises(ValueError, match="empty"):
        BlockLayout.from_dense_mask(torch.ones(0, 0, dtype=torch.bool))


def test_from_block_masks_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_k"):
        BlockLayout.from_block_masks(torch.ones(2, 2, dtype=torch.bool), q_len=100, kv_len=100, block_q=64,
                                     block_k=0)


# ---------------------------------------------------------- reference, merge
def test_reference_rejects_mask_of_other_shape():
    q = torch.randn(1, 2, 70, 16)
    with pytest.raises(ValueError, match=r"mask must be \[N, M\] = \[70, 70\]"):
        dense_attention_reference(q, q, q, mask=torch.ones(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="H in"):
        dense_attention_reference(q, q, q, mask=torch.ones(3, 70, 70, dtype=torch.bool))
    with pytest.raises(ValueError, match="k and v"):
        dense_attention_reference(q, q[..., :8], q)


def test_merge_rejects_non_tensors_and_integer_outputs():
    o = torch.randn(1, 2, 5, 8)
    lse = torch.randn(1, 2, 5)
    with pytest.raises(TypeError, match="o_a must be a torch.Tensor"):
        merge_attention(o.numpy(), lse, o, lse)
    # Before: an int o_a silently truncated the merged output to integers.
    with pytest.raises(TypeError, match="o_a must be a floating-point"):
        merge_attention(o.long(), lse, o, lse)
    with pytest.raises(TypeError, match="lse_b must be a floating-point"):
        merge_attention(o, lse, o, lse.long())


# ------------------------------------------------------------ permutation
@pytest.mark.parametrize("grid, tile", [((4, 8, 8), (2, 4, 4)), ((3, 5, 7), (2, 4, 4))], ids=["divisible", "padded"])
def test_permute_matches_brute_force_order(grid, tile):
    perm = TilePermutation(grid, tile)
    n = perm.num_tokens
    x = torch.randn(2, 3, n, 4)
    y = perm.permute(x)
    # Independent definition: position p holds raster token order[p], zeros where order is -1.
    want = torch.zeros(2, 3, perm.num_padded, 4)
    for p, r in enumerate(perm.order.tolist()):
        if r >= 0:
            want[:, :, p] = x[:, :, r]
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(perm.unpermute(y), x, rtol=0, atol=0)


# ----------------------------------------------------------------- metrics
def test_to_frames_rejects_float_video_in_other_ranges():
    video = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"Divide 0-255 frames by 255"):
        to_frames(video * 255.0)  # before: clamped to 1 everywhere, a silently wrong PSNR
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        psnr_per_frame(video * 2 - 1, video)
    with pytest.raises(TypeError, match="uint8"):
        to_frames(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    # Rounding overshoot is still accepted and clamped.
    assert float(to_frames(video * 1.001).max()) <= 1.0


# ------------------------------------------------------------- bench CLI
@pytest.mark.parametrize("argv, expected", [
    (["--shapes", "nosuchmodel"], "matches none"),
    (["--backends", "cuda"], "choose from"),
    (["--repeats", "0"], "--repeats must be >= 1"),  # before: statistics.StatisticsError traceback
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--densities", "abc"], "--densities must be"),
    (["--device", "mps"], "--device mps: dit-accel runs this on cpu or cuda"),  # before: a raw RuntimeError
], ids=["shapes", "backends", "repeats", "warmup", "densities", "device"])
def test_bench_kernels_rejects_bad_flags_before_running(argv, expected, capsys):
    from dit_accel.cli.main import main

    assert main(["bench", "kernels", "--device", "cpu", "--quick", "--no-sla", *argv]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--backend", "cuda"], "--backend cuda"), (["--device", "mps"], "runs this on cpu or cuda"),
    (["--density", "2"], "--density must be in (0, 1]"), (["--max-files", "0"], "--max-files must be >= 1"),
], ids=["backend", "device", "density", "max-files"])
def test_bench_fidelity_rejects_bad_flags(argv, expected, tmp_path, capsys):
    from dit_accel.cli.main import main

    assert main(["bench", "fidelity", "--capture", str(tmp_path), *argv]) == 2
    assert expected in capsys.readouterr().err


# -------------------------------------------------------------- eval CLI
@pytest.mark.parametrize("argv, expected", [
    (["--frames", "0"], "--frames must be an integer >= 1"), (["--steps", "-2"], "--steps must be an integer >= 1"),
    (["--device", "mps"], "--device mps"), (["--prompts", "/nonexistent/prompts.txt"], "--prompts"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--repeats", "0"], "--repeats must be >= 1 (timed generations per row); got 0"),  # (not a model default)
], ids=["frames", "steps", "device", "prompts-file", "warmup", "repeats"])
def test_eval_rejects_bad_flags_with_one_line(argv, expected, tmp_path, capsys):
    from dit_accel.cli.main import main

    assert main(["eval", "--model", "tiny-wan", "--methods", "dense", "--out", str(tmp_path / "o"), *argv]) == 2
    assert expected in capsys.readouterr().err


def test_eval_tiny_model_uses_smoke_run_sizes_and_grid_sized_methods(tmp_path, monkeypatch):
    """README: `dit-accel eval --model tiny-wan --methods dense,gna,radial,tile ...` with no sizes.

    Before: the pipeline defaults (Wan: 81 frames at 480x832, 50 steps) ran for hours on a CPU,
    and GNA's default kernel 7 failed on tiny-wan's (5, 8, 8) grid."""
    from dit_accel.cli.main import main
    from dit_accel.eval import runner
    from dit_accel.methods import GNA
    from dit_accel.models.tiny import TINY_DEFAULTS, TINY_METHOD_DEFAULTS

    seen = {}

    def fake_run_eval(settings, specs, out, **kwargs):
        seen.update(settings=settings, specs=specs)
        raise ValueError("stop before generating")

    monkeypatch.setattr(runner, "run_eval", fake_run_eval)
    assert main(["eval", "--model", "tiny-wan", "--methods", "dense,gna,tile", "--frames", "9",
                 "--out", str(tmp_path)]) == 2
    s, want = seen["settings"], TINY_DEFAULTS["tiny-wan"]
    assert (s.frames, s.height, s.width, s.steps) == (9, want["height"], want["width"], want["num_inference_steps"])
    gna = {spec.label: spec.method for spec in seen["specs"]}["gna"]
    assert gna == GNA(**TINY_METHOD_DEFAULTS["tiny-wan"]["gna"])


def test_method_config_entries_override_defaults(tmp_path):
    from dit_accel.eval.runner import load_method_specs
    from dit_accel.methods import GNA

    cfg = tmp_path / "m.json"
    cfg.write_text('{"gna": {"kernel_size": [3, 4, 4]}}')
    defaults = {"gna": {"kernel_size": (3, 6, 6)}, "tile": {"tile": (1, 8, 8), "window": (3, 1, 1)}}
    specs = {s.label: s.method for s in load_method_specs(["gna", "tile"], str(cfg), defaults=defaults)}
    assert specs["gna"] == GNA(kernel_size=(3, 4, 4))
    assert specs["tile"].tile == (1, 8, 8)


# ------------------------------------------------------ tiny-model defaults
@pytest.mark.parametrize("model, grid", [("tiny-wan", (5, 8, 8)), ("tiny-flux", (16, 16)), ("tiny-shapes", (4, 12, 12))],
                         ids=["wan", "flux", "shapes"])
def test_tiny_method_defaults_are_sparse_on_their_grid(model, grid):
    """A sparse method's smoke-run default must actually skip blocks (tiny-flux GNA visited 100%)."""
    from dit_accel.methods import method_from_name
    from dit_accel.models.tiny import TINY_METHOD_DEFAULTS

    for name, options in TINY_METHOD_DEFAULTS[model].items():
        plan = method_from_name(name, **options).plan(grid)
        if plan.kind == "layout":
            assert plan.density < 1.0, (name, options, plan.density)
        else:
            assert plan.kind == "sla", (name, plan.kind)


def test_stats_reads_device_densities_in_one_batch():
    from dit_accel.pipelines.stats import as_floats as _as_floats

    values = [0.5, None, torch.tensor(0.25), torch.tensor([0.75]), 1]
    assert sorted(_as_floats(values)) == [0.25, 0.5, 0.75, 1.0]
    assert _as_floats([]) == []


def test_backend_availability_names_bad_and_missing_devices(capsys):
    from dit_accel.cli.main import main
    from dit_accel.kernels import available_backends

    with pytest.raises(ValueError, match="not a torch device"):
        available_backends("banana")  # before: torch's RuntimeError listing every device type
    if not torch.cuda.is_available():
        assert available_backends("cuda")["flex"] is not None  # before: "usable" on a CPU-only machine
    assert main(["info", "--device", "banana"]) == 2
    assert "--device banana is not a torch device" in capsys.readouterr().err


def test_save_video_rejects_float_frames_in_other_ranges(tmp_path):
    from dit_accel.io import load_video, save_video

    frames = np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="Divide 0-255"):
        save_video(frames * 255.0, tmp_path / "a.gif")  # before: written as an all-white video
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        save_video(frames * 2 - 1, tmp_path / "b.gif")
    save_video(frames, tmp_path / "c.gif")
    assert load_video(tmp_path / "c.gif").shape == (3, 16, 16, 3)


def test_apply_checks_the_capture_folder_before_any_forward(tmp_path):
    """Before: FileExistsError / TypeError from os.makedirs in the middle of the first attention call."""
    import dit_accel
    from dit_accel.models.tiny import build_tiny_transformer as build

    transformer = build("wan")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        dit_accel.apply(transformer, dit_accel.Dense(), capture=a_file)
    with pytest.raises(TypeError, match="capture must be a folder path"):
        dit_accel.apply(transformer, dit_accel.Dense(), capture=123)
    for unusable in ("", "caps\x00"):  # before: os's bare "embedded null byte" for the NUL
        with pytest.raises(ValueError, match="capture=.*not a usable folder path"):
            dit_accel.apply(transformer, dit_accel.Dense(), capture=unusable)
    assert not any(type(m.processor).__name__ == "SparseAttnProcessor"
                   for m in transformer.modules() if hasattr(m, "processor"))
    with dit_accel.apply(transformer, dit_accel.Dense(), capture=tmp_path / "new" / "caps"):
        assert (tmp_path / "new" / "caps").is_dir()


def test_dense_steps_follow_ddim_schedulers_without_step_index():
    """CogVideoX pipelines use DDIM/DPM schedulers that have no `step_index`.

    Before: every call counted as step 0, so dense_steps=N silently ran the whole
    generation dense (and dense_last_steps never triggered)."""
    import dit_accel
    from dit_accel.models.tiny import build_tiny_transformer as build, tiny_transformer_inputs as inputs
    from diffusers import DDIMScheduler

    model = build("wan")
    kwargs = inputs("wan", model)
    sched = DDIMScheduler()
    sched.set_timesteps(4)
    assert not hasattr(sched, "step_index")
    with dit_accel.apply(model, dit_accel.GNA(kernel_size=(2, 3, 3)), dense_steps=1, dense_last_steps=1,
                         backend="torch", scheduler=sched) as handle, torch.no_grad():
        for t in sched.timesteps:
            for _ in range(2):  # classifier-free guidance: two calls per step
                model(**{**kwargs, "timestep": t.expand(1)})
        # steps 0 and 3 dense, 1 and 2 sparse
        assert [(r["sparse_calls"], r["dense_calls"]) for r in handle.stats()] == [(4, 4), (4, 4)]


def test_schedules_that_leave_nothing_sparse_warn():
    """Before: `--dense-steps 10 --steps 4` or dense_layers >= the layer count silently gave a dense run."""
    import dit_accel
    from dit_accel.models.tiny import build_tiny_transformer as build, tiny_transformer_inputs as inputs
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = build("wan")
    method = dit_accel.GNA(kernel_size=(2, 3, 3))
    with pytest.warns(UserWarning, match="covers all 2 attention layers"):
        dit_accel.apply(model, method, dense_layers=5).remove()
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(3)
    with dit_accel.apply(model, method, dense_steps=2, dense_last_steps=1, scheduler=sched), torch.no_grad():
        with pytest.warns(UserWarning, match="cover all 3 denoising steps"):
            model(**inputs("wan", model))


def test_merge_ignores_the_output_of_an_empty_side():
    """merge_attention's contract: a side with lse = -inf is ignored. SDPA returns NaN rows for
    fully masked queries; before, NaN * 0 leaked into the merged output."""
    o_a, o_b = torch.randn(1, 1, 3, 4), torch.full((1, 1, 3, 4), float("nan"))
    lse_a = torch.zeros(1, 1, 3)
    lse_b = torch.full((1, 1, 3), float("-inf"))
    o, lse = merge_attention(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o, o_a)
    torch.testing.assert_close(lse, lse_a)
    o, _ = merge_attention(o_b, lse_b, o_b, lse_b)
    assert torch.equal(o, torch.zeros_like(o))
