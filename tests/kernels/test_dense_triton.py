"""The in-repo dense Triton kernels (the sparse kernels' yardstick) against the fp32 dense oracle.

On CPU they run through the Triton interpreter (conftest sets TRITON_INTERPRET=1): small sizes,
fp32 and fp16 (the interpreter's bf16 dot is wrong). The TMA load path (sm_90) runs in the
interpreter too, by pretending the device is an sm_90.
"""

import pytest
import torch
import torch.nn.functional as F

from dit_accel.kernels import available_backends
from dit_accel.kernels.dense import DENSE_CONTENDERS, dense_attention, dense_contenders
from dit_accel.kernels.dense import triton as dense_triton
from tests.utils import DEVICE, DT, TOL, assert_attention_close, assert_grads_close, make_qkv

pytestmark = pytest.mark.skipif(available_backends(DEVICE)["triton"] is not None, reason="triton cannot run here")

CASES = [(63, 63, 64, torch.float32), (130, 100, 80, torch.float16), (40, 257, 64, torch.float16)]


@pytest.mark.parametrize("n,m,d,dtype", CASES, ids=[f"N{n}-M{m}-D{d}-{DT[t]}" for n, m, d, t in CASES])
@pytest.mark.parametrize("arch", [80, 90], ids=["pointers", "tma"])
def test_dense_forward_backward_match_reference(monkeypatch, n, m, d, dtype, arch):
    monkeypatch.setattr(dense_triton, "_arch", lambda device: arch)
    q, k, v = make_qkv(1, 2, n, m, d, dtype, seed=n, requires_grad=True)
    o, lse = dense_attention(q, k, v, return_lse=True)
    assert_attention_close(o, lse, q, k, v, None)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    assert_grads_close(grads, q, k, v, None, do)


def test_dense_strided_inputs_custom_scale():
    """(B, N, H, D) storage seen as (B, H, N, D), like Diffusers' projections."""
    q, k, v = (torch.randn(1, 70, 2, 64).transpose(1, 2).to(DEVICE) for _ in range(3))
    o = dense_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=TOL[torch.float32][0],
                               rtol=TOL[torch.float32][0])


def test_dense_contenders_run_and_agree():
    q, k, v = make_qkv(1, 1, 64, 64, 64, torch.float32)
    contenders = dense_contenders(q, k, v)
    assert list(contenders) == [name for name in DENSE_CONTENDERS if name in contenders]
    assert DENSE_CONTENDERS[1] in contenders  # triton runs here (interpreter)
    ref = contenders[DENSE_CONTENDERS[0]]()
    for name, fn in contenders.items():
        # (fp32 through Triton's tl.dot is tf32 on a GPU: TOL's looser fp32 tolerance there)
        torch.testing.assert_close(fn(), ref, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][0],
                                   msg=lambda m: f"{name}: {m}")


def test_dense_rejects_bad_inputs():
    q = torch.zeros(1, 1, 8, 300)
    with pytest.raises(ValueError, match="D <= 256"):
        dense_attention(q, q, q)
    with pytest.raises(ValueError, match="4 dims"):
        dense_attention(q[0], q[0], q[0])


@pytest.mark.parametrize("m", [128, 100], ids=["even-keys", "ragged-keys"])
@pytest.mark.parametrize("d", [128, 80])
def test_dense_ws_forward_on_sm90(monkeypatch, m, d):
    """sm_90, fp16 / bf16, head dim <= 128, TMA-aligned: the launcher picks the warp-specialized kernel
    (one loop over descriptors made in the kernel; the ragged last key tile masked in that loop)."""
    from dit_accel.kernels.dense import configs

    monkeypatch.setattr(dense_triton, "_arch", lambda device: 90)
    monkeypatch.setenv("DIT_ACCEL_WS", "1")  # the ws forward is opt-in
    _pretend_ws_applies(monkeypatch)
    picked = []
    select, real, enabled = configs.tile_rules()  # (the block-sparse rules the dense kernel mirrors)
    monkeypatch.setattr(configs, "_TILE_RULES", [(select, lambda *a: picked.append(real(*a)) or picked[-1], enabled)])
    q, k, v = make_qkv(1, 2, 70, m, d, torch.float16, seed=m + d)
    o, lse = dense_triton.dense_forward(q, k, v, d ** -0.5)
    assert_attention_close(o, lse, q, k, v, None)
    assert picked and picked[-1].ws and picked[-1].num_warps == 4


def _pretend_ws_applies(monkeypatch):
    """The ws variant applies on sm_90 only (``selfcheck.usable`` says no elsewhere): pretend this is one."""
    import dataclasses

    from dit_accel.kernels import selfcheck as _sc

    name = "block_sparse.triton.fwd_ws"
    monkeypatch.setitem(_sc._REGISTRY, name, dataclasses.replace(_sc.variant(name), applies=lambda device: None))
