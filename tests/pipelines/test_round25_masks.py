"""Round 25 (trust): every key-mask form Plan.run takes, against SDPA with the same mask restricted by the
method's pattern (Dense plans: exactly SDPA); forms it cannot honour are refused naming key_mask."""

import pytest
import torch
import torch.nn.functional as F

import dit_accel
from dit_accel.patterns import gna_mask

GRID, NV, NT, B, H, D = (2, 3, 5), 30, 6, 2, 2, 16
S = NV + NT
METHOD = dit_accel.GNA(kernel_size=(2, 3, 3))


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(3)]


def _padded():
    """Sample 0 keeps 4 text keys, sample 1 one (text first)."""
    m = torch.ones(B, 1, 1, S, dtype=torch.bool)
    m[0, ..., 4:NT] = False
    m[1, ..., 1:NT] = False
    return m


def _bias(mask, fill=float("-inf")):
    return mask.float() if mask.is_floating_point() else torch.zeros(mask.shape).masked_fill(~mask, fill)


def _reference(q, k, v, key_bias, pattern=True):
    allowed = torch.ones(S, S, dtype=torch.bool)
    if pattern:
        allowed[NT:, NT:] = gna_mask(GRID, METHOD.kernel_size)
    bias = torch.zeros(S, S).masked_fill(~allowed, float("-inf")) + key_bias
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)


def _forms():
    pad = _padded()
    small = torch.zeros(B, 1, 1, S)
    small[..., :NT] = torch.linspace(-0.7, 0.9, B * NT).reshape(B, 1, 1, NT)  # a real text bias
    hidden = torch.ones(B, 1, 1, S, dtype=torch.bool)
    hidden[0, ..., :NT] = False  # every text key of sample 0
    return {"bool": pad, "all-true": torch.ones(B, 1, 1, S, dtype=torch.bool), "broadcast-1": pad[:1],
            "float-inf": _bias(pad), "float-1e4": _bias(pad, -10000.0),
            "float-finfo-min": _bias(pad, torch.finfo(torch.float32).min), "float-text-bias": small,
            "hide-all-text": hidden, "hide-all-text-float": _bias(hidden)}


@pytest.mark.parametrize("dense", [False, True], ids=["gna", "dense"])
@pytest.mark.parametrize("form", list(_forms()))
def test_key_mask_forms_equal_masked_sdpa(form, dense):
    mask = _forms()[form]
    plan = (dit_accel.Dense() if dense else METHOD).plan(GRID)
    q, k, v = _qkv()
    out, _ = plan.run(q, k, v, num_text=NT, text_first=True, key_mask=mask, backend="torch")
    torch.testing.assert_close(out, _reference(q, k, v, _bias(mask), pattern=not dense), atol=1e-5, rtol=1e-5)


def test_all_true_mask_equals_no_mask():
    plan = METHOD.plan(GRID)
    q, k, v = _qkv()
    with_mask, _ = plan.run(q, k, v, num_text=NT, text_first=True, key_mask=torch.ones(1, 1, 1, S, dtype=torch.bool),
                            backend="torch")
    without, _ = plan.run(q, k, v, num_text=NT, text_first=True, backend="torch")
    torch.testing.assert_close(with_mask, without, atol=0, rtol=0)


def test_fp32_bias_with_bf16_q():
    q, k, v = _qkv(torch.bfloat16)
    mask = _bias(_padded(), -10000.0)
    out, _ = METHOD.plan(GRID).run(q, k, v, num_text=NT, text_first=True, key_mask=mask, backend="torch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference(q, k, v, mask), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dense", [False, True], ids=["gna", "dense"])
