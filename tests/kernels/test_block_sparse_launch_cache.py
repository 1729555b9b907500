"""The block-sparse launcher's cache of launch arguments (issue 27, host path).

``triton_forward`` derives its configuration, tile plan, work order, strides, grid and TMA
descriptors once per (layout, call signature) and keeps them with the layout's tile plans
(``triton._PLANS``). These tests change one component of that key at a time (strides, dtype,
the device's architecture, base alignment, batch, the layout's content with the same shape,
a non-contiguous last dim, a padded head dim) on one layout, check every result against the
fp32 masked reference, and check that a new signature builds a new entry while a repeated one
builds nothing. ``triton_backward`` keeps its own entry per (layout, call signature) beside the
forward's (configurations, transposed and forward plans, strides, grids, descriptors): the last tests
check its gradients the same way. Interpreter sizes (N <= 160), fp32 / fp16.
"""

import gc
import os
import weakref

import pytest
import torch

from dit_accel.kernels import BlockLayout, block_sparse_attention
from dit_accel.kernels.backends import triton_reason
from tests.utils import DEVICE, assert_attention_close, assert_grads_close, banded_mask, make_qkv, random_mask

pytestmark = pytest.mark.skipif(triton_reason("cpu") is not None or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter test (CPU tensors)")

N, D, BLOCK = 96, 64, 32


def _bst():
    from dit_accel.kernels.block_sparse import triton as bst

    return bst


@pytest.fixture
def builds(monkeypatch):
    """Counts the launch builds (cache misses) of ``triton_forward``."""
    bst = _bst()
    calls = []
    real = bst._forward_launch

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(bst, "_forward_launch", counting)
    return calls


def _layout(seed=0, heads=1, n=N, m=N, block=BLOCK):
    """On q's device: ``triton_forward`` takes the layout there (``block_sparse_attention`` moves it)."""
    mask = random_mask(heads, n, m, block=block, seed=seed, full_block=(0, block, 0, m))
    return mask, BlockLayout.from_dense_mask(mask.to(DEVICE), block_q=block, block_k=block)


def _forward(q, k, v, layout, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _bst().triton_forward(q, k, v, layout, scale)


def _launches(layout):
    return {key: value for key, value in _bst()._PLANS.values(layout).items() if key[0] == "fwd"}


def _check(q, k, v, mask, layout, scale=None):
    o, lse = _forward(q, k, v, layout, scale)
    assert_attention_close(o, lse, q, k, v, mask, scale)


def test_a_repeated_call_builds_nothing_and_a_new_signature_builds_once(builds):
    mask, layout = _layout()
    q, k, v = make_qkv(1, 2, N, N, D, seed=1)
    for _ in range(3):
        _check(q, k, v, mask, layout)
    assert len(builds) == 1 and len(_launches(layout)) == 1
    q2, k2, v2 = make_qkv(2, 2, N, N, D, seed=2)  # the batch changes the grid
    for _ in range(2):
        _check(q2, k2, v2, mask, layout)
    assert len(builds) == 2 and len(_launches(layout)) == 2
    _check(q, k, v, mask, layout, scale=0.3)  # the scale is an argument of the launch, not of its key
    assert len(builds) == 2


@pytest.mark.parametrize("change", ["strides", "dtype", "last_dim", "head_dim", "kv_strides"])
def test_each_key_component_alone_gives_a_fresh_correct_launch(builds, change):
    """The first call fills the cache with a contiguous fp32 (1, 2, N, 64) signature; the second
    differs in one component only and must neither reuse that launch nor be wrong."""
    mask, layout = _layout(seed=3)
    q, k, v = make_qkv(1, 2, N, N, D, seed=3)
    _check(q, k, v, mask, layout)
    if change == "strides":  # same shape and values, (B, N, H, D) storage
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    elif change == "kv_strides":  # k, v alone in (B, N, H, D) storage, q unchanged
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    elif change == "dtype":
        q, k, v = (t.half() for t in (q, k, v))
    elif change == "last_dim":  # stride(-1) == 2: the launcher copies these inputs first
        q, k, v = (torch.stack([t, torch.zeros_like(t)], -1)[..., 0] for t in (q, k, v))
        assert q.stride(-1) == 2
    elif change == "head_dim":  # 80: the pointer kernel runs on zero-padded copies
        q, k, v = make_qkv(1, 2, N, N, 80, seed=4)
    _check(q, k, v, mask, layout)
    assert len(builds) == 2 and len(_launches(layout)) == 2
    _check(q, k, v, mask, layout)  # and the new entry is used as built
    assert len(builds) == 2


def test_a_layout_of_the_same_shape_with_other_content(builds):
    """Same geometry, other blocks: each layout keeps its own plan and launch, alternately."""
    (mask_a, a), (mask_b, b) = _layout(seed=5), _layout(seed=6)
    assert not torch.equal(mask_a, mask_b)
    q, k, v = make_qkv(1, 2, N, N, D, seed=5)
    for _ in range(2):
        _check(q, k, v, mask_a, a)
        _check(q, k, v, mask_b, b)
    assert len(builds) == 2


def test_a_layout_sharing_kv_indices_with_another_gets_its_own_plan():
    """Plans are anchored on ``kv_indices``; a layout built around the same ``kv_indices`` with other
    element masks (or another length) must not take the first layout's plan."""
    mask, layout = _layout(seed=7)
    q, k, v = make_qkv(1, 1, N, N, D, seed=7)
    _check(q, k, v, mask, layout)
    assert layout.mask_table.shape[0] > 0
    flipped = ~layout.mask_table  # every partial block's element mask inverted
    other = BlockLayout(layout.q_len, layout.kv_len, layout.block_q, layout.block_k, layout.kv_counts,
                        layout.kv_indices, layout.kv_mask_ids, layout.q_counts, layout.q_indices, layout.q_mask_ids,
                        flipped)
    assert other.kv_indices is layout.kv_indices
    _check(q, k, v, other.to_dense_mask(), other)
    _check(q, k, v, mask, layout)  # the first one still gets its own


def test_the_architecture_and_base_alignment_are_part_of_the_key(builds, monkeypatch):
    """sm_80 (pointer loads) then sm_90 (TMA descriptors, persistent grid) on one layout and shape,
    then a K whose base is 4 bytes off 16-byte alignment (TMA falls back to pointers), then aligned
    again: four launches, each right, and the aligned sm_90 one reused with fresh descriptors."""
    bst = _bst()
    mask, layout = _layout(seed=8)
    q, k, v = make_qkv(1, 2, N, N, D, seed=8)
    _check(q, k, v, mask, layout)
    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    _check(q, k, v, mask, layout)
    tma = [launch for launch in _launches(layout).values() if launch.cfg.tma]
    assert len(tma) == 1 and tma[0].descriptors is not None and tma[0].grid is None
    storage = torch.empty(k.numel() + 1)
    k_off = storage[1:].view(k.shape).copy_(k)  # same values, base 4 bytes past alignment
    assert k_off.data_ptr() % 16
    _check(q, k_off, v, mask, layout)
    assert len(builds) == 3
    assert sum(not launch.cfg.tma for launch in _launches(layout).values()) == 2  # sm_80 and the misaligned one
    k2, v2 = make_qkv(1, 2, N, N, D, seed=9)[1:]  # other tensors, same signature as the aligned sm_90 call
    _check(q, k2, v2, mask, layout)
    assert len(builds) == 3


def test_descriptors_are_rebased_on_each_calls_tensors(monkeypatch):
    """A reused sm_90 launch must address this call's K and V, not the first call's."""
    bst = _bst()
    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    block = 64 if DEVICE == "cuda" else BLOCK  # (its GPU twin: CUDA launches take 64-token blocks and up)
    mask, layout = _layout(seed=10, n=3 * block, m=3 * block, block=block)
    first = None
    for seed in (10, 11, 12):
        q, k, v = make_qkv(1, 2, 3 * block, 3 * block, D, torch.float16, seed=seed)
        first = first or weakref.ref(k)
        _check(q, k, v, mask, layout)
    assert len(_launches(layout)) == 1
    # and it holds templates, not the first call's tensors (activations would live as long as the layout)
    (launch,) = _launches(layout).values()
    assert all(desc.base is None for desc in launch.descriptors)
    gc.collect()
    assert first() is None


def test_the_cache_is_bounded_and_an_evicted_signature_is_rebuilt(builds, monkeypatch):
    bst = _bst()
    monkeypatch.setattr(bst._PLANS, "max_values", 3)
    mask, layout = _layout(seed=13, n=64, m=64)
    qkvs = [make_qkv(b, 1, 64, 64, D, seed=b) for b in (1, 2, 3, 4)]
    for q, k, v in qkvs:
        _check(q, k, v, mask, layout)
    assert len(bst._PLANS.values(layout)) <= 3  # plans, work orders and launches together
    assert len(builds) == 4
    _check(*qkvs[0], mask, layout)  # evicted (oldest first): built again, still right
    assert len(builds) == 5


def test_an_entry_goes_with_its_layout():
    bst = _bst()
    mask, layout = _layout(seed=14)
    q, k, v = make_qkv(1, 1, N, N, D, seed=14)
    _check(q, k, v, mask, layout)
    anchor = id(layout.kv_indices)
    assert anchor in bst._PLANS._anchors._entries
    del layout
    gc.collect()
    assert anchor not in bst._PLANS._anchors._entries


def test_the_softmax_scale_is_a_runtime_float(monkeypatch):
    """``scale * LOG2E`` with triton's constexpr LOG2E is a constexpr: triton would compile one kernel per
    scale. The launch must pass a plain float."""
    from dit_accel.eval.host_path import stub_launches

    bst = _bst()
    _, layout = _layout(seed=15)
    q, k, v = make_qkv(1, 1, N, N, D, seed=15)
    seen = []
    with stub_launches():
        monkeypatch.setattr(bst._fwd_kernel, "_launch", lambda *args, **kw: seen.append(args))
        _forward(q, k, v, layout, 0.25)
    scale = seen[0][list(bst._fwd_kernel.arg_names).index("qk_scale")]  # (VSA's gate arguments after it)
    assert type(scale) is float and scale == pytest.approx(0.25 * 1.4426950408889634)


def test_the_api_still_checks_every_call_after_a_cached_one():
    mask = banded_mask(N, N, 20)
    layout = BlockLayout.from_dense_mask(mask, block_q=BLOCK, block_k=BLOCK)
    q, k, v = make_qkv(1, 2, N, N, D, seed=16)
    for _ in range(2):
        o = block_sparse_attention(q, k, v, layout, backend="triton")
        assert_attention_close(o, None, q, k, v, mask)
    with pytest.raises(ValueError, match="q_len=96"):
        block_sparse_attention(q[:, :, :64], k, v, layout, backend="triton")
    with pytest.raises(TypeError, match="share one dtype"):
        block_sparse_attention(q.half(), k, v, layout, backend="triton")
    with pytest.raises(ValueError, match="same shape"):
        block_sparse_attention(q, k, v[:, :, :64], layout, backend="triton")
    # Non-contiguous inputs through the API: the (B, N, H, D) storage of a pipeline's projections.
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert_attention_close(block_sparse_attention(qt, kt, vt, layout, backend="triton"), None, q, k, v, mask)


def test_the_compute_capability_is_read_once_per_cuda_device(monkeypatch):
    bst = _bst()
    reads = []
    monkeypatch.setattr(bst, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: reads.append(device) or (9, 0))
    for _ in range(3):
        assert bst._arch(torch.device("cuda", 1)) == 90
    assert len(reads) == 1
    assert bst._arch(torch.device("cpu")) == 80 and len(reads) == 1


# ------------------------------------------------------------------ the backward launcher
@pytest.fixture
def backward_builds(monkeypatch):
    """Counts the launch builds (cache misses) of ``triton_backward``."""
    bst = _bst()
    calls = []
    real = bst._backward_launch
    monkeypatch.setattr(bst, "_backward_launch", lambda *args: calls.append(1) or real(*args))
    return calls


def _check_grads(q, k, v, mask, layout, dlse=None, scale=None):
    bst = _bst()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, lse = bst.triton_forward(q, k, v, layout, scale)
    do = torch.randn_like(o)
    grads = bst.triton_backward(do, q, k, v, o, lse, layout, scale, dlse)
    if dlse is None:
        assert_grads_close(grads, q, k, v, mask, do, scale)
    return grads


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80-pointers", "sm90-tma"])
@pytest.mark.parametrize("change", ["strides", "head_dim", "last_dim", "dtype"])
def test_backward_launch_is_built_once_per_signature(backward_builds, monkeypatch, arch, change):
    """A repeated backward builds nothing; a call that differs in one component (q in (B, N, H, D)
    storage, a head dim the pointer kernels pad, a last dim that is not contiguous, fp16) builds its own
    launch, and every gradient matches the reference, on both load paths."""
    monkeypatch.setattr(_bst(), "_arch", lambda device: arch)
    mask, layout = _layout(seed=11, heads=2)
    q, k, v = make_qkv(1, 2, N, N, D, seed=11)
    for _ in range(2):
        _check_grads(q, k, v, mask, layout)
    assert len(backward_builds) == 1
    if change == "strides":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    elif change == "head_dim":
        q, k, v = make_qkv(1, 2, N, N, 80, seed=12)
    elif change == "last_dim":
        q, k, v = (torch.stack([t, torch.zeros_like(t)], -1)[..., 0] for t in (q, k, v))
    else:
        q, k, v = (t.half() for t in (q, k, v))
    for _ in range(2):
        _check_grads(q, k, v, mask, layout)
    # (a last dim that is not contiguous is copied before the key is taken: the first launch serves it)
    assert len(backward_builds) == (1 if change == "last_dim" else 2)


def test_backward_with_dlse_of_other_strides_than_lse():
    """``dlse`` enters the preprocess with lse's strides: a dlse laid out otherwise (here the transpose of a
    (B, N, H) buffer) gives the same gradients as its contiguous copy."""
    mask, layout = _layout(seed=13, heads=2)
    q, k, v = make_qkv(1, 2, N, N, D, seed=13)
    dlse = torch.randn(1, N, 2).transpose(1, 2)
    assert not dlse.is_contiguous()
    torch.manual_seed(0)
    strided = _check_grads(q, k, v, mask, layout, dlse=dlse)
    torch.manual_seed(0)
    dense = _check_grads(q, k, v, mask, layout, dlse=dlse.contiguous())
    for got, want in zip(strided, dense):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
