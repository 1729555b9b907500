"""VSA gate weights in a checkpoint: the ``to_gate_compress`` projections Diffusers drops on load.

Sparse-distilled checkpoints such as FastWan2.1-T2V-1.3B-Diffusers hold, per transformer block, a learned
gate ``blocks.N.to_gate_compress.weight`` / ``.bias`` (FastVideo's Diffusers-format key names; vLLM-Omni
spells them ``blocks.N.attn1.to_gate_compress.*``, read too). Diffusers' ``WanTransformer3DModel`` has no
such module and drops the keys with a notice, so the model it loads is not the one that was trained.
This module finds and reads them (in the ``*.safetensors``, or the pickled ``*.bin`` Diffusers reads where there
are none), header first (:func:`gate_keys` reads no tensor), like
:mod:`dit_accel.checkpoints.finetuned` reads dit_accel's own weights folders: a bad file is a one-line
:class:`~dit_accel.atomic_files.BadFileError`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .._util import file_in_the_way
from ..atomic_files import BadFileError, read_json, safetensors_keys, safetensors_metadata

__all__ = ["GATE_KEY", "GATES_FILE", "loaded_from", "transformer_folder", "checkpoint_files", "gate_keys",
           "read_gates", "write_gates", "save_with_gates"]

#: A gate tensor's key: ``blocks.<N>.to_gate_compress.<weight|bias>`` (optionally ``attn1.`` before the name, and a
#: ``transformer.``/``model.`` prefix, inside or outside the ``_orig_mod.``/``module.`` that torch.compile and DDP add).
GATE_KEY = re.compile(r"^(?:_orig_mod\.|module\.)*(?:transformer\.|model\.)?(?:_orig_mod\.|module\.)*"
                      r"blocks\.(\d+)\.(?:attn1\.)?to_gate_compress\.(weight|bias)$")
_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_BIN_INDEX = "diffusion_pytorch_model.bin.index.json"
#: What a gates key may look like: said when a file holds a to_gate_compress tensor under another key.
_LAYOUT = ("blocks.N.to_gate_compress.weight / .bias (FastVideo's Diffusers layout; blocks.N.attn1.to_gate_compress.* "
           "and a transformer., model., _orig_mod. or module. prefix are read too)")
#: Pickled weights, read where a folder has no safetensors, as Diffusers reads them (its names only: an accelerate
#: checkpoint's optimizer.bin is no model).
_PICKLED = (".bin",)


def _pickled_model(path: Path) -> bool:
    return path.suffix in _PICKLED and path.name.startswith("diffusion_pytorch_model") and path.is_file()
#: The file dit_accel writes the gates to when a model with VSA applied is saved (``save_pretrained``): beside
#: Diffusers' own weights, in the same key layout. Diffusers ignores it (as it drops the keys of a FastWan
#: checkpoint); :func:`gate_keys` reads it, with or without a shard index.
GATES_FILE = "vsa_gates.safetensors"


def _has_checkpoint(folder: Path) -> bool:
    # (a FastWan checkpoint in .bin: Diffusers loaded it and dropped its gates, and VSA ran without them, saying the
    # folder was "no folder on this machine")
    return folder.is_dir() and any(p.suffix == ".safetensors" or _pickled_model(p) for p in folder.iterdir())


def loaded_from(transformer) -> Optional[str]:
    """The config's ``_name_or_path`` (a folder or a hub id), or None (built from a config)."""
    config = getattr(transformer, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    if name is None and isinstance(config, dict):
        name = config.get("_name_or_path")
    return os.fspath(name) if isinstance(name, (str, os.PathLike)) and os.fspath(name) else None


def _hub_snapshot(repo_id: str, subfolder: str) -> Optional[Path]:
    """The locally cached snapshot of hub repo ``repo_id`` (its ``subfolder`` checkpoint), never downloading."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True,
                                      allow_patterns=[f"{subfolder}/*", "*.safetensors", "*.json"]))
    except Exception:  # not cached, not a repo id, no huggingface_hub: nothing found here
        return None


def transformer_folder(transformer, subfolder: str = "transformer") -> Optional[Path]:
    """The local folder ``transformer`` was loaded from: its config's ``_name_or_path`` (a folder, or a hub id
    found in the local Hugging Face cache), or that path's ``subfolder`` when it is a pipeline folder. None when
    it was built from a config or its files are not on this machine."""
    name = loaded_from(transformer)
    if name is None:
        return None
    path = Path(name)
    if not path.exists():
        path = _hub_snapshot(name, subfolder)
        if path is None:
            return None
    for folder in (path, path / subfolder):
        if _has_checkpoint(folder):
            return folder
    return None


def _index(folder: Path) -> Optional[Path]:
    """The shard index Diffusers reads in ``folder`` (the pickled shards' only where there is no safetensors), or
    None."""
    if (folder / _INDEX).is_file():
        return folder / _INDEX
    plain = any(p.is_file() and not p.name.startswith(".") for p in folder.glob("*.safetensors"))
    return folder / _BIN_INDEX if not plain and (folder / _BIN_INDEX).is_file() else None


def _weight_map(index: Path) -> Dict[str, str]:
    """An index's ``{key: shard file}``; BadFileError naming it when it is no such object."""
    # (read_json: a byte-order mark was called "not a safetensors index", deep nesting a raw RecursionError)
    weight_map = read_json(index, expected="a safetensors index, {\"weight_map\": {key: shard file}}").get("weight_map")
    # (a weight_map that is no object, or names a shard by no file name, failed with a raw AttributeError or TypeError)
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) and s for s in weight_map.values()):
        raise BadFileError(index, f"its weight_map is {json.dumps(weight_map)[:60]}, not an object naming each "
                           "tensor's shard file", "{\"weight_map\": {key: shard file}}: download the checkpoint "
                           "again or save it again")
    return weight_map


