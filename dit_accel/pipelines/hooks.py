"""The interception point: a transformer hook, a processor wrapper per attention layer, a scoped SDPA interceptor.

Mechanism (why it looks like this)
----------------------------------
Diffusers attention modules delegate their maths to a *processor*. Copying each
model's processor body would break on every Diffusers release, so dit_accel keeps
the model's own processor and wraps it:

1. :class:`TransformerHook` puts a forward pre-hook on the transformer. Per call
   it reads the token grid (the preset knows how), the denoising step
   (:class:`~.schedule.StepSource`) and, from the :class:`~.schedule.Schedule`,
   the plan each layer runs; that :class:`~.context.CallContext` is pushed on a
   per-thread stack and popped by a post-hook. Plans are built (and the grid
   rules checked) here, before any attention runs.
2. :class:`SparseAttnProcessor` replaces ``module.processor`` on the targeted
   self/joint attention modules only (the preset lists them). It calls the
   original processor unchanged; attributes Diffusers reads or sets on
   processors (``_attention_backend``, ``_parallel_config``, ...) reach the
   original, so enabling a Diffusers feature after ``apply`` configures the real
   processor and never silently bypasses it.
   Context parallelism is the exception: the wrapper keeps ``_parallel_config``
   itself and runs the collectives around the sparse call (:mod:`.parallel`), while
   the original processor computes on its own share; ``remove()`` hands the config back.
3. While that call runs, an :class:`SDPAInterceptor` sees every
   ``scaled_dot_product_attention`` call made inside the processor: Diffusers'
   native attention backend ends in exactly that call, and CogVideoX/Mochi
   processors call it directly. There q, k, v are projected, normalised and
   rotated (RoPE), laid out ``(B, H, S, D)``. Cross-attention (key length
   differs) and anything unrecognised go to the original SDPA unchanged; self
   and joint attention run the layer's plan. It sees the call in one of two ways:

   - as a :class:`torch.overrides.TorchFunctionMode`, which catches the call however
     the processor reaches it, and which ``torch.compile`` traces away; but in eager
     mode it costs a Python round trip on every torch op of the processor (about
     45 per layer call: 1.3 ms per call of the 2-layer tiny transformer at 320
     tokens, 30% of its time);
   - in eager mode, by :class:`_AttributeRoute`: while any wrapped processor runs,
     ``torch.nn.functional.scaled_dot_product_attention`` is a router that hands
     each thread's calls to the interceptor that thread is running (other threads'
     calls go straight through), so only the SDPA call costs anything. It catches
     only calls that look the function up on ``torch.nn.functional`` when they
     make it, as Diffusers' dispatcher and processors do. So the first call of each
     processor class runs under both, and the class takes the router alone only if
     the router, and not the mode, caught its SDPA calls.

All other state is in the hooks and the :class:`Runtime` they share.

Where each piece lives: the layer (:class:`SparseAttnProcessor`, :class:`Runtime`) in :mod:`.processor`, the
interception (:class:`SDPAInterceptor`) in :mod:`.interceptor`, the transformer hook and its call gate
(:class:`TransformerHook`) in :mod:`.transformer_hook`, the blocks that gradient checkpointing recomputes under
their own call's context in :mod:`.checkpointing`. This module names them all, as it always did.
"""

from __future__ import annotations

from .interceptor import SDPAInterceptor, _AttributeRoute, _dispatch_module, _key_padding_mask, _ROUTE, native_scope  # noqa: F401
from .processor import LayerReport, PlanCache, Runtime, SparseAttnProcessor, _backend_name, _with_signature  # noqa: F401
from .transformer_hook import TransformerHook, _module_call_frame, attention_modules  # noqa: F401

__all__ = ["SparseAttnProcessor", "SDPAInterceptor", "TransformerHook", "Runtime", "PlanCache",
           "attention_modules", "LayerReport"]
