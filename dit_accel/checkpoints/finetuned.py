"""The fine-tuned weights folder: a Diffusers LoRA plus the SLA projections, written by ``dit-accel finetune``.

An output folder of ``dit-accel finetune`` holds::

    pytorch_lora_weights.safetensors   Diffusers-format LoRA ("transformer." keys, adapter
                                       metadata with rank/alpha): pipe.load_lora_weights(DIR);
                                       absent when files.lora is null (a converted checkpoint
                                       without LoRA, see dit_accel.checkpoints.convert)
    sla_projections.safetensors        SLA only: "<attention module>.weight"/".bias" per layer
    vsa_gates.safetensors              VSA only: the trained gates in FastVideo's Diffusers key layout,
                                       "blocks.N.to_gate_compress.weight"/".bias" (apply(..., weights=DIR)
                                       loads them through dit_accel.pipelines.vsa_gates)
    dit_accel_method.json              the method config and LoRA settings the weights belong to, and
                                       the sha256 of the files above: written last, checked on load,
                                       so a folder whose writer was killed half-way refuses to load.
                                       Trained under a calibrated plan (``finetune --plan``), the
                                       method is ``{"method": "plan", "plan": <the plan's JSON>}`` and
                                       ``plan_sha256`` its content hash; the SLA projections then exist
                                       for the layers where the plan runs SLA heads

Load everything in one line::

    handle = dit_accel.apply(pipe, dit_accel.training.load_method(DIR), weights=DIR)

or load the LoRA with Diffusers first; ``apply`` then finds it on the transformer (same tensors) and adds
only the SLA projections (it refuses a folder whose LoRA is loaded twice, or when another LoRA over the same
modules is loaded instead)::

    pipe.load_lora_weights(DIR)
    handle = dit_accel.apply(pipe, dit_accel.training.load_method(DIR), weights=DIR)

It sits below both :mod:`dit_accel.pipelines` (``apply(..., weights=DIR)`` loads it
with :func:`load_into`) and :mod:`dit_accel.training` (which writes it), so neither
imports the other.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..atomic_files import (BadFileError, atomic_write_json, check_hashes, crash_point, file_hashes, folders_to_make,
                            load_safetensors, read_json, remove_empty, remove_stale_temps, temp_name)
from .._util import DitAccelWarning, file_in_the_way
from ..methods import Method, method_from_name
from ..plans.per_head import PerHead
from ..plans.plan_json import _tuples
from ..plans.sparse_plan import PlanMethod, SparsePlan
from .lora_checks import (check_float_weights, check_lora_coverage, check_lora_modules, check_lora_pairs,
                          check_lora_not_merged, check_lora_scales, injection_state, lora_module_name, lora_sketch,
                          undo_injection)
from .vsa_gates import finish_saved_set

__all__ = [
    "LORA_FILE", "SLA_FILE", "VSA_FILE", "METHOD_FILE", "RUN_FILE", "ADAPTER_NAME",
    "save_trained_weights", "load_into", "load_trained_weights", "load_method", "read_weights_info", "lora_state_dict",
    "sla_state_dict", "method_from_dict", "saved_method", "loaded_lora_adapter", "write_weights_folder", "check_plan_fits",
    "check_method_fits",
]
#: What to do about a weights file with NaN/inf or non-float tensors.
_REDO = "train or convert it again"

LORA_FILE = "pytorch_lora_weights.safetensors"
SLA_FILE = "sla_projections.safetensors"
VSA_FILE = "vsa_gates.safetensors"
METHOD_FILE = "dit_accel_method.json"
RUN_FILE = "finetune_run.json"  # a `dit-accel finetune` run's record in its output folder (dit_accel.training writes it)
FORMAT = 1  # the newest layout of METHOD_FILE this dit_accel reads (and the one it writes)
ADAPTER_NAME = "dit_accel"


def _lora_mixin():
    # The LoRA loader of Wan pipelines; classmethods work without a pipeline instance.
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    return WanLoraLoaderMixin


def _json_roundtrip(d: dict) -> dict:
    return json.loads(json.dumps(d))


def lora_state_dict(transformer: nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """peft LoRA tensors of ``transformer`` (keys without the ``transformer.`` prefix), detached fp32 copies."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def sla_state_dict(projections: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """``{"<layer>.weight": ..., "<layer>.bias": ...}`` fp32 copies of SLA projections."""
    out = {}
    for name, module in projections.items():
        for pname, p in module.named_parameters():
            out[f"{name}.{pname}"] = p.detach().float().cpu().contiguous()
    return out


def save_trained_weights(output_dir, *, transformer: nn.Module, method: Method, lora_config,
                         sla_projections: Optional[Dict[str, nn.Module]] = None, extra: Optional[dict] = None,
                         adapter_name: str = "default", vsa_gates: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write the LoRA (Diffusers format), the SLA projections and the method file to ``output_dir``.

    All or nothing: the tensors are written to temporary files, renamed into place, and the method file,
    which records their sha256, comes last; :func:`load_into` checks them, so a folder whose writer was
    killed half-way is refused (naming the file) instead of mixing two runs' tensors.
    ``lora_config=None`` writes no LoRA (``files.lora`` is null). ``vsa_gates``: VSA's trained gates as
    ``{"blocks.N.to_gate_compress.weight": ..., ...}`` (FastVideo's key layout), written to :data:`VSA_FILE`.
    """
    if not isinstance(method, Method):
        raise TypeError(f"method={method!r} is invalid: the dit_accel method config the weights were trained for "
                        "(e.g. dit_accel.SLA(topk=0.05))")
    adapters = list(getattr(transformer, "peft_config", None) or {})
    if lora_config is not None and adapter_name not in adapters:  # (before: AttributeError/KeyError, an empty folder)
        raise ValueError(f"adapter_name={adapter_name!r}: the transformer has no such LoRA adapter (its adapters: "
                         f"{adapters}); name the adapter that was trained, or pass lora_config=None to write no LoRA")
    info = {
        "format": FORMAT,
        "method": _json_roundtrip(method.to_dict()),
        "files": {"lora": LORA_FILE if lora_config is not None else None,
                  "sla_projections": SLA_FILE if sla_projections else None,
                  **({"vsa_gates": VSA_FILE} if vsa_gates else {})},
        **(extra or {}),
    }
    if lora_config is not None:
        metadata = lora_config.to_dict()
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
        targets = lora_config.target_modules
        info["lora"] = {"rank": lora_config.r, "alpha": lora_config.lora_alpha,
                        "target_modules": sorted(targets) if not isinstance(targets, str) else targets,
                        "sketch": lora_sketch(transformer, adapter_name)}  # (check_lora_not_merged reads it)

    def write_tensors(staging: Path) -> None:
        if lora_config is not None:
            _lora_mixin().save_lora_weights(
                staging, transformer_lora_layers=lora_state_dict(transformer, adapter_name),
                transformer_lora_adapter_metadata=metadata, weight_name=LORA_FILE,
            )
        if sla_projections:
            from safetensors.torch import save_file

            save_file(sla_state_dict(sla_projections), str(staging / SLA_FILE))
        if vsa_gates:
            from safetensors.torch import save_file

            save_file({k: v.detach().float().cpu().contiguous() for k, v in vsa_gates.items()},
                      str(staging / VSA_FILE))

    write_weights_folder(output_dir, write_tensors, info)


