"""Kernel and pattern entry points, round 18: each test pins one fault a user of NATTEN, FlashAttention or
FlexAttention would hit with dit_accel's public functions (edge layouts, mixed-up shapes, helper arguments)."""

import pytest
import torch

from dit_accel.kernels import BlockLayout, block_sparse_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [1, 40], ids=["one-token", "40-tokens"])
def test_a_layout_that_visits_no_block_still_trains_with_zero_gradients(n):
    # A layout with no visited block (a causal context-parallel step whose key chunk lies after its query chunk, a
    # select() of an empty region) gave o and lse built by new_zeros on the PyTorch twin: no grad_fn, so
    # o.sum().backward() raised "element 0 of tensors does not require grad" (the Triton kernels give zeros).
    layout = BlockLayout.from_dense_mask(torch.zeros(n, n, dtype=torch.bool), block_q=16, block_k=16)
    q, k, v = (_randn(1, 2, n, 16, seed=s).requires_grad_() for s in range(3))
    with torch.no_grad():
        q[0, 0, 0, 0] = float("inf")  # (an inf input must not turn the zeros into NaN)
    o, lse = block_sparse_attention(q, k, v, layout, backend="torch", return_lse=True)
    assert o.requires_grad and lse.requires_grad
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())
    grads = torch.autograd.grad(o.sum() + lse.clamp(min=-1.0).sum(), (q, k, v))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # torch.func.grad over the twin too
    dq = torch.func.grad(lambda x: block_sparse_attention(x, k.detach(), v.detach(), layout, backend="torch").sum())(
        q.detach())
    assert torch.equal(dq, torch.zeros_like(dq))
    # and under vmap with autograd outside it (inside, an input that requires grad reads requires_grad False)
    qs = _randn(3, 1, 2, n, 16).requires_grad_()
    o = torch.vmap(lambda x: block_sparse_attention(x, x, x, layout, backend="torch"))(qs)
    dqs, = torch.autograd.grad(o.sum(), (qs,))
    assert torch.equal(dqs, torch.zeros_like(dqs))


def test_b_n_h_d_inputs_are_told_to_transpose_not_to_permute_or_rebuild_the_layout():
    # q, k, v laid out (B, N, H, D) (flash-attn's and NATTEN's layout) against a layout of N tokens: the message said
    # "build the layout for these lengths" and, as H < N, "a pattern's layout is in tiled order: pass
    # perm.permute(q)", for a layout the user built from a plain [N, N] mask.
    layout = BlockLayout.from_dense_mask(torch.ones(40, 40, dtype=torch.bool), block_q=16, block_k=16)
    q = _randn(1, 40, 4, 16)
    with pytest.raises(ValueError, match=r"look like \(B, N, H, D\).*q\.transpose\(1, 2\)") as info:
        block_sparse_attention(q, q, q, layout)
    assert "perm.permute" not in str(info.value)
    o = block_sparse_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), layout)  # (as told: runs)
    assert o.shape == (1, 4, 40, 16)


def test_vsa_b_n_h_d_inputs_are_told_to_transpose_not_to_split_text_off():
    from dit_accel.kernels.vsa import vsa_attention

    q = _randn(1, 64, 2, 16)
    with pytest.raises(ValueError, match=r"look like \(B, N, H, D\).*q\.transpose\(1, 2\)") as info:
        vsa_attention(q, q, q, (4, 4, 4), topk=1)
    assert "text" not in str(info.value)


@pytest.mark.parametrize("block", [0, -64], ids=["zero", "negative"])
def test_fit_tile_refuses_a_block_that_is_no_positive_int(block):
    # fit_tile(..., block=0) returned the given (6, 8, 8) / (3, 3, 3) as if it fitted Wan 480p's grid, silently.
    from dit_accel.patterns.tile import fit_tile

    with pytest.raises(ValueError, match="block=.* is invalid: expected a positive int"):
        fit_tile((21, 30, 52), (6, 8, 8), (3, 3, 3), block=block)


@pytest.mark.parametrize("density", [0.0, -0.5, 2.0, float("nan")], ids=["zero", "negative", "above-one", "nan"])
def test_window_at_density_names_a_density_outside_zero_to_one(density):
    # 0 and -0.5 raised "math domain error"; 2.0 and NaN returned a window, silently.
    from dit_accel.patterns.tile import window_at_density

    with pytest.raises(ValueError, match=r"density=.* is invalid: must be a number in \(0, 1\]"):
        window_at_density((8, 8, 8), (2, 2, 2), density)


def test_window_at_density_takes_an_int_tile_like_the_other_pattern_functions():
    from dit_accel.patterns.tile import window_at_density

    assert window_at_density((8, 8, 8), 2, 0.3) == window_at_density((8, 8, 8), (2, 2, 2), 0.3)  # ('int' not iterable)


def test_a_cross_attention_layout_built_from_a_key_by_query_mask_is_told_to_transpose_the_mask():
    # 40 queries, 70 keys, the layout built from a [70, 40] mask: as q_len 70 > N 40 the message said "a pattern's
    # layout is in tiled order: pass perm.permute(q)", for a layout of no pattern.
    layout = BlockLayout.from_dense_mask(torch.ones(70, 40, dtype=torch.bool), block_q=16, block_k=16)
    q, k = _randn(1, 2, 40, 16), _randn(1, 2, 70, 16)
    with pytest.raises(ValueError, match=r"queries and keys swapped.*mask\.transpose\(-1, -2\)") as info:
        block_sparse_attention(q, k, k, layout)
    assert "perm.permute" not in str(info.value)


