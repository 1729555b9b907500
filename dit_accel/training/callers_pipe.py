"""What a run changes on a pipeline the caller passed in as ``model``, kept so that a failed run gives it back
exactly: the tensors its cast to the run's dtype and device replaced (fp32 values do not survive a cast to bf16 and
back), and a dit_accel handle applied to it before the run (apply() would remove that one for good)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class KeptTensors:
    """The parameters and buffers a cast of the pipeline's modules replaced, with their original tensors:
    :meth:`restore` puts those back (bit for bit, on their devices). An original on an accelerator whose
    replacement stays on that device is kept as a CPU copy, so the run does not hold two copies there."""

    def __init__(self, pipe):
        components = getattr(pipe, "components", None)
        modules = [m for m in (components or {}).values() if isinstance(m, nn.Module)]
        self._entries = []  # (module, "p" or "b", name, the original Parameter or buffer, its original data)
        seen = set()
        for component in modules:
            for module in component.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                for name, p in module._parameters.items():
                    if p is not None:
                        self._entries.append((module, "p", name, p, p.data))
                for name, b in module._buffers.items():
                    if b is not None:
                        self._entries.append((module, "b", name, b, b))

    def _now(self, module, kind: str, name: str):
        current = (module._parameters if kind == "p" else module._buffers).get(name)
        return current.data if kind == "p" and current is not None else current

    def keep_changed(self) -> None:
        """After the cast: forget what it left as it was; move accelerator originals of what it cast to the CPU."""
        kept = []
        for module, kind, name, obj, data in self._entries:
            now = self._now(module, kind, name)
            if now is not None and now.data_ptr() == data.data_ptr() and now.dtype == data.dtype \
                    and now.device == data.device:
                continue
            if data.device.type != "cpu" and now is not None and now.device == data.device:
                data = (data.detach().to("cpu", copy=True), data.device)
            kept.append((module, kind, name, obj, data))
        self._entries = kept

    def restore(self) -> None:
        """The original tensors back in place (and the original Parameter objects, where the cast made new ones)."""
        for module, kind, name, obj, data in self._entries:
            if isinstance(data, tuple):
                data = data[0].to(data[1])
            if kind == "p":
                module._parameters[name] = obj
                obj.data = data
            else:
                module._buffers[name] = data
        self._entries = []


def cast_keeping(pipe, device, dtype) -> KeptTensors:
    """``pipe`` moved to ``device`` (and cast to ``dtype`` unless fp32, as a loaded model would be), with what the
    cast replaced kept for :meth:`KeptTensors.restore`; a cast that fails half-way is undone before it raises."""
    kept = KeptTensors(pipe)
    try:
        pipe.to(device=device, dtype=dtype) if dtype != torch.float32 else pipe.to(device)
    except BaseException:
        kept.restore()
        raise
    kept.keep_changed()
    return kept


class ParkedHandles:
    """The caller's live dit_accel handles on ``transformer``, set aside for the run's own apply(), as apply() sets
    aside the handles it replaces (:func:`~dit_accel.pipelines.apply.suspend_handles`): their processors go back to
    the originals, and their hooks stay but let every call through while the run trains. A failed run puts them
    back exactly as they were (:meth:`restore`); a run that succeeds removes them as apply() would have
    (:meth:`release`). A handle another running thread holds is refused, as apply() refuses it."""

    def __init__(self, transformer):
        from ..pipelines.apply import refuse_other_threads, suspend_handles

        found = [("", transformer)]
        refuse_other_threads(found)
        self._handles = suspend_handles(found, "finetune()")
        for old in self._handles:
            old.removed = True  # (apply() leaves it alone, and its methods say it is not in use)
            old._gate.finish()  # its hooks, still in place, run every call as the model's own

    def restore(self) -> None:
        """The run failed: the handles are active again, as before it."""
        from ..pipelines.apply import restore_handles

        handles, self._handles = self._handles, []
        for old in handles:
            old.removed = False
        restore_handles(handles)

    def release(self, new_handle) -> None:
        """The run's student stays: the parked handles go for good, as apply() replacing them would do."""
        from ..pipelines.apply import retire_handles

        handles, self._handles = self._handles, []
        for old in handles:
            old.removed = False  # (parked, not yet removed: the warning names it as the caller held it, active)
        retire_handles(handles, new_handle, new_handle._runtime.warnings.warn, "finetune()", "the trained student")

    def __bool__(self) -> bool:
        return bool(self._handles)


def park_handles(transformer) -> Optional[ParkedHandles]:
    """:class:`ParkedHandles` of ``transformer``, or None when it holds no live handle."""
    parked = ParkedHandles(transformer)
    return parked if parked else None