def write_weights_folder(output_dir, write_tensors, info: dict) -> Path:
    """The weights folder protocol (also used by :mod:`dit_accel.checkpoints.convert`): ``write_tensors(staging)`` writes
    the files ``info["files"]`` names into a staging folder; they are moved into ``output_dir`` and the method
    file, with their sha256, is written last. Files of an earlier folder that ``info`` no longer names
    (``LORA_FILE``/``SLA_FILE``) are removed after it."""
    out = Path(output_dir).expanduser()  # (before: "~/weights" was written to a folder named "~" in the working one)
    _check_folder_path(out)
    made = folders_to_make(out)  # (before: only the last one was taken back on a failure, its parents stayed)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    names = [n for n in (info.get("files") or {}).values() if n]
    staging = temp_name(out / "weights")
    staging.mkdir()
    try:
        write_tensors(staging)
        info = {**info, "sha256": file_hashes(staging, names)}
        for name in names:
            crash_point()
            os.replace(staging / name, out / name)
        crash_point()
        atomic_write_json(out / METHOD_FILE, info)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty(made)  # the folders this call made and could not fill: gone again, not left empty
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in (LORA_FILE, SLA_FILE, VSA_FILE):
        if stale not in names:
            (out / stale).unlink(missing_ok=True)
    return out


def _check_folder_path(out: Path) -> None:
    """ValueError naming ``out`` when a file stands where the weights folder (or a folder above it) would go: before,
    a raw ``FileExistsError`` (``save_pretrained("model.safetensors")``, whose own save only logs the mistake)."""
    in_the_way = file_in_the_way(out)
    if in_the_way is not None:
        where = "is a file" if in_the_way == out else f"lies under {str(in_the_way)!r}, which is a file"
        example = str(in_the_way.parent / "weights")
        raise ValueError(f"{str(out)!r} {where}: the weights are written to a folder (e.g. {example!r}); give a "
                         "folder path")


def _run_of_checkpoint(folder: Path) -> Optional[Path]:
    """The run folder of ``folder`` when it is a run's ``checkpoints`` folder or a ``checkpoints/step-N`` in it (the
    layout of dit_accel.training.config.CKPT_DIR, a layer above this one)."""
    if folder.name == "checkpoints":
        run = folder.parent
    elif folder.name.startswith("step-") and folder.parent.name == "checkpoints":
        run = folder.parent.parent
    else:
        return None
    return run if (run / RUN_FILE).is_file() else None


