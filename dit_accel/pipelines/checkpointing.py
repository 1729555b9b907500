"""Gradient checkpointing under dit_accel: a recomputed block runs under its own call's grid and plans.

Diffusers' ``enable_gradient_checkpointing()`` sets ``_gradient_checkpointing_func`` on the transformer (and on
every submodule with a ``gradient_checkpointing`` flag); the forward runs each block through it, and the backward
pass calls the block again to recompute it. By then the call's context is off the stacks, and a recomputed
layer borrowed the most recent call's (:meth:`~.context.ContextStack.current`): with two forwards before one
backward (``(loss_a + loss_b).backward()``, a teacher pass after the student's), the first call's blocks were
recomputed on the second call's grid and plans, and their gradients were wrong without a word (or torch's
checkpoint refused the recomputed shapes). :class:`KeepsCallContext` wraps that function while dit_accel is
applied: each block it runs carries the context and layer plans of the call that ran it, and puts them on the
stacks whenever it runs, the recompute included.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from .context import run_eagerly, tracing

__all__ = ["KeepsCallContext", "checkpointing_modules", "keep_call_context", "restore_checkpointing"]

_FUNC = "_gradient_checkpointing_func"


class _InCallContext:
    """A block as the checkpointing function calls it (``block.__call__`` or ``block(...)``), run under the context
    and layer plans captured when its call first ran it; other attributes are the block's."""

    __slots__ = ("block", "hook", "context", "plans")

    def __init__(self, block, hook, context, plans):
        self.block, self.hook, self.context, self.plans = block, hook, context, plans

    def __call__(self, *args, **kwargs):
        hook = self.hook
        hook.stack.push(self.context)
        for layer, plan in zip(hook.layers, self.plans):
            layer.plans.push(plan)
        try:
            return self.block(*args, **kwargs)
        finally:
            hook.stack.pop()
            for layer in hook.layers:
                layer.plans.pop()

    def __getattr__(self, name):
        return getattr(self.block, name)


class KeepsCallContext:
    """``_gradient_checkpointing_func`` while dit_accel is applied: the original, given each block wrapped in its
    call's context (a call without gradients, which recomputes nothing, gets the original as it was).

    Code that torch.compile traces runs the checkpointed block eagerly (a graph break): Dynamo cannot trace
    dit_accel's interception inside ``torch.utils.checkpoint`` ("Unsupported HOP: side effect", which named
    nothing of dit_accel's), and the block it handed on to the eager call was unwrapped, so with two forwards before
    one backward the first call's blocks were recomputed under the second call's plans (wrong gradients, unsaid)."""

    __slots__ = ("original", "hook")

    def __init__(self, original, hook):
        self.original, self.hook = original, hook

    def __call__(self, block, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.original(block, *args, **kwargs)
        if tracing():
            return _run_eagerly(self, block, args, kwargs)
        hook = self.hook
        context = hook.stack.current()
        if context is None:
            return self.original(block, *args, **kwargs)
        plans = [layer.plans.current() for layer in hook.layers]
        return self.original(_InCallContext(block, hook, context, plans), *args, **kwargs)


_EAGER_REASON = ("dit_accel: with gradient checkpointing, each checkpointed block runs eagerly under torch.compile "
                 "(torch.utils.checkpoint cannot trace dit_accel's attention interception). Compile the blocks "
                 "instead (transformer.compile_repeated_blocks(fullgraph=True)), compile without fullgraph=True, or "
                 "call transformer.disable_gradient_checkpointing()")


def _eagerly(checkpointing: KeepsCallContext, block, args, kwargs):
    return checkpointing(block, *args, **kwargs)


_run_eagerly = run_eagerly(_eagerly, _EAGER_REASON)


def checkpointing_modules(transformer: nn.Module) -> List[nn.Module]:
    """The modules of ``transformer`` that Diffusers' ``enable_gradient_checkpointing`` sets a function on."""
    return [m for m in transformer.modules() if hasattr(m, "gradient_checkpointing")]


def keep_call_context(modules: List[nn.Module], hook) -> None:
    """Wrap the checkpointing function of each of ``modules`` that checkpoints (once: a wrapper stays until
    :func:`restore_checkpointing`; a function set since, by ``enable_gradient_checkpointing``, is wrapped anew)."""
    for module in modules:
        func = module.__dict__.get(_FUNC)
        if func is None or not getattr(module, "gradient_checkpointing", False):
            continue
        if isinstance(func, KeepsCallContext):
            if func.hook is hook:
                continue
            func = func.original  # (another handle's, which it would have put back)
        module.__dict__[_FUNC] = KeepsCallContext(func, hook)


def restore_checkpointing(modules: List[nn.Module], hook) -> None:
    """Put back the functions :func:`keep_call_context` wrapped for ``hook``."""
    for module in modules:
        func = module.__dict__.get(_FUNC)
        if isinstance(func, KeepsCallContext) and func.hook is hook:
            module.__dict__[_FUNC] = func.original
