"""Every method under every Diffusers offload mode (model, sequential, group), in both call orders
(apply before or after enabling offload): the output equals the same method without offload.

On a CPU-only machine the offload "device" is the CPU too, but the mechanics are the real ones:
sequential offload keeps the weights on the meta device between calls (the case that broke SLA's
projections), group offload swaps block groups in and out.
"""

import pytest
import torch

import dit_accel
from dit_accel.models.tiny import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# Latent grid (5, 8, 8): one 64-token block per frame.
CALL = dict(prompt="a cat", num_frames=17, height=128, width=128, num_inference_steps=2, max_sequence_length=16,
            guidance_scale=5.0, output_type="latent")
METHODS = {
    "gna": dit_accel.GNA(kernel_size=(2, 3, 3)),
    "tile": dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)),
    "radial": dit_accel.Radial(block_size=64),
    "sla": dit_accel.SLA(topk=0.5, block_q=64),
}
OFFLOAD = {
    "model": lambda pipe: pipe.enable_model_cpu_offload(device="cpu"),
    "sequential": lambda pipe: _sequential_offload(pipe),
    "group": lambda pipe: pipe.enable_group_offload(onload_device=torch.device("cpu"),
                                                    offload_device=torch.device("cpu"), num_blocks_per_group=1),
}


def _sequential_offload(pipe):
    """What ``pipe.enable_sequential_cpu_offload()`` does on a GPU: accelerate's ``cpu_offload`` of every model.
    (Called with ``device="cpu"`` Diffusers targets "cpu:0", which accelerate's weight swap does not support.)"""
    from accelerate import cpu_offload

    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)


def _pipe():
    pipe = build_tiny_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe):
    with torch.no_grad():
        return pipe(**CALL, generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def expected():
    """Each method's output without offload."""
    pipe, out = _pipe(), {}
    for name, method in METHODS.items():
        with dit_accel.apply(pipe, method, backend="torch") as handle:
            out[name] = _generate(pipe)
            assert handle.summary()["sparse_calls"] > 0
    return out


@pytest.mark.parametrize("apply_first", [False, True], ids=["offload-then-apply", "apply-then-offload"])
@pytest.mark.parametrize("offload", list(OFFLOAD))
@pytest.mark.parametrize("method_name", list(METHODS))
def test_method_under_offload_matches_no_offload(expected, method_name, offload, apply_first):
    pipe = _pipe()
    if apply_first:
        handle = dit_accel.apply(pipe, METHODS[method_name], backend="torch")
        OFFLOAD[offload](pipe)
    else:
        OFFLOAD[offload](pipe)
        handle = dit_accel.apply(pipe, METHODS[method_name], backend="torch")
    got = _generate(pipe)
    summary = handle.summary()
    assert summary["sparse_calls"] > 0 and summary["warnings"] == []
    torch.testing.assert_close(got, expected[method_name], atol=1e-5, rtol=1e-5)
    handle.remove()


def test_sla_projections_are_not_part_of_the_model_checkpoint(tmp_path):
    """save_pretrained while SLA is applied writes the model itself; load_state_dict(strict) still loads it."""
    pipe = _pipe()
    before = dict(pipe.transformer.state_dict())
    with dit_accel.apply(pipe, METHODS["sla"], backend="torch") as handle:
        assert handle.sla_projections()
        assert set(pipe.transformer.state_dict()) == set(before)
        pipe.transformer.save_pretrained(tmp_path)
        pipe.transformer.load_state_dict(before, strict=True)
    reloaded = type(pipe.transformer).from_pretrained(tmp_path)
    assert set(reloaded.state_dict()) == set(before)