def _read_info(folder: Path) -> dict:
    if not folder.is_dir():
        raise ValueError(f"weights={str(folder)!r} is not a folder; pass the output folder of `dit-accel finetune`.")
    path = folder / METHOD_FILE
    finish_saved_set(folder, path)  # (save_pretrained under dit_accel writes the folder with the model, as one set)
    if not path.is_file():
        if (folder / RUN_FILE).is_file():  # (before: "is it the output folder of `dit-accel finetune`?" of one)
            raise ValueError(f"weights={str(folder)!r} is a `dit-accel finetune` run that has not finished (no "
                             f"{METHOD_FILE} yet: a run writes its weights folder at its end): resume it with "
                             f"`dit-accel finetune --resume --output {folder}` (the same flags), or give a finished "
                             "run's folder")
        run = _run_of_checkpoint(folder)
        if run is not None:  # (before: "is it the output folder of `dit-accel finetune`?" of the run's own checkpoint)
            what = "the checkpoints folder" if folder.name == "checkpoints" else "a training checkpoint"
            raise ValueError(f"weights={str(folder)!r} is {what} of the `dit-accel finetune` run in "
                             f"{str(run)!r}, not a weights folder: pass weights={str(run)!r} (a run writes its weights "
                             "folder at its end; one that has not finished resumes with `dit-accel finetune --resume "
                             f"--output {run}`, the same flags)")
        raise ValueError(f"weights={str(folder)!r} has no {METHOD_FILE}; is it the output folder of `dit-accel finetune`?")
    expected = ("the JSON object `dit-accel finetune` writes: {\"method\": {...}, \"files\": {...}, ...}")
    info = read_json(path, expected=expected)
    version = info.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BadFileError(path, f"its \"format\" is {str(version)[:40]!r}",
                           f"a whole number, the layout version `dit-accel finetune` writes ({FORMAT})")
    if version > FORMAT:
        raise BadFileError(path, f"its \"format\" is {version}, written by a newer dit-accel; this dit_accel reads "
                                 f"up to {FORMAT}", "a folder this version can read: upgrade dit-accel to load it")
    if not isinstance(info.get("method"), dict) or not isinstance(info["method"].get("method"), str):
        raise BadFileError(path, f"its \"method\" entry is {str(info.get('method'))[:60]!r}",
                           "a method config such as {\"method\": \"sla\", \"topk\": 0.05, ...}")
    files = info.get("files", {})
    if not isinstance(files, dict) or not all(
            v is None or (isinstance(v, str) and v and Path(v).name == v and not v.startswith("."))
            for v in files.values()):
        raise BadFileError(path, f"its \"files\" entry is {str(files)[:60]!r}",
                           "{\"lora\": FILE or null, \"sla_projections\": FILE or null}, names inside the folder")
    return info


def read_weights_info(folder) -> dict:
    """The contents of a fine-tuned folder's ``dit_accel_method.json`` (method, LoRA settings, dense_layers, shape)."""
    return _read_info(weights_folder(folder))


def weights_folder(folder) -> Path:
    """A weights folder's path as a Path: TypeError/ValueError naming it unless it is a str or os.PathLike, and not
    empty (which would name the current folder). The one check of a ``weights=`` path."""
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
        raise (ValueError if isinstance(folder, str) else TypeError)(
            f"weights={folder!r} is invalid: expected the path of a weights folder (str or os.PathLike) written by "
            "dit-accel finetune or dit-accel convert")
    return Path(folder).expanduser()


def method_from_dict(d: dict) -> Method:
    """The method config of a ``Method.to_dict()`` read back from JSON (lists become tuples again); a plan's
    ``{"method": "plan", "plan": {...}}`` gives its :class:`~dit_accel.plans.sparse_plan.PlanMethod`."""
    d = dict(d)
    name = d.pop("method")
    if name == PlanMethod.name:
        if not isinstance(d.get("plan"), dict):
            raise ValueError(f"a plan entry needs \"plan\": the SparsePlan's JSON object; got {d.get('plan')!r}")
        return SparsePlan.from_json(d["plan"]).as_method()
    if name == PerHead.name:  # (save_pretrained under apply(pipe, PerHead(...)) writes one; it was refused on load)
        heads = d.get("heads")
        if set(d) != {"heads"} or not isinstance(heads, list) or not all(isinstance(h, dict) for h in heads):
            raise ValueError(f"a per_head entry is {{\"method\": \"per_head\", \"heads\": [one method config per "
                             f"head]}}; got {str(d)[:80]}")
        return PerHead(tuple(method_from_dict(h) for h in heads))
    return method_from_name(name, **{k: _tuples(v) for k, v in d.items()})  # JSON turned tuples into lists


