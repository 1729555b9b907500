"""How a wrapped processor's SDPA call is caught in eager mode (``hooks._AttributeRoute``).

The router replaces ``torch.nn.functional.scaled_dot_product_attention`` only while a wrapped
processor runs; a processor class whose SDPA call does not go through that attribute must be
caught by the mode instead (never silently run dense).
"""

import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask
from dit_accel.pipelines import hooks
from tests.utils import ReferenceAttention

ORIGINAL = F.scaled_dot_product_attention
BOUND = torch._C._nn.scaled_dot_product_attention  # what a module binding the function at import holds


class _Interceptor(hooks.SDPAInterceptor):
    """An interceptor whose route records the call and itself calls SDPA (as plans do)."""

    def __init__(self):
        TorchFunctionMode.__init__(self)
        self.routing, self.counting, self.caught = False, False, {"mode": 0, "attribute": 0}
        self.routed = 0

    def route(self, call):
        self.routed += 1
        out = F.scaled_dot_product_attention(call["query"], call["key"], call["value"])  # must pass through
        return out + 1.0


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 8, 4, generator=g) for _ in range(3)]


def test_the_probe_learns_which_way_a_processor_class_reaches_sdpa():
    route, (q, k, v) = hooks._AttributeRoute(), _qkv()
    dense = ORIGINAL(q, k, v)

    class ByAttribute:
        pass

    class ByBoundName:
        pass

    for _ in range(2):  # the first call probes (mode and router), the second runs the learnt way
        for kind, call in ((ByAttribute, lambda: F.scaled_dot_product_attention(q, k, v)),
                           (ByBoundName, lambda: BOUND(q, k, v))):
            interceptor = _Interceptor()
            out = route.run(interceptor, kind, call)
            assert interceptor.routed == 1
            torch.testing.assert_close(out, dense + 1.0)
            assert F.scaled_dot_product_attention is ORIGINAL  # the swap is undone
    assert route.by_attribute == {ByAttribute: True, ByBoundName: False}


def test_other_threads_and_nested_calls_pass_through_while_a_processor_runs():
    route, (q, k, v) = hooks._AttributeRoute(), _qkv()
    dense = ORIGINAL(q, k, v)
    seen = {}

    def other_thread():
        seen["other"] = F.scaled_dot_product_attention(q, k, v)

    def processor():
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        seen["swapped"] = F.scaled_dot_product_attention is not ORIGINAL
        return F.scaled_dot_product_attention(q, k, v)

    class Processor:
        pass

    route.by_attribute[Processor] = True  # router only
    out = route.run(_Interceptor(), Processor, processor)
    assert seen["swapped"]
    torch.testing.assert_close(seen["other"], dense)  # not routed: another thread's call
    torch.testing.assert_close(out, dense + 1.0)
    assert F.scaled_dot_product_attention is ORIGINAL


def test_the_wan_processor_is_routed_the_same_by_probe_router_and_mode():
    """The probe call, router-only calls and mode-only calls all give the masked dense reference."""
    model = T.build_tiny_transformer("wan").eval()
    inputs = T.tiny_transformer_inputs("wan", model, grid=(2, 4, 4))
    method = dit_accel.GNA(kernel_size=(2, 3, 3))
    kind = type(model.blocks[0].attn1.processor)
    with torch.no_grad():
        with ReferenceAttention(gna_mask((2, 4, 4), method.kernel_size), "none"):
            ref = model(**inputs)[0]
        hooks._ROUTE.by_attribute.pop(kind, None)
        with dit_accel.apply(model, method, backend="torch") as handle:
            outs = [model(**inputs)[0]]  # the probe
            assert hooks._ROUTE.by_attribute[kind] is True
            outs.append(model(**inputs)[0])  # the router alone
            hooks._ROUTE.by_attribute[kind] = False
            try:
                outs.append(model(**inputs)[0])  # the mode alone
            finally:
                hooks._ROUTE.by_attribute[kind] = True
            assert all(r["sparse_calls"] == 3 and r["dense_calls"] == 0 for r in handle.stats())
    for out in outs:
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert F.scaled_dot_product_attention is ORIGINAL
