"""Round 18's leftovers from round 17's helpers: faults they found in other areas than their own. Tiny models on the
CPU; each test names what was wrong before its fix."""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T


def _run(model, inputs):
    with torch.no_grad():
        model(**inputs)


# ------------------------------------------------------------------ summary during VSA's sparsity decay
def test_summary_says_the_sparsity_the_decay_ran():
    """Fine-tuning's VSA sparsity decay runs a lower sparsity than the config (``_replace_method``). Before: the
    summary's ``ran_on_grid`` said the configured sparsity 0.875 for calls that ran 0.5, so a run record during the
    decay named a setting that did not run. Now it says what ran; ``config`` stays the config as set."""
    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)
    method = dit_accel.VSA(sparsity=0.875)
    with dit_accel.apply(model, method, backend="torch") as handle:
        handle._replace_method(dit_accel.VSA(sparsity=0.5))
        _run(model, inputs)
        summary = handle.summary()
        assert summary["config"]["sparsity"] == 0.875
        (ran,) = summary["ran_on_grid"].values()
        assert ran["sparsity"] == 0.5
        handle._replace_method(method)  # the decay is over
        handle.reset_stats()
        _run(model, inputs)
        (ran,) = handle.summary()["ran_on_grid"].values()
        assert ran["sparsity"] == 0.875


# ------------------------------------------------------------------ the tests' masked reference on Z-Image
def test_the_masked_reference_leaves_z_images_caption_refiner_dense_on_small_grids():
    """Z-Image's caption refiner attends over the caption alone (64 padded tokens here). On a grid of 16 image
    tokens the reference took those calls for joint ones (they are at least as long as the image) and masked the
    caption's last 16 tokens by the image pattern: apply's output, right, differed from the reference (by 0.2).
    ``text_only=`` names the modules whose calls are text alone; they pass through."""
    from dit_accel.patterns import tile_mask
    from tests.utils import ReferenceAttention

    model = T.build_tiny_transformer("zimage")
    grid = (4, 4)
    kwargs = T.tiny_transformer_inputs("zimage", model, grid=grid)
    method = dit_accel.Tile(tile=(2, 2), window=(1, 1))
    with torch.no_grad():
        with ReferenceAttention(tile_mask(grid, method.tile, method.window), "last",
                                text_only=model.context_refiner) as ref_mode:
            ref = torch.stack(model(**kwargs)[0])
        with pytest.warns(dit_accel.DitAccelWarning, match="visits every key block"), \
                dit_accel.apply(model, method, backend="torch") as handle:  # (no speed-up here: tokens masked alone)
            out = torch.stack(model(**kwargs)[0])
            layers = len(handle.stats())
    assert ref_mode.calls == layers  # the image refiner and the joint layer; not the caption refiner
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------ fastest_attention's lse under transforms
def _lse_loss(fn, v, w):
    from dit_accel.kernels.dense import fastest_attention

    def ours(q, k, w):
        o, lse = fastest_attention(q, k, v, return_lse=True)
        return o.sum() * 0.5 + (lse * w).sum()

    def ref(q, k, w):
        s = (q @ k.transpose(-1, -2)) * 0.25
        return (torch.softmax(s, -1) @ v).sum() * 0.5 + (torch.logsumexp(s, -1) * w).sum()

    return ours if fn == "ours" else ref


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (torch's: SDPA has no batching rule on CPU)
def test_fastest_attention_lse_takes_per_sample_gradients():
    """``vmap(grad(...))`` (per-sample gradients) over a loss of fastest_attention's lse raised torch's "You tried to
    vmap over _LseGrad, but it does not have vmap support": the lse's gradient Function had no vmap rule. Now it
    has one, and the per-sample gradients are the reference's."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 1, 2, 17, 16, generator=g) for _ in range(2))
    v, w = torch.randn(1, 2, 17, 16, generator=g), torch.randn(3, 1, 2, 17, generator=g)
    got, want = (torch.vmap(torch.func.grad(_lse_loss(fn, v, w), argnums=(0, 1)))(q, k, w) for fn in ("ours", "ref"))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_gradient_penalty_through_fastest_attentions_lse():
    """A gradient penalty (create_graph=True, then the gradient of the gradients' norm) through the lse raised
    torch's "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented": the
    lse's gradient ran SDPA's fused kernel, which has no second derivative. It now runs SDPA's math kernel there."""
    from dit_accel.kernels.dense import fastest_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=g) for _ in range(3))
    w = torch.randn(1, 2, 17, generator=g)
    out = []
    for ours in (True, False):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        lse = (fastest_attention(qq, kk, v, return_lse=True)[1] if ours
               else torch.logsumexp((qq @ kk.transpose(-1, -2)) * 0.25, -1))
        grads = torch.autograd.grad((lse * w).sum(), (qq, kk), create_graph=True)
        out.append(torch.autograd.grad(sum((x ** 2).sum() for x in grads), (qq, kk)))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ a vendor backend that is not installed
@pytest.mark.parametrize("backend, package", [("fa4", "flash-attn-4"), ("cudnn", "nvidia-cudnn-frontend"),
                                              ("natten", "natten")])