def load_method(folder):
    """The method config a fine-tuned folder was trained with (for ``apply(pipe, load_method(DIR), weights=DIR)``):
    a :class:`~dit_accel.Method`, or the :class:`~dit_accel.SparsePlan` of a ``finetune --plan`` run."""
    folder = weights_folder(folder)
    method = saved_method(folder, _read_info(folder))
    return method.sparse_plan if isinstance(method, PlanMethod) else method


def saved_method(folder: Path, info: dict) -> Method:
    """The method config a weights folder's ``info`` (its method file) records; a plan's content checked against the
    hash recorded when it was trained (BadFileError naming the file)."""
    try:
        method = method_from_dict(info["method"])
    except (ValueError, TypeError, KeyError) as err:
        raise BadFileError(folder / METHOD_FILE, f"its method config is not valid ({err})",
                           "the method config `dit-accel finetune` wrote (e.g. {\"method\": \"sla\", \"topk\": 0.05})"
                           ) from None
    trained = info.get("plan_sha256")
    if isinstance(method, PlanMethod) and trained is not None and trained != method.sparse_plan.content_hash():
        # (before: a plan edited in the method file loaded, and its weights ran under it, without a word)
        raise BadFileError(folder / METHOD_FILE, f"its plan has content sha256 {method.sparse_plan.content_hash()[:12]}"
                           f", but the weights were trained under the plan of content sha256 {str(trained)[:12]} "
                           "(its plan_sha256): the plan was changed after training",
                           "the plan `dit-accel finetune --plan` wrote: put the trained plan back, or fine-tune "
                           "under the new one")
    return method


def _warn(message: str) -> None:
    warnings.warn(message, DitAccelWarning, stacklevel=4)


def _check_method(folder: Path, saved: dict, method, warn) -> None:
    """The handle's method must be the one the weights were trained for; only SLA's linear-token rule
    may differ (a warning: the projections then see another linear branch than they learned)."""
    current = _json_roundtrip(method.ran_dict())
    plans = PlanMethod.name in (saved.get("method"), current.get("method"))
    if saved == current or (not plans and _same_setting(saved, current)):
        return
    check_method_fits(folder, saved, method)  # another method or plan altogether
    if plans:
        return  # one plan (content hash): its provenance may differ
    diff = _setting_diff(saved, current)
    if diff == ["linear_tokens"]:
        warn(f"dit_accel: weights={str(folder)!r} were trained with SLA linear_tokens={saved['linear_tokens']!r} but "
             f"the method runs linear_tokens={current['linear_tokens']!r}: the projections learned one linear branch "
             "and now see the other, so the output differs from the trained model. Apply the saved method "
             f"(dit_accel.load_method({str(folder)!r})) to run them as trained.")
        return
    raise ValueError(
        f"weights={str(folder)!r} were trained for {saved} but the handle's method is {current} "
        f"(differs in {diff}). Apply the saved method: "
        f"dit_accel.apply(pipe, dit_accel.load_method({str(folder)!r}), weights=...)."
    )


def same_setting(saved: Method, method: Method) -> bool:
    """Whether two method configs run alike as a folder records them (:func:`_same_setting` on their ``ran_dict``):
    ``Tile(window=3)`` and ``Tile(window=(3, 3, 3))``, ``VSA()`` and ``VSA(sparsity=0.8)``."""
    return _same_setting(_json_roundtrip(saved.ran_dict()), _json_roundtrip(method.ran_dict()))


def differing_settings(saved: Method, method: Method) -> List[str]:
    """The config fields in which two methods run otherwise, compared as :func:`same_setting` compares them."""
    return _setting_diff(_json_roundtrip(saved.ran_dict()), _json_roundtrip(method.ran_dict()))


def _setting_diff(saved: dict, current: dict) -> List[str]:
    return sorted(k for k in set(saved) | set(current) if not _same_setting(saved.get(k), current.get(k)))


def _same_setting(a, b) -> bool:
    """Two JSON method values equal, one number given for every dimension (or head) counting as that number
    spelt out: ``window=3`` is ``window=[3, 3, 3]`` on the model the folder's method ran on. (Compared as
    written, a folder trained with ``--window 3`` refused ``Tile(window=(3, 3, 3))`` as another method.)"""
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same_setting(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, list) or isinstance(b, list):
        spelt, one = (a, b) if isinstance(a, list) else (b, a)
        return isinstance(one, int) and bool(spelt) and all(_same_setting(x, one) for x in spelt)
    return a == b


