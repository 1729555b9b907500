"""apply() and generate beside what users do (round 10): a second-order scheduler swapped in, weights stored in
float8 by Diffusers' layerwise casting, an option of --cp or --cache given twice. Tiny models on the CPU; each test
names what was wrong before its fix."""

import warnings

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.plans.sparse_plan import Phase, SparsePlan
from tests.utils import ReferenceAttention, method_mask

TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))  # on tiny-wan's (3, 8, 8) grid at 9 frames of 128x128
WAN_CALL = dict(prompt="a cat", num_frames=9, height=128, width=128, max_sequence_length=16, guidance_scale=1.0,
                output_type="latent")


def _run(pipe, **extra):
    return pipe(**WAN_CALL, **extra, generator=torch.Generator().manual_seed(0)).frames


def _per_call_reference(pipe, sparse_calls, **call):
    """The output of ``pipe`` run with ``call`` where its i-th transformer call runs the masked-dense Tile reference
    where ``sparse_calls[i]``, else the model's own dense attention: the expected output of a schedule, written out
    call by call."""
    mode, calls = ReferenceAttention(method_mask(TILE, (3, 8, 8)), "none"), [0]

    def enter(*_):
        if sparse_calls[calls[0]]:
            mode.__enter__()

    def leave(*_):
        if sparse_calls[calls[0]]:
            mode.__exit__(None, None, None)
        calls[0] += 1

    hooks = [pipe.transformer.register_forward_pre_hook(enter), pipe.transformer.register_forward_hook(leave)]
    try:
        return _run(pipe, **call)
    finally:
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------ second-order schedulers
@pytest.fixture()
def heun_wan():
    """tiny-wan with Diffusers' FlowMatchHeunDiscreteScheduler: at 3 steps it makes 5 transformer calls, two per
    step (predictor, corrector) and one at the last step (timesteps t0, t1, t1, t2, t2; order 2)."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = T.build_tiny_pipeline("tiny-wan")
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def test_dense_last_steps_under_a_second_order_scheduler_makes_only_the_last_step_dense(heun_wan):
    """Before: the run's step count was len(timesteps) // order = 5 // 2 = 2 for 3 Heun steps, so
    dense_last_steps=1 also ran step 1 dense (2 of 3 steps dense, 4 sparse and 6 dense layer calls). Now the
    count is 3: the calls of steps 0 and 1 are sparse, the last step's call dense, as the masked-dense
    reference written call by call."""
    want = _per_call_reference(heun_wan, [True, True, True, True, False], num_inference_steps=3)
    with dit_accel.apply(heun_wan, TILE, backend="torch", dense_last_steps=1) as handle:
        got = _run(heun_wan, num_inference_steps=3)
        summary = handle.summary()
    assert (summary["sparse_calls"], summary["dense_calls"]) == (8, 2)  # 2 layers: 4 sparse calls, 1 dense
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_plan_for_n_steps_runs_n_steps_of_a_second_order_scheduler(heun_wan):
    """Before: a plan calibrated for 3 steps was refused on a 3-step Heun run ("was calibrated for 3 denoising steps;
    this run has 2"). Now it runs, its sparse phase on the calls of its steps."""
    plan = SparsePlan((Phase(1, 3, default=TILE),), num_layers=2, provenance={"steps": 3})
    want = _per_call_reference(heun_wan, [False, False, True, True, True], num_inference_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dit_accel.apply(heun_wan, plan, backend="torch") as handle:
            got = _run(heun_wan, num_inference_steps=3)
            summary = handle.summary()
    assert (summary["sparse_calls"], summary["dense_calls"]) == (6, 4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ weights stored in 8 bits
def _wan_output(model):
    with torch.no_grad():
        return model(**T.tiny_transformer_inputs("wan", model))[0]


def test_sla_on_a_model_with_float8_layerwise_casting_runs_like_the_same_weights_in_fp32():
    """Before: apply(SLA) on a transformer after Diffusers' ``enable_layerwise_casting(storage_dtype=float8_e4m3fn)``
    raised a raw NotImplementedError ("check_uniform_bounds" not implemented for 'Float8_e4m3fn'): the SLA projection
    took the storage dtype of the attention's first weight. Now it is fp32, and the model runs as a plain fp32 copy of
    the float8-rounded weights under the same SLA."""
    model = T.build_tiny_transformer("wan")
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    rounded = T.build_tiny_transformer("wan")
    rounded.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    sla = dit_accel.SLA(topk=0.5)
    with dit_accel.apply(rounded, sla, backend="torch"):
        want = _wan_output(rounded)
    with dit_accel.apply(model, sla, backend="torch") as handle:
        assert {p.weight.dtype for p in handle.sla_projections().values()} == {torch.float32}
        got = _wan_output(model)
        assert handle.summary()["sparse_calls"] == 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ --cp
@pytest.mark.parametrize("cp, said", [
    ("ulysses=2,ulysses=4", "--cp 'ulysses=2,ulysses=4': ulysses is given twice; give each of ulysses=N and ring=M "
                            "once, e.g. ulysses=2,ring=2"),
    ("ring=2 ring=2", "--cp 'ring=2 ring=2': ring is given twice"),
    ("ulysses=\u00b2", "--cp 'ulysses=\u00b2': expected ulysses=N and/or ring=M with N, M >= 1"),
])
def test_cp_given_a_degree_twice_or_a_non_ascii_digit_is_one_line_naming_it(cp, said, capsys, tmp_path):
    """Before: ``--cp ulysses=2,ulysses=4`` ran 4 Ulysses ranks (the last value won, the typo unsaid), and
    ``ulysses=\u00b2`` (str.isdigit() is true for a superscript two) was argparse's "invalid parse_cp value". Now
    both are the option's own one-line error, exit 2, before any model loads."""
    from dit_accel.cli.generate import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "tiny-wan", "--cp", cp, "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and said in err[-1], err


# ------------------------------------------------------------------ --cache
def test_a_cache_option_given_twice_is_one_line_naming_it(capsys, tmp_path):
    """Before: ``--cache fbcache:threshold=0.1,threshold=0.2`` ran threshold 0.2 (the last value won, the other
    unsaid). Now it is a one-line error naming the option, exit 2."""
    from dit_accel.cli.generate import main

    code = main(["--model", "tiny-wan", "--method", "tile", "--cache", "fbcache:threshold=0.1,threshold=0.2", "--out",
                 str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["dit-accel generate: error: --cache 'fbcache:threshold=0.1,threshold=0.2': option "
                                 "'threshold' is given twice; give it once"], err


# ------------------------------------------------------------------ capture_steps past the run
@pytest.mark.parametrize("steps, said, files", [
    ([5], "capture_steps 5 is past this run's 2 denoising steps (0..1): nothing is captured", []),
    ([1, 2, 3], "capture_steps 2, 3 are past this run's 2 denoising steps (0..1): no files are written for them",
     ["layer000_step001.pt", "layer001_step001.pt"]),
])
def test_capture_steps_past_the_run_are_said(steps, said, files, tmp_path):
    """Before: ``capture_steps=[5]`` on a 2-step run left the capture folder empty, with no word (``bench fidelity``
    then found nothing to read). Now the steps past the run are said once, in ``handle.warnings`` too; the steps in
    the run are captured as before."""
    pipe = T.build_tiny_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(dit_accel.DitAccelWarning, match="capture_steps") as caught:
        with dit_accel.apply(pipe, TILE, backend="torch", capture=tmp_path / "cap", capture_steps=steps) as handle:
            _run(pipe, num_inference_steps=2)
            _run(pipe, num_inference_steps=2)
            said_by_handle = handle.warnings
    assert said_by_handle == [f"dit_accel: {said}. Pass steps below 2, or run more steps"]
    assert sum("capture_steps" in str(w.message) for w in caught) == 1
    assert sorted(p.name for p in (tmp_path / "cap").iterdir()) == files


# ------------------------------------------------------------------ set_step without the total
def test_set_step_without_total_under_dense_last_steps_is_refused_and_with_it_runs_the_last_step_dense():
    """Before: on a bare transformer applied with ``dense_last_steps=1``, ``handle.set_step(i)`` (no total) ran every
    step sparse, the last one too, with no word: the last steps cannot be found without the run's length. Now that
    call is a ValueError saying to pass the total; with it the last step runs dense, as the model does."""
    model = T.build_tiny_transformer("wan")
    dense = _wan_output(model)
    with dit_accel.apply(model, TILE, dense_last_steps=1, backend="torch") as handle:
        with pytest.raises(ValueError, match=r"^set_step\(2\) has no total, but dense_last_steps=1 counts back from "
                                             r"the run's last step: call set_step\(2, total\)$"):
            handle.set_step(2)
        handle.set_step(0, 3)
        sparse = _wan_output(model)
        handle.set_step(2, 3)
        last = _wan_output(model)
        rows = [(r["sparse_calls"], r["dense_calls"]) for r in handle.stats()]
    assert rows == [(1, 1), (1, 1)]
    assert torch.equal(last, dense) and not torch.allclose(sparse, dense, atol=1e-3)
