"""dit_accel.apply on a real (tiny, random-weight) WanPipeline: schedule under CFG,
capture, CPU offload and LoRA; plus the Triton backend on the smallest model."""

import pytest
import torch

import dit_accel
from dit_accel.pipelines.hooks import SparseAttnProcessor
from dit_accel.models.tiny import build_tiny_pipeline

from dit_accel.models import tiny as T
from tests.utils import DEVICE, TOL

# Latent grid (3, 4, 4); CFG: 2 transformer calls per step; latents out (no VAE decode: faster).
CALL = dict(prompt="a cat", num_frames=9, height=64, width=64, num_inference_steps=4, max_sequence_length=16,
            guidance_scale=5.0, output_type="latent")
METHOD = dit_accel.GNA(kernel_size=(2, 3, 3))


def _generate(pipe, **overrides):
    with torch.no_grad():
        return pipe(**{**CALL, **overrides}, generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_pipeline("tiny-wan")
    p.set_progress_bar_config(disable=True)
    return p


def test_schedule_follows_scheduler_steps_under_cfg(pipe, tmp_path):
    handle = dit_accel.apply(pipe, METHOD, dense_steps=1, dense_last_steps=1, dense_layers=[1], backend="torch",
                             capture=tmp_path, capture_steps=[1])
    try:
        _generate(pipe)
        rows = handle.stats()
        # 4 steps x 2 calls: steps 0 and 3 dense by schedule, steps 1 and 2 sparse; layer 1 always dense.
        assert [(r["sparse_calls"], r["dense_calls"]) for r in rows] == [(4, 4), (0, 8)]
        assert [r["method"] for r in rows] == ["gna", "dense"]
        summary = handle.summary()
        assert summary["sparse_calls"] == 4 and summary["sparse_layers"] == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["layer000_step001.pt", "layer001_step001.pt"]
        saved = torch.load(tmp_path / "layer001_step001.pt")
        assert saved["q"].shape[2] == 48 and saved["grid"] == (3, 4, 4) and saved["step"] == 1
    finally:
        handle.remove()
    assert not any(isinstance(getattr(m, "processor", None), SparseAttnProcessor) for m in pipe.transformer.modules())


def test_cpu_offload_and_lora_coexist():
    pipe = build_tiny_pipeline("tiny-wan", seed=1)
    pipe.set_progress_bar_config(disable=True)
    from peft import LoraConfig

    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights=False))
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate hooks on every model component
    before = _generate(pipe, num_inference_steps=2)
    with dit_accel.apply(pipe, METHOD, backend="torch") as handle:
        sparse = _generate(pipe, num_inference_steps=2)
        assert all(r["sparse_calls"] == 4 for r in handle.stats())
    assert not torch.equal(sparse, before)
    assert torch.equal(_generate(pipe, num_inference_steps=2), before)
    assert not pipe.transformer._forward_pre_hooks


def test_triton_backend_matches_torch_backend():
    """CPU: the interpreted kernel; on a CUDA machine the compiled one (fp32 through tl.dot is tf32 there)."""
    pytest.importorskip("triton")
    model = T.build_tiny_transformer("flux").to(DEVICE)
    kwargs = T.tiny_transformer_inputs("flux", model, grid=(8, 9), batch=1, text=3)
    kwargs = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    method = dit_accel.GNA(kernel_size=(3, 5))
    outs = {}
    for backend in ("torch", "triton"):
        with dit_accel.apply(model, method, backend=backend) as handle, torch.no_grad():
            outs[backend] = model(**kwargs)[0]
            assert all(r["sparse_calls"] == 1 for r in handle.stats())
    tol = TOL[torch.float32][0]
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=tol, rtol=tol)