def check_method_fits(folder, saved: dict, method) -> None:
    """ValueError when a folder's saved method dict (its method file's ``"method"``) names another method than
    ``method`` (VSA weights applied under SLA) or another plan, saying which method to apply. Configs of one
    method that differ in their settings pass here (:func:`load_into` compares them)."""
    current = _json_roundtrip(method.to_dict())
    if PlanMethod.name in (saved.get("method"), current.get("method")):
        _check_plan(Path(folder), saved, current)
        return
    if saved.get("method") != current.get("method"):
        try:
            trained = repr(method_from_dict(saved))
        except (ValueError, TypeError, KeyError):
            trained = str(saved)
        raise ValueError(f"weights={str(folder)!r} were trained for {trained} but apply was given {method!r}; "
                         f"pass dit_accel.load_method({str(folder)!r}) as the method")


def _plan_hash(d: dict) -> Optional[str]:
    return SparsePlan.from_json(d["plan"]).content_hash() if d.get("method") == PlanMethod.name else None


def check_plan_fits(folder, saved: dict, method) -> None:
    """ValueError unless a folder's saved method dict and ``method`` are both plans with one content hash, or
    neither is a plan (then :func:`load_into` compares the configs)."""
    current = _json_roundtrip(method.to_dict())
    if PlanMethod.name in (saved.get("method"), current.get("method")):
        _check_plan(Path(folder), saved, current)


def _check_plan(folder: Path, saved: dict, current: dict) -> None:
    """Weights trained under a plan fit that plan only (same content hash; its provenance may differ)."""
    trained, running = _plan_hash(saved), _plan_hash(current)
    if trained is not None and trained == running:
        return
    what = (f"the calibrated plan {trained[:12]}" if trained else f"{saved}")
    now = (f"another plan ({running[:12]})" if running else f"{current}")
    raise ValueError(
        f"weights={str(folder)!r} were trained under {what} but the handle runs {now}: the LoRA and SLA "
        f"projections fit only what they were trained under. Apply the saved "
        f"{'plan' if trained else 'method'}: dit_accel.apply(pipe, dit_accel.load_method({str(folder)!r}), "
        "weights=...).")


def load_into(handle, folder) -> None:
    """Load a fine-tuned folder into an installed dit_accel handle (``apply(..., weights=DIR)`` calls this).

    Loads the LoRA into ``handle.transformer`` (as adapter ``"dit_accel"``; the
    same tensors ``pipe.load_lora_weights(DIR)`` would load) and, for SLA, the
    projections into ``handle.sla_projections()``. When an adapter of the transformer already holds the
    folder's LoRA (``pipe.load_lora_weights(DIR)`` before ``apply``), it is used as it is and only the
    projections are loaded (:func:`loaded_lora_adapter`); ``handle.lora_adapter`` names the adapter either way.

    The whole folder is checked before the model is touched: the method file, every file's sha256
    against it (folders written since the hashes were added), every file it names there and readable, every
    tensor float and finite, the LoRA's modules (each in the model, a Linear or Conv) and shapes and the SLA
    projections' names and shapes. So a bad folder raises and leaves the model as it was; should peft still
    fail half-way through the LoRA, the layers it wrapped are put back (:func:`~.lora_checks.undo_injection`).

    Raises ValueError (:class:`~dit_accel.atomic_files.BadFileError` for a bad file, naming it) when the folder is
    missing files, holds a truncated or half-written file, was trained for a different method config
    than ``handle.method`` (only SLA's ``linear_tokens`` may differ, with a warning), or when its LoRA or
    SLA projections do not match the model's layers.
    """
    folder = Path(folder)
    lora, sla, loaded = _checked_folder(handle, folder)
    if lora is not None:
        _load_lora(handle.transformer, lora)
        loaded = ADAPTER_NAME
    if hasattr(handle, "lora_adapter"):
        handle.lora_adapter = loaded
    if sla is not None:
        tensors, projections = sla
        with torch.no_grad():
            for name, module in projections.items():
                for pname, p in module.named_parameters():
                    p.copy_(tensors[f"{name}.{pname}"].to(p.dtype))