def test_dense_attention_past_its_head_dim_says_what_to_call_instead():
    # D=300 gave "the dense Triton kernel takes 1 <= M and D <= 256" and nothing to do about it.
    from dit_accel.kernels.dense import dense_attention

    q = _randn(1, 1, 8, 300)
    with pytest.raises(ValueError, match="D <= 256.*fastest_attention.*scaled_dot_product_attention"):
        dense_attention(q, q, q)


@pytest.mark.parametrize("widths", [(0, 0), (-1, 2), (2.5, 3), (3,)], ids=["zero", "negative", "float", "one-value"])
def test_from_block_masks_names_widths_that_are_not_two_positive_ints(widths):
    # (-1, 2) raised torch's "index -1 is out of bounds for dimension 2 with size 0", (2.5, 3) torch.Size's
    # "takes an iterable of 'int'", (3,) "not enough values to unpack".
    with pytest.raises(ValueError, match=r"widths=.* is invalid: expected \(kv, q\), two positive ints"):
        BlockLayout.from_block_masks(torch.ones(3, 3, dtype=torch.bool), q_len=48, kv_len=48, block_q=16,
                                     block_k=16, widths=widths)


def test_widths_below_a_rows_count_are_named_at_the_call_not_blamed_on_the_builder():
    # widths=(1, 3) on a visit matrix of 3 key blocks per row cut the lists; the call then said "kv_counts must lie
    # in [0, 1] ... build layouts with BlockLayout.from_block_masks", the very builder that was used.
    layout = BlockLayout.from_block_masks(torch.ones(3, 3, dtype=torch.bool), q_len=48, kv_len=48, block_q=16,
                                          block_k=16, widths=(1, 3))
    q = _randn(1, 1, 48, 8)
    with pytest.raises(ValueError, match=r"widths=\(kv, q\)\) with kv = 1 below that count"):
        block_sparse_attention(q, q, q, layout, backend="torch")


# ------------------------------------------------------------------ a call under torch.inference_mode, then another
# (ComfyUI samples under inference_mode; a training script's preview or validation step may too)
def test_a_twin_call_under_no_grad_after_one_under_inference_mode_runs():
    # The twin's per-thread gather buffers were made under inference_mode as inference tensors: the thread's next
    # call outside it raised "Inplace update to inference tensor outside InferenceMode is not allowed".
    from dit_accel.patterns import gna_layout

    _, layout = gna_layout((8, 8), 3, block_q=16, block_k=16)
    q, k, v = (_randn(1, 2, 64, 16, seed=s) for s in range(3))
    with torch.inference_mode():
        first = block_sparse_attention(q, k, v, layout, backend="torch")
    with torch.no_grad():
        again = block_sparse_attention(q, k, v, layout, backend="torch")
    torch.testing.assert_close(again, first.clone(), rtol=0, atol=0)


@pytest.mark.parametrize("built_inside", [False, True], ids=["layout-built-outside", "layout-built-inside"])
def test_a_layout_called_under_inference_mode_then_trains_on_the_twin(built_inside):
    # The twin's chunk plan (index lists, masks) is kept on the layout; made by a call under inference_mode they were
    # inference tensors, and the next call that records a backward raised "Inference tensors cannot be saved for
    # backward" from inside the twin.
    mask = torch.rand(50, 50, generator=torch.Generator().manual_seed(0)) > 0.5

    def build():
        return BlockLayout.from_dense_mask(mask, block_q=16, block_k=16)

    layout = None if built_inside else build()
    with torch.inference_mode():
        layout = layout or build()
        x = _randn(1, 2, 50, 16)
        block_sparse_attention(x, x, x, layout, backend="torch")
    q, k, v = (_randn(1, 2, 50, 16, seed=s).requires_grad_() for s in range(3))
    o = block_sparse_attention(q, k, v, layout, backend="torch")
    dq, = torch.autograd.grad(o.sum(), (q,))
    q2 = q.detach().requires_grad_()
    want = torch.softmax((q2 @ k.detach().transpose(-1, -2) / 4).masked_fill(~mask, float("-inf")), -1).nan_to_num(0)
    dq_want, = torch.autograd.grad((want @ v.detach()).sum(), (q2,))
    torch.testing.assert_close(dq, dq_want, rtol=1e-5, atol=1e-5)


def test_a_permutation_used_under_inference_mode_then_permutes_with_a_gradient():
    # TilePermutation keeps its index tables per device; made under inference_mode, a later permute of a tensor that
    # requires grad raised "Inference tensors cannot be saved for backward" (also for a permutation built there).
    from dit_accel.patterns import TilePermutation

    with torch.inference_mode():
        made_inside = TilePermutation((6, 6), (4, 4))
        made_inside.permute(_randn(1, 1, 36, 4))
    made_outside = TilePermutation((6, 6), (4, 4))
    with torch.inference_mode():
        made_outside.permute(_randn(1, 1, 36, 4))
    for perm in (made_inside, made_outside):
        x = _randn(1, 1, 36, 4).requires_grad_()
        g = torch.randn(1, 1, perm.num_padded, 4)
        dx, = torch.autograd.grad((perm.permute(x) * g).sum(), (x,))
        torch.testing.assert_close(dx, perm.unpermute(g), rtol=0, atol=0)