def test_a_vendor_backend_whose_package_is_missing_is_refused_at_apply(monkeypatch, backend, package):
    """``apply(..., backend="fa4")`` without flash-attn-4 installed was taken, and the first attention call (minutes
    into a run; on ComfyUI the first sampling step, as the node took it too) raised the missing package. The
    package does not depend on the device the model moves to later: it is refused at apply, the model unchanged."""
    from dit_accel.kernels.block_sparse.backends import common

    real = common.importlib.util.find_spec
    monkeypatch.setattr(common.importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("flash_attn", "cudnn", "natten")
                        else real(name, *a))
    model = T.build_tiny_transformer("wan")
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    with pytest.raises(ValueError, match=rf"^backend='{backend}' cannot run in this environment: the {package} "
                                         r"package is not installed \(`pip install"):
        dit_accel.apply(model, dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1)), backend=backend)
    assert processors == {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    monkeypatch.setenv("DIT_ACCEL_BACKEND", backend)  # the same backend forced on auto's calls
    with pytest.raises(ValueError, match=rf"^environment variable DIT_ACCEL_BACKEND='{backend}' cannot run in this "
                                         rf"environment: the {package} package is not installed"):
        dit_accel.apply(model, dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1)))
    monkeypatch.delenv("DIT_ACCEL_BACKEND")
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name, *a: object())  # (installed: taken)
    dit_accel.apply(model, dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1)), backend=backend).remove()


# ------------------------------------------------------------------ generate's advice in flags
def test_generate_advises_the_fit_grid_flag_for_a_kernel_longer_than_the_grid(tmp_path, capsys):
    """A GNA kernel of 9 frames on tiny-wan's 5-frame grid: generate said "or GNA(..., fit=True) to clamp the kernel
    to the grid", the Python API; the command line's way is --fit-grid."""
    from dit_accel.cli.main import main

    code = main(["generate", "--model", "tiny-wan", "--method", "gna", "--kernel-size", "9,3,3", "--steps", "1",
                 "--out", str(tmp_path / "g.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "exceeds the grid extent 5" in err
    assert "GNA(..., fit=True)" not in err and "or --fit-grid to clamp the kernel to the grid" in err


def test_the_command_line_refuses_a_vendor_backend_whose_package_is_missing(monkeypatch, tmp_path, capsys):
    """``generate --backend natten`` without natten loaded the model, and apply (before its fix, the first attention
    call) refused it; the flag is now refused as it is read, in the command line's words."""
    from dit_accel.cli.main import main
    from dit_accel.kernels.block_sparse.backends import common
    from dit_accel.models import loading

    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded before --backend was read"))
    with pytest.raises(SystemExit) as code:  # (argparse's exit, as for any flag it refuses)
        main(["generate", "--model", "tiny-wan", "--method", "tile", "--backend", "natten",
              "--out", str(tmp_path / "g.mp4")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code.value.code == 2 and err == ("dit-accel generate: error: argument --backend: 'natten' cannot run in this "
                                 "environment: the natten package is not installed (`pip install natten` or `pip "
                                 "install \"dit_accel[natten]\"`); use --backend auto or --backend triton.")


def test_an_image_models_summary_speaks_of_image_tokens(tmp_path, capsys):
    """``generate --model tiny-sd3`` printed "token grid (16, 16) = 256 video tokens" and "of the video attention
    blocks" for an image: the summary now names what the grid holds."""
    from dit_accel.cli.main import main

    assert main(["generate", "--model", "tiny-sd3", "--method", "gna", "--steps", "1", "--height", "64", "--width",
                 "64", "--out", str(tmp_path / "i.png")]) == 0
    printed = capsys.readouterr().out
    assert "video tokens" not in printed and "video attention" not in printed, printed
    assert "= 256 image tokens" in printed and "of the image attention blocks" in printed, printed


def test_fastest_attentions_lse_gradient_compiles_fullgraph():
    """``torch.compile(fullgraph=True)`` of a training step through the lse failed in Dynamo ("Create the tensor
    outside the compiled region": the lse's backward made a ``requires_grad`` tensor to take SDPA's gradient for
    its values); it now takes that gradient by ``torch.func.vjp``, which Dynamo traces."""
    from dit_accel.kernels.dense import fastest_attention

    def step(q, k, v, w):
        o, lse = fastest_attention(q, k, v, return_lse=True)
        return o.sum() + (lse * w).sum()

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=g).requires_grad_() for _ in range(3))
    w = torch.randn(1, 2, 17, generator=g)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, w), (q, k))
    want = torch.autograd.grad(step(q, k, v, w), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ a per-dimension flag with a value left out
@pytest.mark.parametrize("text", ["1,,1,1", ",3,3", "3,3,,"])
def test_a_per_dimension_value_left_out_is_refused_not_dropped(text):
    """``--window 1,,1,1`` (a 4-value typo, or a value left out) was read as (1, 1, 1): the empty item dropped, a
    window the user did not write run without a word. Separators in a row are refused; the forms the flags take
    (``6,8,8``, ``6x8x8``, ``6 8 8``, ``(6, 8, 8)``, a trailing comma) read as before."""
    import argparse

    from dit_accel.cli.options import int_tuple

    with pytest.raises(argparse.ArgumentTypeError, match="has an empty item"):
        int_tuple(text)
    assert {int_tuple(t) for t in ("6,8,8", "6x8x8", " 6 8 8 ", "(6, 8, 8)", "6 , 8 , 8")} == {(6, 8, 8)}
    assert int_tuple("1,") == int_tuple("1") == 1