def _checked_folder(handle, folder: Path):
    """``(lora, sla, loaded)`` ready to load, each None when the folder has none (``lora`` also when the adapter
    ``loaded`` already holds it); every check that can fail runs here."""
    info = _read_info(folder)
    method_path = folder / METHOD_FILE
    # Through the config and back as it runs (``ran_dict``: VSA's open sparsity is the 0.8 that runs, as a given 0.8
    # is): fields added since the folder was written take their defaults.
    saved = _json_roundtrip(saved_method(folder, info).ran_dict())
    method = getattr(handle, "method", None)
    if method is not None:  # the handle's warning log (its sidecars list the warning), else a plain warning
        log = getattr(getattr(handle, "_runtime", None), "warnings", None)
        _check_method(folder, saved, method, log.warn if log is not None else _warn)
    _check_dense_layers(folder, info, handle)
    files = info.get("files") or {}
    _check_files_fit(folder, files, saved)
    if "sha256" in info:
        check_hashes(folder, info["sha256"], method_path)
    for kind, name in sorted(files.items()):  # (without a hash table a missing gates file loaded zero gates)
        if name is not None and not (folder / name).is_file():
            raise BadFileError(folder / name, f"does not exist, though {METHOD_FILE} names it as the folder's {kind}",
                               f"the folder `dit-accel finetune` wrote, whole: {_REDO}")
    lora, loaded = None, None
    if files.get("lora", LORA_FILE) is not None:
        lora = _read_lora(handle.transformer, folder)
        loaded = loaded_lora_adapter(handle.transformer, folder, lora[0])
        if loaded is not None:
            lora = None  # pipe.load_lora_weights(folder) loaded it: only the SLA projections remain to load
        else:  # (before: fused by Diffusers and unloaded, it loaded again and counted twice)
            check_lora_not_merged(handle.transformer, folder, isinstance(info.get("lora"), dict)
                                  and info["lora"].get("sketch"))
    sla = None
    projections = handle.sla_projections() if hasattr(handle, "sla_projections") else {}
    if saved.get("method") == "sla" or projections:
        sla_path = folder / SLA_FILE
        if not sla_path.is_file():
            raise ValueError(f"weights={str(folder)!r} is missing {SLA_FILE} (the method is SLA).")
        tensors = load_safetensors(sla_path, expected="the SLA projections `dit-accel finetune` writes")
        check_float_weights(sla_path, tensors, redo=_REDO)
        expected = sla_state_dict(projections)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{sla_path} does not match the model's SLA layers: missing {missing[:4]}, unexpected {unexpected[:4]}; "
                f"was it trained on a different model? It was trained with dense_layers={info.get('dense_layers')}; "
                "pass the same dense_layers to apply()."
            )
        for key, ref in expected.items():
            if tensors[key].shape != ref.shape:
                raise ValueError(f"{sla_path}: {key} has shape {tuple(tensors[key].shape)}, model has "
                                 f"{tuple(ref.shape)}.")
        sla = (tensors, projections)
    return lora, sla, loaded


def _methods_in(d) -> set:
    """Every ``"method"`` name in a saved method dict (a plan's and a PerHead's entries included)."""
    if isinstance(d, dict):
        own = {d["method"]} if isinstance(d.get("method"), str) else set()
        return own.union(*map(_methods_in, d.values()))
    return set().union(*map(_methods_in, d)) if isinstance(d, list) else set()


def _check_files_fit(folder: Path, files: dict, saved: dict) -> None:
    """BadFileError naming the method file when the tensors it names are not its method's: SLA projections under a
    method without SLA, VSA gates under one without VSA (before: skipped, and the LoRA ran without what it was
    trained with). (A VSA folder may name no gates: save_pretrained keeps them beside the model's weights.)"""
    methods = _methods_in(saved)
    kind = next((k for k, m in (("sla_projections", "sla"), ("vsa_gates", "vsa")) if files.get(k) and m not in methods),
                None)
    if kind is not None:
        what = f"names {'SLA projections' if kind == 'sla_projections' else 'VSA gates'} ({files[kind]})"
        raise BadFileError(folder / METHOD_FILE, f"{what} but records the method {saved.get('method')!r} "
                           f"({', '.join(sorted(methods))} in all), so its method and its tensors disagree",
                           f"the method file `dit-accel finetune` wrote with these tensors: {_REDO}")


def _check_dense_layers(folder: Path, info: dict, handle) -> None:
    """:func:`check_trained_dense_layers` for a handle's schedule and layers."""
    schedule = getattr(handle, "schedule", None)
    if schedule is not None:
        check_trained_dense_layers(folder, info, schedule, len(getattr(handle, "layers", None) or ()) or None)


def check_trained_dense_layers(folder, info: dict, schedule, layers: Optional[int]) -> None:
    """The layers that ran dense in training (the folder's ``dense_layers``) must run dense under ``schedule``: their
    LoRA learned next to dense attention. Before, ``apply(pipe, load_method(DIR), weights=DIR)`` (and ComfyUI's
    ``patch_model(..., weights=DIR)``) ran them sparse, silently unlike the trained model (``dit-accel generate
    --weights`` passed the recorded layers). More dense layers than trained are the caller's choice, as
    ``dense_steps`` is. ``layers``: the model's layer count (None: unknown; another model's layers are the LoRA
    check's to name)."""
    from ..methods import Dense

    trained = info.get("dense_layers")
    if not isinstance(trained, list) or not all(isinstance(i, int) for i in trained):
        return
    sparse = sorted({i for i in trained if (layers is None or i < layers)
                     and not isinstance(schedule.layer_method(i), Dense)})
    if sparse:
        dense = sorted(set(trained))
        raise ValueError(
            f"weights={str(folder)!r} were trained with dense_layers={dense} (dense attention there while the LoRA "
            f"learned), but layer(s) {sparse} run {schedule.layer_method(sparse[0]).name} here, so the output would "
            f"not be the trained model's. Pass dense_layers={dense} to apply() or patch_model() (dit-accel generate "
            "--weights and ComfyUI's fine-tuned node do so themselves).")