def checkpoint_files(folder) -> List[Path]:
    """The safetensors files of a Diffusers model folder (the index's shards when there is an index); without any, its
    ``.bin`` files, as Diffusers loads them."""
    folder = Path(folder)
    index = _index(folder)
    if index is not None:
        weight_map = _weight_map(index)
        shards = sorted(set(weight_map.values()))
        extra = [folder / GATES_FILE] if (folder / GATES_FILE).is_file() and GATES_FILE not in shards else []
        return [folder / s for s in shards] + extra
    # (a killed writer's hidden temporary, e.g. of vsa_gates.safetensors, is no checkpoint file: never read it)
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))
    return files or sorted(p for p in (folder.iterdir() if folder.is_dir() else ()) if _pickled_model(p))


def _pickled_state(path: Path) -> dict:
    """``{key: tensor}`` of a pickled checkpoint (``.bin``), read with ``weights_only=True`` (memory-mapped
    where its format allows); BadFileError naming it when torch.load cannot read it so."""
    state, error = None, None
    for mmap in (True, False):  # (a legacy, non-zip file cannot be memory-mapped)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as err:  # noqa: BLE001 - pickle errors come in many types
            error = err
    if error is not None and state is None:
        raise BadFileError(path, "is not a state dict torch.load can read with weights_only=True "
                                 f"({type(error).__name__}: {' '.join(str(error).split())[:100]})",
                           "a Diffusers transformer checkpoint: download it again, or save it as safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadFileError(path, f"holds a {type(state).__name__}, not a state dict of tensors",
                           "a Diffusers transformer checkpoint ({key: tensor}): save it again")
    return state


def _keys(path: Path) -> list:
    if path.suffix in _PICKLED:
        return list(_pickled_state(path))
    return safetensors_keys(path, expected="a Diffusers transformer checkpoint")


def gate_keys(folder) -> Dict[str, Path]:
    """``{gate key: file}`` of a model folder's gate tensors (headers only; empty when it has none)."""
    out = {}
    for path in checkpoint_files(folder):
        if not path.is_file():
            raise BadFileError(path, "does not exist", "the shard its safetensors index names")
        for key in _keys(path):
            if GATE_KEY.match(key):
                out[key] = path
            elif "to_gate_compress" in key:  # (before: skipped, and the gates ran partly, or "holds no gates")
                raise BadFileError(path, f"holds {key}, a to_gate_compress tensor under a key dit_accel does not "
                                         "read", f"{_LAYOUT}: save the gates again under such keys")
    index = _index(Path(folder))
    mapped = _weight_map(index) if index is not None else {}
    lost = sorted(k for k in mapped if GATE_KEY.match(k) and k not in out)
    if lost:  # (before: those gates were skipped, a shard of another download beside the index)
        raise BadFileError(index, f"names {lost[0]} in {mapped[lost[0]]}, which that shard does not hold "
                           f"({len(lost)} such gate tensor(s))", "shards that hold what the index names: download the "
                           "checkpoint again")
    return out


