"""Issue 47 item 4: a BlockLayout is an immutable value. Its launches, device copies and backend plans are
cached with it, so a layout whose tensors were edited in place must never run its cached launch: it is refused
in one line that says what to do (build a new layout)."""

import pytest
import torch

from dit_accel.kernels import BlockLayout, block_sparse_attention


def _qkv(n=130, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("edit", ["kv_mask_ids", "kv_counts", "mask_table", "the mask it was built from"])
def test_a_layout_edited_in_place_is_refused_not_run_from_its_cache(edit):
    q, k, v = _qkv()
    n = q.shape[2]
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(1)) < 0.4
    mask |= torch.eye(n, dtype=torch.bool)
    layout = BlockLayout.from_dense_mask(mask, 32, 32)
    first = block_sparse_attention(q, k, v, layout, backend="torch")
    if edit == "kv_mask_ids":  # (partial blocks read as full; zeroed kv_indices are refused as such now)
        layout.kv_mask_ids.fill_(-1)
    elif edit == "kv_counts":
        layout.kv_counts.clamp_(max=1)
    elif edit == "mask_table":
        layout.mask_table[0].fill_(True)
    else:  # a view of the caller's tensors (the mask table when it was given as is)
        table = layout.mask_table
        table[..., 0] = ~table[..., 0]
    fresh = BlockLayout(layout.q_len, layout.kv_len, layout.block_q, layout.block_k,
                        **{name: getattr(layout, name).clone() for name in BlockLayout.TENSORS})
    expected = block_sparse_attention(q, k, v, fresh, backend="torch")
    assert not torch.equal(expected, first)  # the edit changes the result: a stale launch would be wrong
    with pytest.raises(RuntimeError) as err:
        block_sparse_attention(q, k, v, layout, backend="torch")
    text = str(err.value)
    assert "changed in place" in text and "new layout" in text and "\n" not in text


def test_an_unedited_layout_still_runs_from_its_cache():
    q, k, v = _qkv(63)
    layout = BlockLayout.from_dense_mask(torch.ones(63, 63, dtype=torch.bool).tril(), 16, 16)
    a = block_sparse_attention(q, k, v, layout, backend="torch")
    b = block_sparse_attention(q, k, v, layout, backend="torch")
    assert torch.equal(a, b) and layout.derived  # decided once, then cached


def test_a_layout_built_in_inference_mode_runs():
    q, k, v = _qkv(63)
    with torch.inference_mode():
        layout = BlockLayout.from_dense_mask(torch.ones(63, 63, dtype=torch.bool).tril(), 16, 16)
        out = block_sparse_attention(q, k, v, layout, backend="torch")
    assert torch.isfinite(out).all()