def _check_lora_targets(transformer: nn.Module, folder: Path, state: Dict[str, torch.Tensor]) -> None:
    """ValueError naming the real reason when the LoRA's modules do not exist in ``transformer`` (weights
    trained on another model family), instead of peft's "Target modules ... not found"."""
    targets = {lora_module_name(key)[0] for key in state}
    modules = {name for name, _ in transformer.named_modules()}
    if targets and not targets & modules:
        info = _read_info(folder)
        example = sorted(targets)[0]
        ours = next((n for n in sorted(modules) if n.endswith(("to_q", "attn.to_q", "attn1.to_q"))), None)
        raise ValueError(
            f"weights={str(folder)!r} hold LoRA for modules like {example!r} (trained on model "
            f"{info.get('model', 'unknown')!r}); this {type(transformer).__name__} has no such module"
            + (f" (its attention projections are like {ours!r})" if ours else "")
            + ": the weights belong to another model. Fine-tune on this model, or load them into the one "
              "they were trained on."
        )


def _read_lora(transformer: nn.Module, folder: Path):
    """``(state, metadata, path)`` of the folder's LoRA, checked against ``transformer`` (modules, their types and
    shapes, ranks, float and finite values)."""
    lora_path = folder / LORA_FILE
    if not lora_path.is_file():
        raise ValueError(f"weights={str(folder)!r} is missing {LORA_FILE}.")
    raw = load_safetensors(lora_path, expected="a Diffusers LoRA file (safetensors)")  # readable as a whole
    check_float_weights(lora_path, raw, redo=_REDO, any_dtype=(".alpha",))
    try:
        state, metadata = _lora_mixin().lora_state_dict(str(folder), weight_name=LORA_FILE,
                                                        return_lora_metadata=True)
    except Exception as err:  # Diffusers raises several types for files it cannot convert
        raise BadFileError(lora_path, f"Diffusers cannot read it as a LoRA ({type(err).__name__}: "
                                      f"{' '.join(str(err).split())[:120]})",
                           "the Diffusers-format LoRA `dit-accel finetune` writes") from None
    if not state:
        raise BadFileError(lora_path, "holds no LoRA tensors", "the lora_A/lora_B tensors `dit-accel finetune` writes")
    loose = sorted(k for k in state if not k.startswith("transformer."))
    if loose:  # (before: Diffusers' loader keeps "transformer." keys only; bare keys loaded as no LoRA at all)
        raise BadFileError(lora_path, f"holds {len(loose)} LoRA tensor(s) without the \"transformer.\" prefix (e.g. "
                                      f"{loose[0]}), which Diffusers' loader (apply(weights=...), "
                                      "pipe.load_lora_weights) skips without an error",
                           "Diffusers-format keys transformer.<module>.lora_A.weight / .lora_B.weight: save the file "
                           "again with \"transformer.\" before every key")
    _check_lora_targets(transformer, folder, state)
    ranks = check_lora_modules(transformer, lora_path, state)  # every module there, adaptable, of these shapes
    meta = {k.split(".", 1)[-1]: v for k, v in (metadata or {}).items()}  # keys come as "transformer.r"
    check_lora_scales(lora_path, meta, redo=_REDO)  # (a NaN lora_alpha loaded as a NaN scale: every output NaN)
    check_lora_coverage(transformer, lora_path, state, meta)  # and every module its config names in the file
    meta_rank = meta.get("r") if isinstance(meta.get("r"), int) and not meta.get("rank_pattern") else None
    check_lora_pairs(lora_path, {m: sides for m, sides in ranks.items() if len(sides) < 2}, redo=_REDO)
    for module_name, sides in sorted(ranks.items()):
        want = meta_rank if meta_rank is not None else sides.get("A")
        if any(r != want for r in sides.values()):
            raise BadFileError(lora_path, f"the LoRA of {module_name} has rank {sides} (lora_A rows / lora_B columns)",
                               f"rank {want} on both sides" + (", as its adapter metadata says" if meta_rank else ""))
    return state, metadata, lora_path


def _adapter_state(transformer: nn.Module, name: str) -> Dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=name)


def _active(transformer: nn.Module) -> List[str]:
    try:
        return list(transformer.active_adapters())
    except (ValueError, AttributeError):
        return []