def write_gates(folder, tensors: Dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` (``blocks.N.to_gate_compress.weight`` / ``.bias``) to ``folder/GATES_FILE``, whole or not
    at all (:func:`~dit_accel.atomic_files.atomic_write`). Returns the file."""
    from safetensors.torch import save_file

    from ..atomic_files import atomic_write

    bad = sorted(k for k in tensors if not GATE_KEY.match(k))
    if bad:
        raise ValueError(f"not VSA gate keys: {bad[:3]} (expected blocks.N.to_gate_compress.weight / .bias)")
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(Path(folder) / GATES_FILE, lambda tmp: save_file(data, str(tmp), metadata={"format": "pt"}))


#: The gates file's metadata key recording the sha256 of each file saved with it (JSON ``{name: sha256}``).
_BOUND = "dit_accel_saved_with"


def _model_files(folder: Path) -> List[Path]:
    """The files of a Diffusers model folder (hidden files and the gates aside)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != GATES_FILE)


def _is_weights(name: str) -> bool:
    """A weights file (or shard index) of a Diffusers model folder: what the gates were trained with."""
    return name.endswith((".safetensors", ".bin", ".index.json")) and name != GATES_FILE


def save_with_gates(save_directory, save: Callable[[Path], object], tensors: Dict[str, torch.Tensor],
                    replaces: Sequence[str] = ()):
    """``save(folder)`` (Diffusers' ``save_pretrained``) and the gates as one commit: a kill at any instant leaves the
    previous model with its gates or the new one with its own, never one model's weights beside the other's gates.

    ``save`` writes into a temporary sibling folder; its files and ``GATES_FILE`` (``tensors``; with none, a gates
    file already in the folder, another model's, is removed) are then one :func:`~dit_accel.atomic_files.
    commit_files` set. The gates file records the sha256 of every file saved with it, so gates that a later save
    without dit_accel left beside other weights are refused when read (:func:`read_gates`). ``replaces``: names of
    files in the folder that go when this save does not write them (the weights folder's LoRA and projections, when
    ``save`` writes a weights folder too). Returns ``save``'s result."""
    import shutil

    from safetensors.torch import save_file

    from ..atomic_files import commit_files, commit_journal, recover, sha256_file, temp_name

    folder = Path(save_directory)
    bad = sorted(k for k in tensors if not GATE_KEY.match(k))
    if bad:
        raise ValueError(f"not VSA gate keys: {bad[:3]} (expected blocks.N.to_gate_compress.weight / .bias)")
    data = {k: v.detach().to("cpu").float().contiguous() for k, v in tensors.items()}
    in_the_way = file_in_the_way(folder)
    if in_the_way is not None:  # (before: a raw FileExistsError; Diffusers' own save only logs it)
        where = "is a file" if in_the_way == folder else f"lies under {str(in_the_way)!r}, which is a file"
        raise ValueError(f"save_directory={str(folder)!r} {where}: save_pretrained writes the model to a folder; "
                         "give a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    journal = commit_journal(folder / GATES_FILE)
    recover(journal, [folder, folder.parent])
    staging = temp_name(folder)
    try:
        result = save(staging)
        saved = _model_files(staging)
        files = {folder / p.name: (lambda tmp, p=p: os.replace(p, tmp)) for p in saved}
        if data:
            bound = json.dumps({p.name: sha256_file(p) for p in saved if _is_weights(p.name)}, sort_keys=True)
            files[folder / GATES_FILE] = lambda tmp: save_file(data, str(tmp), metadata={"format": "pt",
                                                                                        _BOUND: bound})
        names = {p.name for p in saved}
        # a previous model's gates, and the weight shards of a previous save that this one has no place for
        remove = [p for p in _model_files(folder)
                  if p.name not in names and (p.name.startswith("diffusion_pytorch_model") or p.name in replaces)]
        if not data and (folder / GATES_FILE).is_file():
            remove.append(folder / GATES_FILE)
        commit_files(files, journal, remove=remove)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def finish_saved_set(folder: Path, what: Path) -> None:
    """What a reader of a folder that :func:`save_with_gates` writes does first: finish a save killed after its commit
    point (the model, its gates and its weights folder are one set), or refuse ``what`` (BadFileError)."""
    from ..atomic_files import commit_journal, finish_for_reader

    finish_for_reader(commit_journal(folder / GATES_FILE), what)


def _check_bound(folder: Path) -> None:
    """BadFileError unless the files that ``GATES_FILE`` was saved with are the folder's files now."""
    from ..atomic_files import sha256_file

    path = folder / GATES_FILE
    finish_saved_set(folder, path)  # a save killed after its commit point: finish it first
    if not path.is_file():
        return
    # (a truncated or empty gates file raised a raw SafetensorError here)
    bound = safetensors_metadata(path, expected="VSA gates (blocks.N.to_gate_compress.weight / .bias) saved by "
                                                "save_pretrained under dit_accel.VSA; save the model again").get(_BOUND)
    if bound is None:  # written before the binding existed: nothing to compare
        return
    try:
        recorded = json.loads(bound)
    except (ValueError, RecursionError):
        recorded = None
    if not isinstance(recorded, dict):
        raise BadFileError(path, f"its {_BOUND} metadata is not a JSON table of files", "a gates file written by "
                           "save_pretrained under dit_accel.VSA; save the model again")
    now = {p.name for p in _model_files(folder)}
    changed = sorted(n for n in now if _is_weights(n) and n not in recorded)
    changed += sorted(n for n, digest in recorded.items() if n not in now or sha256_file(folder / n) != digest)
    if changed:
        raise BadFileError(path, f"was saved with other model files than the folder holds now ({', '.join(changed[:3])} "
                                 "changed since: another model was saved here without dit_accel.VSA applied), so "
                                 "these gates are not this model's", "gates saved together with the weights; remove "
                                 f"{GATES_FILE} to run VSA without gates, or save the gated model again")


def read_gates(folder) -> Dict[int, Dict[str, torch.Tensor]]:
    """``{block index: {"weight": (inner, dim), "bias": (inner,) or absent}}`` of a folder's gates.

    ValueError when a block has a bias without a weight, or a weight that is not 2-D; BadFileError when a gate
    holds NaN or inf, has two keys (``blocks.N.`` and ``blocks.N.attn1.``), or when ``GATES_FILE`` was saved with other weights than the folder holds."""
    from safetensors import safe_open

    _check_bound(Path(folder))
    keys = gate_keys(folder)
    gates: Dict[int, Dict[str, torch.Tensor]] = {}
    seen: Dict[tuple, str] = {}
    pickled: Dict[Path, dict] = {}
    for key, path in sorted(keys.items()):
        block, kind = GATE_KEY.match(key).groups()
        first = seen.setdefault((block, kind), key)
        if first != key:  # e.g. FastVideo's and vLLM-Omni's spelling of one gate: which one was trained is unknown
            where = "" if keys[first] == path else f" (in {keys[first].name} and {path.name})"
            raise BadFileError(path, f"holds two to_gate_compress {kind}s for block {block}: {first} and {key}{where}",
                               "one key per gate (blocks.N.to_gate_compress.* or blocks.N.attn1.to_gate_compress.*); "
                               "remove one of them or save the checkpoint again")
        if path.suffix in _PICKLED:
            state = pickled.get(path) or pickled.setdefault(path, _pickled_state(path))
            gates.setdefault(int(block), {})[kind] = state[key].clone()
            continue
        with safe_open(str(path), framework="pt") as f:
            gates.setdefault(int(block), {})[kind] = f.get_tensor(key)
    for block, parts in gates.items():
        weight = parts.get("weight")
        if weight is None or weight.dim() != 2:
            raise ValueError(f"{folder}: the to_gate_compress gate of block {block} has "
                             f"{'no weight' if weight is None else f'a weight of shape {tuple(weight.shape)}'}; "
                             "expected blocks.N.to_gate_compress.weight of shape (inner dim, model dim)")
        bias = parts.get("bias")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{folder}: the to_gate_compress bias of block {block} has shape {tuple(bias.shape)}, "
                             f"its weight {tuple(weight.shape)}")
        for kind, tensor in parts.items():  # a NaN gate turns every output of the layer into NaN
            # (float8 has no isfinite kernel: its check raised a raw NotImplementedError; it is cast when loaded)
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor.float()).all()):
                key = next(k for k in keys if GATE_KEY.match(k).groups() == (str(block), kind))
                what = f"dtype {tensor.dtype}" if not tensor.is_floating_point() else \
                    f"{int((~torch.isfinite(tensor.float())).sum())} non-finite values (NaN or inf)"
                raise BadFileError(keys[key], f"the to_gate_compress {kind} of block {block} ({key}) has {what}",
                                   "finite float gate weights; the checkpoint is damaged: download or save it again")
    unbiased = sorted(block for block, parts in gates.items() if "bias" not in parts)
    if 0 < len(unbiased) < len(gates):  # (before: those blocks ran their gate without its bias, without a word)
        key = next(k for k in keys if GATE_KEY.match(k).groups() == (str(unbiased[0]), "weight"))
        raise BadFileError(keys[key], f"holds to_gate_compress biases for {len(gates) - len(unbiased)} blocks but none "
                           f"for block(s) {unbiased[:8]} (e.g. {key} has no .bias)", "a bias for every gate or for "
                           "none; the checkpoint is incomplete: download or save it again")
    return gates