@pytest.mark.parametrize("num_text", [NT, 0], ids=["joint", "video-alone"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_on_a_video_key_is_refused(kind, num_text, dense):
    """Before: the sparse part (and DensePlan's video branch) ran the video keys unmasked: 0.38 off, silently."""
    plan = (dit_accel.Dense() if dense else METHOD).plan(GRID)
    q, k, v = (t[:, :, NT - num_text:] for t in _qkv())
    s = NV + num_text
    mask = torch.ones(B, 1, 1, s, dtype=torch.bool)
    mask[0, ..., num_text + 3] = False
    if kind == "float":
        mask = _bias(mask, -5.0)
    verb = "hides" if kind == "bool" else "biases"
    with pytest.raises(ValueError, match=f"key_mask {verb} video key {num_text + 3} of sample 0.*text keys only"):
        plan.run(q, k, v, num_text=num_text, text_first=True, key_mask=mask, backend="torch")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.float16])
def test_mask_dtype_sdpa_does_not_take_is_refused(dtype):
    """Before: int -> raw "masked_fill_ only supports boolean masks"; fp64/fp16 -> a raw SDPA dtype error."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"key_mask has dtype .*must be bool \(True = attend\) or a float bias"):
        METHOD.plan(GRID).run(q, k, v, num_text=NT, text_first=True, key_mask=_padded().to(dtype), backend="torch")


@pytest.mark.parametrize("shape,hint", [((B, S), r"mask\[:, None, None, :\]"), ((B, 1, S), r"mask\[:, None\]"),
                                        ((B, H, 1, S), "per head or per query"), ((B, 1, S, S), "per head or per query")],
                         ids=["B-S", "B-1-S", "B-H-1-S", "B-1-S-S"])
def test_other_mask_shapes_are_refused_with_what_to_do(shape, hint):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"key_mask must be a tensor of shape \(B or 1, 1, 1, S\).*{hint}"):
        METHOD.plan(GRID).run(q, k, v, num_text=NT, text_first=True,
                              key_mask=torch.ones(shape, dtype=torch.bool), backend="torch")


def test_text_query_mask_of_wrong_shape_is_refused():
    """Before: a raw SDPA broadcast error from the text queries' call."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"text_query_mask must be a tensor of shape .*\(2, 1, 6, 36\)"):
        METHOD.plan(GRID).run(q, k, v, num_text=NT, text_first=True, key_mask=_padded(),
                              text_query_mask=torch.zeros(B, 1, NT + 1, S), backend="torch")


# ------------------------------------------------------------------ the whole model: Bria FIBO takes the caller's mask
def _fibo():
    from dit_accel.models import tiny as T
    model = T.build_tiny_transformer("bria_fibo")
    kwargs = T.tiny_transformer_inputs("bria_fibo", model, batch=2, text_valid=[T.TRANSFORMER_TEXT["bria_fibo"], 3])
    return model, kwargs, T.TRANSFORMER_TEXT["bria_fibo"]


def _fibo_run(model, kwargs, mask, method=None):
    kwargs = dict(kwargs, joint_attention_kwargs={"attention_mask": mask})
    with torch.no_grad():
        if method is None:
            return model(**kwargs)[0], None, None
        with dit_accel.apply(model, method, backend="torch") as handle:
            out = model(**kwargs)[0]
            return out, handle.stats(), list(handle.warnings)


def test_whole_model_mask_hiding_an_image_token_runs_dense():
    """Before: the sparse image part ran the hidden image key unmasked: the output of the mask without it."""
    model, kwargs, text = _fibo()
    mask = kwargs["joint_attention_kwargs"]["attention_mask"].clone()
    method = dit_accel.GNA(kernel_size=(3, 5))
    sparse, rows, _ = _fibo_run(model, kwargs, mask, method)
    assert all(r["sparse_calls"] == 1 for r in rows)
    mask[0, ..., text + 2] = False  # in place: a new verdict (the mask's version changed)
    dense, _, _ = _fibo_run(model, kwargs, mask)
    out, rows, warnings = _fibo_run(model, kwargs, mask, method)
    assert all(r["sparse_calls"] == 0 and r["dense_calls"] == 1 for r in rows), rows
    assert any("hiding video tokens" in str(w) for w in warnings), warnings
    torch.testing.assert_close(out, dense, atol=0, rtol=0)
    assert (sparse - dense).abs().max() > 1e-3