def _scales(transformer: nn.Module, name: str) -> List[float]:
    """The scales ``name`` runs at, relative to its config's ``lora_alpha / r`` (1.0 unless ``set_adapters``
    gave it another weight)."""
    from peft.tuners.lora import LoraLayer

    out = set()
    for module in transformer.modules():
        if isinstance(module, LoraLayer) and name in module.scaling and name in module.r:
            cfg = transformer.peft_config[name]
            r, alpha = module.r[name], module.lora_alpha[name]
            base = alpha / math.sqrt(r) if getattr(cfg, "use_rslora", False) else alpha / r
            out.add(round(module.scaling[name] / base, 6) if base else 0.0)
    return sorted(out)


def loaded_lora_adapter(transformer: nn.Module, folder, state: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the PEFT adapter of ``transformer`` that holds the folder's LoRA (``state``, as
    :func:`_read_lora` reads it), loaded by ``pipe.load_lora_weights(folder)``; None when no adapter holds
    LoRA over the folder's modules (then ``apply(weights=folder)`` loads it itself, as adapter ``"dit_accel"``).

    An adapter holds the folder's LoRA when it has the same tensors (names and shapes) with equal values
    (the folder's fp32 tensors cast to the adapter's dtype). Raises ValueError, before anything is loaded:

    - when two adapters hold it (loaded twice: the LoRA would count twice);
    - when an adapter has the folder's modules and shapes but other values and none holds the folder's
      (another fine-tune's LoRA, or this one modified: the folder's LoRA is not the one loaded);
    - when the adapter holding it is inactive, or runs at another weight than 1.0 (``set_adapters``).
    """
    folder = Path(folder)
    config = getattr(transformer, "peft_config", None) or {}
    want = {(k.split("transformer.", 1)[1] if k.startswith("transformer.") else k): v for k, v in state.items()}
    exact, other = [], []
    for name in config:
        if name == ADAPTER_NAME:  # dit_accel's own adapter: load_into replaces it
            continue
        try:
            have = _adapter_state(transformer, name)
        except Exception:  # noqa: BLE001 - an adapter type peft cannot export: not a LoRA of ours
            continue
        if set(have) != set(want) or any(have[k].shape != want[k].shape for k in want):
            continue
        same = all(torch.equal(have[k].detach().cpu(), want[k].to(have[k].dtype)) for k in want)
        (exact if same else other).append(name)
    cls = type(transformer).__name__
    if len(exact) > 1:
        raise ValueError(
            f"weights={str(folder)!r}: its LoRA is loaded twice on this {cls}, as adapters {exact}, so it would "
            f"count twice. Delete all but one (e.g. pipe.delete_adapters({exact[1:]!r})), then apply again.")
    if not exact:
        if other:
            raise ValueError(
                f"weights={str(folder)!r}: adapter {other[0]!r} of this {cls} holds LoRA over the same modules "
                f"with other values, so the folder's LoRA is not the one loaded (another fine-tune's, or a changed "
                f"copy). Load this folder's LoRA (pipe.delete_adapters({other[0]!r}); "
                f"pipe.load_lora_weights({str(folder)!r})) or pass the folder the loaded LoRA came from.")
        return None
    name = exact[0]
    if name not in _active(transformer):
        raise ValueError(
            f"weights={str(folder)!r}: its LoRA is loaded on this {cls} as adapter {name!r}, but that adapter is "
            f"not active (active: {_active(transformer)}), so the output would not be the fine-tuned model's. "
            f"Activate it (pipe.set_adapters([{name!r}, ...])), then apply again.")
    scales = _scales(transformer, name)
    if scales != [1.0]:
        raise ValueError(
            f"weights={str(folder)!r}: its LoRA is loaded as adapter {name!r} at weight {scales} instead of 1.0, "
            f"so the output would not be the fine-tuned model's. Set it to 1.0 (pipe.set_adapters([{name!r}], "
            "adapter_weights=[1.0])), then apply again.")
    return name


def _load_lora(transformer: nn.Module, lora) -> None:
    state, metadata, path = lora
    if ADAPTER_NAME in (getattr(transformer, "peft_config", None) or {}):
        transformer.delete_adapters(ADAPTER_NAME)  # loading twice replaces, never stacks
    before = injection_state(transformer)
    try:
        transformer.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name=ADAPTER_NAME)
    except BaseException as err:
        # _read_lora's checks should have caught it; peft may still fail after wrapping some layers (and before
        # recording its config, where Diffusers' cleanup does not reach): the model gets its own layers back
        undo_injection(transformer, ADAPTER_NAME, before)
        if not isinstance(err, Exception):
            raise
        raise ValueError(f"{path}: peft could not load this LoRA into the {type(transformer).__name__} "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); the model is as it was. "
                         "Check that the weights belong to this model, or train or convert them again") from err
    # peft froze every other parameter (its training setup): the model's own keep their requires_grad (before, the
    # whole model stayed frozen after remove())
    for p in transformer.parameters():
        if id(p) in before["grad"]:
            p.requires_grad_(before["grad"][id(p)])


load_trained_weights = load_into  # the name used before the weights folder format moved here
