"""SLA's eager calls decide their checks and backend once per call signature (kernels/sla/api.py ``_prepare``) and
the launchers build their arguments once per signature: what must still be seen on every call is."""
import pytest
import torch

from dit_accel.kernels.sla import api, sla_attention
from dit_accel.methods import SLA


def _qkv(n=256, d=64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, d, generator=gen) for _ in range(3)]


def test_a_cached_signature_still_checks_the_projection_and_the_scale_type():
    q, k, v = _qkv()
    method = SLA(topk=0.25)
    sla_attention(q, k, v, method, None, scale=1)
    sla_attention(q, k, v, method, torch.nn.Linear(64, 64), scale=1)
    assert any(key[0] == method for key in api._PREPARED)  # the signature is cached
    with pytest.raises(ValueError, match="Linear\\(64, 64\\)"):
        sla_attention(q, k, v, method, torch.nn.Linear(64, 32), scale=1)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        sla_attention(q, k, v, method, None, scale=True)  # True == 1 and hashes alike: not the cached entry


def test_the_backend_override_is_read_on_every_call(monkeypatch):
    q, k, v = _qkv()
    method = SLA(topk=0.25)
    assert sla_attention(q, k, v, method, return_parts=True)[3]["backend"] == "torch"
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "bogus")
    with pytest.raises(ValueError):
        sla_attention(q, k, v, method)


def test_a_mutable_config_is_read_on_every_call():
    """Only frozen configs key the cache: another object with SLA's attributes may change between calls."""
    class Config:
        topk, negligible, block_q, block_k = 0.25, 0.0, 64, 64
        feature_map, linear_tokens = "softmax", "marginal"

    q, k, v = _qkv()
    config = Config()
    assert sla_attention(q, k, v, config, return_parts=True)[3]["density"] == 0.25
    config.topk = 0.5
    assert sla_attention(q, k, v, config, return_parts=True)[3]["density"] == 0.5


def test_cached_calls_give_the_uncached_outputs():
    q, k, v = _qkv(n=200)
    method = SLA(topk=0.3, negligible=0.2)
    proj = torch.nn.Linear(64, 64)
    api._PREPARED.clear()
    first = sla_attention(q, k, v, method, proj)
    second = sla_attention(q, k, v, method, proj)
    assert torch.equal(first, second)
