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
