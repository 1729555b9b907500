"""Public Python API inputs, round 8: each test pins one fault found by calling the API with odd values (a raw
traceback from deep inside, or a silently wrong answer, before the fix)."""

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.checkpoints.convert import convert_checkpoint
from dit_accel.checkpoints.finetuned import SLA_FILE
from dit_accel.videos import load_video, save_video, to_uint8_frames

GRID = (4, 8, 8)
PROJ = "net.blocks.{i}.self_attn.attn_op.local_attn.proj_l.{part}"


# ------------------------------------------------------------ Method.at_density
@pytest.mark.parametrize("method", [dit_accel.GNA(), dit_accel.Tile(), dit_accel.Radial(), dit_accel.SLA(),
                                    dit_accel.VSA()], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("density, error", [(0, ValueError), (-0.1, ValueError), (1.5, ValueError),
                                            (float("nan"), ValueError), ("0.1", TypeError), (True, TypeError)],
                         ids=["zero", "negative", "above-1", "nan", "str", "bool"])
def test_at_density_refuses_a_density_outside_0_1(method, density, error):
    """Before: GNA and Tile raised math's "math domain error" for 0 or less; the others returned a config for any
    number (NaN gave GNA's smallest window, VSA took 1.5 as sparsity 0, SLA failed on its own negligible field)."""
    with pytest.raises(error, match=rf"{type(method).__name__}\.at_density: density=.* must be a number in \(0, 1\]"):
        method.at_density(GRID, density)


def test_at_density_takes_numpy_numbers_and_checks_the_grid():
    assert dit_accel.Tile().at_density(GRID, np.float32(0.25)) == dit_accel.Tile().at_density(GRID, 0.25)
    with pytest.raises(ValueError, match=r"grid=\(4, 0, 8\) is invalid"):
        dit_accel.GNA().at_density((4, 0, 8), 0.25)


# ------------------------------------------------------------ save_video
def test_save_video_takes_frames_as_nested_python_lists(tmp_path):
    """Before: a nested list of numbers [F][H][W][3] was read as a list of images down to its numbers, and refused
    with "frames has shape ()"."""
    video = np.random.default_rng(0).random((2, 8, 8, 3))
    np.testing.assert_array_equal(to_uint8_frames(video.tolist()), to_uint8_frames(video))
    path = save_video(video.tolist(), tmp_path / "frames", fps=8)
    np.testing.assert_array_equal(load_video(path), to_uint8_frames(video))
    with pytest.raises(ValueError, match="nested list whose lists differ in length"):
        to_uint8_frames([video[0].tolist(), video[1, :7].tolist()])


# ------------------------------------------------------------ convert_checkpoint
def _reference_state(dim, seed=0, sparse=False):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(2):
        weight = torch.randn(dim, dim, generator=g)
        state[PROJ.format(i=i, part="weight")] = weight.to_sparse() if sparse else weight
        state[PROJ.format(i=i, part="bias")] = torch.randn(dim, generator=g)
    return state


def test_convert_reads_a_checkpoint_of_sparse_tensors(tmp_path):
    """Before: torch's NotImplementedError from the finiteness check (a sparse tensor has no isfinite)."""
    from safetensors.torch import load_file

    dense = _reference_state(12)
    torch.save(_reference_state(12, sparse=True), tmp_path / "sparse.pth")
    out = convert_checkpoint(tmp_path / "sparse.pth", tmp_path / "w")
    assert torch.equal(load_file(out / SLA_FILE)["blocks.0.attn1.weight"], dense[PROJ.format(i=0, part="weight")])


def test_convert_refuses_two_experts_of_other_sizes(tmp_path):
    """Before: a folder held 12-wide projections for `transformer` and 16-wide ones for `transformer_2`; it wrote
    and failed only on loading into a model (or never, when one expert matched)."""
    torch.save(_reference_state(12), tmp_path / "high.pth")
    torch.save(_reference_state(16, seed=1), tmp_path / "low.pth")
    with pytest.raises(ValueError, match=r"head dim \[12\]\) and of transformer_2 .* \(\[16\]\) differ in size"):
        convert_checkpoint(tmp_path / "high.pth", tmp_path / "w", transformer_2=tmp_path / "low.pth")
    assert not (tmp_path / "w").exists()
