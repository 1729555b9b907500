"""The output folder of a fine-tuning run: its run record (what --resume must match), the files --overwrite may
remove, and the checkpoints a run resumes from."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..atomic_files import (BadFileError, atomic_folder, atomic_write, atomic_write_json, cache_root, check_hashes,
                            crash_point, file_hashes, is_temp_name, load_safetensors, read_json, remove_stale_temps,
                            temp_name)
from ..checkpoints.finetuned import LORA_FILE, METHOD_FILE, SLA_FILE, VSA_FILE
from . import data as data_mod
from .config import _PATHS, _RESUMABLE, CKPT_DIR, LOG_FILE, RUN_FILE, FinetuneConfig, target_names


def _run_record(config: FinetuneConfig, world: int) -> dict:
    """What identifies a run (written to RUN_FILE): the settings, the number of processes and the sha256 of
    the contents of the inputs (the prompts file or the caption folder) and of the model's weights (the files of a
    local, embedded or cached hub model; a sample of the transformer's tensors of a pipeline passed as an object,
    :func:`_pipe_fingerprint`): a path or an object alone does not say what it holds."""
    from ..models.loading import model_fingerprint

    if not isinstance(config.model, str):
        model_sha = _pipe_fingerprint(config)
    else:
        model_sha = model_fingerprint(config.model, memo=cache_root() / "model_hashes.json",
                                      warn=lambda m: print(m, file=sys.stderr))
    return {**config.settings(), "num_processes": world,
            "inputs_sha256": data_mod.inputs_digest(config.prompts, config.data), "model_sha256": model_sha,
            **({"eval_inputs_sha256": data_mod.inputs_digest(data=config.eval_data)} if config.eval_data else {})}


_SAMPLE = 1 << 16  # elements hashed per tensor: all of a small one, an evenly strided sample of a larger one


def _pipe_fingerprint(config: FinetuneConfig, fresh: bool = False) -> Optional[str]:
    """``"sample:<sha256>"`` of the transformer of a pipeline passed as ``model`` (the names, shapes and dtypes of its
    parameters and buffers, and up to 65,536 evenly spaced values of each, in the dtype the run casts them to), so
    that ``resume`` on a pipeline with other weights is refused (before: such runs recorded no fingerprint and went on
    training adapters made for other weights). Taken ``fresh`` by :func:`_check_output`, before the run casts the
    pipeline and adds its LoRA; the run record written later reuses it."""
    import hashlib

    cached = config.__dict__.get("_pipe_fingerprint")
    if not fresh and cached is not None and cached[0] is config.model:
        return cached[1]
    transformer = getattr(config.model, "transformer", None)
    if not isinstance(transformer, nn.Module):
        return None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(transformer.state_dict(keep_vars=False).items()):
            try:
                flat = t.detach().reshape(-1)
                if flat.numel() > _SAMPLE:
                    flat = flat[::flat.numel() // _SAMPLE][:_SAMPLE]
                if dtype is not None and t.is_floating_point():
                    flat = flat.to(dtype)  # (what the run trains against: an fp32 and a bf16 copy of one model agree)
                h.update(f"{name}:{flat.dtype}:{tuple(t.shape)}".encode())
                if not flat.is_meta:  # (an offloaded tensor has no values here)
                    h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
            except (RuntimeError, TypeError, NotImplementedError):  # a quantized tensor type: its name and shape
                h.update(f"{name}:{type(t).__name__}:{tuple(t.shape)}".encode())
    config.__dict__["_pipe_fingerprint"] = (config.model, "sample:" + h.hexdigest())
    return config.__dict__["_pipe_fingerprint"][1]


# What a run writes in its output folder: --overwrite removes these and nothing else.
_RUN_OUTPUTS = (RUN_FILE, LOG_FILE, METHOD_FILE, LORA_FILE, SLA_FILE, VSA_FILE)


def _run_outputs(out: Path) -> List[Path]:
    """The files and folders of ``out`` that a fine-tuning run wrote (checkpoint folders, temporaries)."""
    found = [out / n for n in _RUN_OUTPUTS if (out / n).is_file()]
    found += [p for p in out.iterdir() if is_temp_name(p)]
    root = out / CKPT_DIR
    if root.is_dir() and not root.is_symlink():
        found += [p for p in root.iterdir() if p.is_dir() and (p.name.startswith("step-") or is_temp_name(p))]
    return found


def _describe(paths: Sequence[Path], limit: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in paths)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_output(config: FinetuneConfig, world: int) -> Tuple[Path, list]:
    """Refuse an output folder that holds something else, unless --resume (same run) or --overwrite.

    A run resumed with another number of processes would see other data and noise per step and end
    elsewhere than the uninterrupted run, so it is refused like any other changed setting.

    Reads only: every process checks at start, and nothing is written until every other
    input check has passed (see :func:`_init_output`), so a rejected run leaves no trace.
    """
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {str(out)!r} exists and is not a folder.")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if not out.exists() and parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise ValueError(f"--output {str(out)!r} cannot be created: {str(parent)!r} is "
                         f"{'not a folder' if not parent.is_dir() else 'not writable'}; choose another folder.")
    if not isinstance(config.model, str):
        _pipe_fingerprint(config, fresh=True)  # (the weights as passed in: the run casts them and adds its LoRA)
    else:
        _check_outside_model(config, out)
    contents = [p for p in out.iterdir() if not is_temp_name(p)] if out.is_dir() else []
    run_file = out / RUN_FILE
    if contents and not run_file.is_file():
        raise ValueError(
            f"--output {str(out)!r} holds {len(contents)} file(s) that are not a fine-tuning run ({_describe(contents)}; "
            f"no {RUN_FILE}); choose an empty or new folder. Nothing there is deleted"
            + (", not even with --overwrite." if config.overwrite else "."))
    if contents and not config.overwrite:
        previous = read_json(run_file, expected="the run record `dit-accel finetune` writes (a JSON object of "
                                                "settings): --overwrite starts the run again (removing only the "
                                                "files a run writes), or choose another --output")
        if not config.resume:
            steps = _checkpoints(out)
            done = f", checkpoints up to step {_step_of(steps[-1])}" if steps else ", no checkpoint yet"
            raise ValueError(
                f"--output {str(out)!r} already holds another fine-tuning run ({previous.get('steps', '?')} steps "
                f"asked{done}); pass --resume to continue that run, --overwrite to replace it (only the files a run "
                "writes are removed), or choose an empty folder."
            )
        previous.setdefault("num_processes", 1)  # run files of 0.1 had no process count (single process)
        for key in _PATHS:  # earlier run files named their files by absolute path
            if isinstance(previous.get(key), str) and os.path.isabs(previous[key]):
                previous[key] = config.portable(previous[key])
        if isinstance(previous.get("target_modules"), (str, list)):  # earlier run files kept the string as given
            previous["target_modules"] = list(target_names(previous["target_modules"]))
        if config.__dict__.get("_vsa_decay_default") and isinstance(previous.get("vsa_decay_steps"), int):
            config.vsa_decay_steps = previous["vsa_decay_steps"]  # the length the run started with, not --steps // 4
        current = _run_record(config, world)
        for key in ("target_modules", "dense_layers"):
            if _same_names(previous.get(key), current.get(key)):
                # (before: the same modules or layers in another order, or one named twice, were "a different run")
                current[key] = previous[key]
        _same_contents(previous, current)
        for key in ("inputs_sha256", "model_sha256", "vsa_decay_steps", "vsa_decay_interval"):  # older run files
            if key not in previous:
                current.pop(key)
        if previous.get("model_sha256") is None and not isinstance(config.model, str):
            current.pop("model_sha256", None)  # (run files before round 12 recorded none for a pipeline object)
        diff = sorted(k for k in set(previous) | set(current)
                      if k not in _RESUMABLE and previous.get(k) != current.get(k))
        _check_known_settings(out, previous, current)
        if diff:
            changed = {"inputs_sha256": f"the contents of {'--data' if config.data else '--prompts'} changed",
                       "eval_inputs_sha256": "the contents of --eval-data changed",
                       "model_sha256": (f"the files of --model {config.settings()['model']} changed"
                                        if isinstance(config.model, str) else
                                        "the transformer weights of the pipeline passed as model= are not those the "
                                        f"run trained on (fingerprint {str(previous.get('model_sha256'))[:19]} -> "
                                        f"{str(current.get('model_sha256'))[:19]})"),
                       "mixed_precision": (f"mixed_precision: {previous.get('mixed_precision')!r} -> "
                                           f"{current.get('mixed_precision')!r} (an unset --mixed-precision follows "
                                           "accelerate launch; pass --mixed-precision "
                                           f"{previous.get('mixed_precision')} to continue in the run's)"),
                       "plan": "the plan's content changed (content hash "
                               f"{str(previous.get('plan'))[:12]} -> {str(current.get('plan'))[:12]})"}
            detail = ", ".join(changed.get(k) or f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in diff[:4])
            raise ValueError(f"--resume: {str(out)!r} holds a different run ({detail}); "
                             "use the same settings and inputs, another --output, or --overwrite.")
    return out, contents


def _same_names(a, b) -> bool:
    """Whether two recorded ``target_modules`` (or ``dense_layers``) name the same modules (layers), in whatever order
    and however often (peft adapts each matching layer once; a layer runs dense once)."""
    return (isinstance(a, list) and isinstance(b, list) and all(isinstance(t, (str, int)) for t in a + b)
            and set(a) == set(b))


def _check_known_settings(out: Path, previous: dict, current: dict) -> None:
    """Refuse a run record with settings this version does not know (set to something): a newer dit-accel wrote it.
    Before: "--resume: ... holds a different run (ema: 0.99 -> None); use the same settings", a setting that no flag
    of this version sets."""
    known = {f.name for f in fields(FinetuneConfig)} | {"plan_path", "num_processes", "inputs_sha256", "model_sha256",
                                                        "eval_inputs_sha256"}
    unknown = sorted(k for k, v in previous.items() if k not in known and k not in current and v is not None)
    if unknown:
        raise BadFileError(out / RUN_FILE, f"records settings this dit-accel does not know ({', '.join(unknown[:4])}): "
                                           "a newer dit-accel wrote it", "a run record of this version: resume the run "
                                           "with the dit-accel that started it, or start again (--overwrite or another "
                                           "--output)")


def _same_contents(previous: dict, current: dict) -> None:
    """Take the recorded path of an input whose contents are those the run recorded (its sha256): the record names
    inputs relative to the output folder, so a run folder moved elsewhere, or inputs copied to another place, were
    refused by --resume as "a different run (prompts: '../prompts.txt' -> '../../prompts.txt')" though the run would
    see the same inputs. Changed contents are still refused (by the sha256)."""
    for keys, digest in ((("prompts", "data"), "inputs_sha256"), (("eval_data",), "eval_inputs_sha256")):
        if not isinstance(previous.get(digest), str) or previous.get(digest) != current.get(digest):
            continue
        for key in keys:
            if isinstance(previous.get(key), str) and isinstance(current.get(key), str):
                current[key] = previous[key]


def _check_outside_model(config: FinetuneConfig, out: Path) -> None:
    """Refuse an output folder inside the folder the model loads from. The run's fingerprint of the model is a
    hash of every file there, so the run's own checkpoints and weights changed it: ``--resume`` was refused as
    "the files of --model ... changed" (they had not), and the run wrote into the user's model folder."""
    from ..models.loading import model_folder

    folder = model_folder(config.model)
    if folder is None or not out.resolve().is_relative_to(folder.resolve()):
        return
    where = "" if Path(config.model).expanduser() == folder else f" ({str(folder)!r})"
    raise ValueError(f"--output {str(out)!r} is inside the folder of --model {config.model}{where}: the "
                     "run's files would count as the model's (its fingerprint covers every file there, so --resume "
                     "would find the model changed). Choose an --output outside the model's folder.")


class _OutputState:
    """What the output folder held before this session wrote to it, so that a run that fails when its training is
    over (it diverged: :func:`dit_accel.training.finetune.finetune`) puts the folder back as it was.

    What ``--overwrite`` and the checkpoint limit remove waits in a temporary folder inside the output folder until
    the run has succeeded (:meth:`commit`) or is undone (:meth:`restore`). A killed run leaves it under a temporary
    name, which the next run in the folder removes (as if it had been deleted at once)."""

    def __init__(self, out: Path):
        self.out = out
        self.existed = out.exists()
        self.had_checkpoints = (out / CKPT_DIR).exists()
        self.run_record = (out / RUN_FILE).read_bytes() if (out / RUN_FILE).is_file() else None
        self.old_checkpoints = {p.name for p in _checkpoints(out)}
        self.aside: Optional[Path] = None
        self.moved: List[Tuple[Path, Path]] = []  # (where it was, where it waits)

    def remove(self, path: Path) -> None:
        """Remove ``path`` from the folder, undoably; this session's own checkpoints go at once."""
        if path.parent.name == CKPT_DIR and path.name.startswith("step-") and path.name not in self.old_checkpoints:
            shutil.rmtree(path, ignore_errors=True)
            return
        if self.aside is None:
            self.aside = temp_name(self.out / "replaced")
            self.aside.mkdir()
        waiting = self.aside / f"{len(self.moved)}-{path.name}"
        os.replace(path, waiting)
        self.moved.append((path, waiting))

    def new_checkpoints(self) -> bool:
        """Whether this session wrote a checkpoint (a failed run that did is resumable: its folder stays)."""
        return any(p.name not in self.old_checkpoints for p in _checkpoints(self.out))

    def commit(self) -> None:
        """The run succeeded (or stopped without being undone): what it replaced goes."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside, self.moved = None, []

    def restore(self) -> None:
        """Undo this session: its checkpoints and run record go, what it replaced comes back."""
        root = self.out / CKPT_DIR
        if root.is_dir():
            for p in root.iterdir():
                if p.is_dir() and p.name not in self.old_checkpoints and (p.name.startswith("step-") or is_temp_name(p)):
                    shutil.rmtree(p, ignore_errors=True)
        for where, waiting in reversed(self.moved):
            if not where.exists():
                where.parent.mkdir(parents=True, exist_ok=True)
                os.replace(waiting, where)
        self.moved = []
        self.commit()
        run_file = self.out / RUN_FILE
        if self.run_record is None:
            run_file.unlink(missing_ok=True)
        else:
            record = self.run_record
            atomic_write(run_file, lambda tmp: tmp.write_bytes(record))
        if not self.had_checkpoints:
            with contextlib.suppress(OSError):
                root.rmdir()  # only when empty
        if not self.existed:
            with contextlib.suppress(OSError):
                self.out.rmdir()


def _init_output(config: FinetuneConfig, accelerator, out: Path, contents: list,
                 state: Optional[_OutputState] = None) -> None:
    """Main process: clear (--overwrite; through ``state`` when given, so it can be undone) and write the run file;
    all processes wait for it."""
    run_file = out / RUN_FILE
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if contents and config.overwrite:  # only what a run wrote (the folder holds a run: see _check_output)
            # The run file goes last (it is replaced below): killed half-way, the folder is still a run that
            # --overwrite may clear, never a heap of files that no run claims.
            for p in _run_outputs(out):
                if p.name == RUN_FILE or (state is not None and p == state.aside):
                    continue
                if state is not None:
                    state.remove(p)
                else:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                crash_point()
            with contextlib.suppress(OSError):
                (out / CKPT_DIR).rmdir()  # only when empty
        try:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(out)
            atomic_write_json(run_file, _run_record(config, accelerator.num_processes))
        except OSError as e:
            raise ValueError(f"--output {str(out)!r} cannot be written: {e.strerror or e}; choose another "
                             "folder.") from None
    accelerator.wait_for_everyone()


def _save_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _checkpoints(out: Path) -> List[Path]:
    """Complete checkpoint folders (renamed into place whole), oldest first."""
    root = out / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
             and (p / "state.json").is_file()]
    return sorted(found, key=_step_of)


_CKPT_FILES = ("trainable.safetensors", "optimizer.pt")


def _save_checkpoint(out: Path, step: int, params: Dict[str, nn.Parameter], optimizer, scaler, losses, limit: int,
                     state: Optional[_OutputState] = None, eval_start: Optional[float] = None):
    """One checkpoint folder, built under a temporary name and renamed into place; its state.json records
    the sha256 of the other files (checked on resume) and ``eval_start``, the held-out loss before the run's first
    step (a resumed run reports it, not the loss of the weights it resumed from). Checkpoints past ``limit`` are
    removed (through ``state`` when given, so that a run that is undone gets them back)."""
    from safetensors.torch import save_file

    root = out / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    with atomic_folder(root / f"step-{step:06d}") as tmp:
        save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, str(tmp / "trainable.safetensors"))
        crash_point()
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": _save_rng()}, tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", {"step": step, "loss": losses, "eval_loss_start": eval_start,
                                               "sha256": file_hashes(tmp, _CKPT_FILES)}, indent=None)
    if limit > 0:
        for old in _checkpoints(out)[:-limit]:
            state.remove(old) if state is not None else shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(path: Path, params: Dict[str, nn.Parameter]) -> Tuple[dict, Dict[str, torch.Tensor], dict]:
    """``(state, tensors, optimizer blob)`` of a checkpoint folder, every file checked; BadFileError naming the
    bad file otherwise. Nothing is loaded into the run here."""
    state_path = path / "state.json"
    expected = 'the checkpoint state `dit-accel finetune` writes: {"step": N, "loss": [...], "sha256": {...}}'
    state = read_json(state_path, expected=expected, finite=False)  # (a step's loss may have been NaN)
    step, losses = state.get("step"), state.get("loss")
    if not (isinstance(step, int) and step == _step_of(path) and isinstance(losses, list) and len(losses) >= step
            and all(isinstance(x, (int, float)) for x in losses)):
        raise BadFileError(state_path, f"holds step {step!r} and {type(losses).__name__} loss for folder {path.name}",
                           expected)
    if "sha256" in state:
        check_hashes(path, state["sha256"], state_path)
    tensors = load_safetensors(path / "trainable.safetensors", expected="the checkpoint's trainable tensors")
    if set(tensors) != set(params):
        raise ValueError(f"checkpoint {path} does not match this run's trainable parameters "
                         f"({len(tensors)} saved, {len(params)} now); use --overwrite to start again.")
    for k, p in params.items():
        if tensors[k].shape != p.shape:
            raise BadFileError(path / "trainable.safetensors", f"{k} has shape {tuple(tensors[k].shape)}",
                               f"shape {tuple(p.shape)} (this run's parameter)")
    try:
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    except Exception as err:  # pickle and zip errors come in many types
        raise BadFileError(path / "optimizer.pt", f"cannot be read ({type(err).__name__}: "
                                                  f"{' '.join(str(err).split())[:120]})",
                           "the optimizer state torch.save wrote") from None
    if not isinstance(blob, dict) or not {"optimizer", "rng"} <= set(blob):
        raise BadFileError(path / "optimizer.pt", f"holds {type(blob).__name__} without optimizer and rng state",
                           "{'optimizer': ..., 'scaler': ..., 'rng': ...}")
    return state, tensors, blob


def _load_checkpoint(path: Path, params: Dict[str, nn.Parameter], optimizer, scaler
                     ) -> Tuple[int, List[float], Optional[float]]:
    """``(step, losses, held-out loss before the run's first step or None)`` of a checkpoint loaded into the run."""
    state, tensors, blob = _read_checkpoint(path, params)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler") is not None:
        scaler.load_state_dict(blob["scaler"])
    _load_rng(blob["rng"])
    eval_start = state.get("eval_loss_start")  # (checkpoints of earlier versions have none)
    return int(state["step"]), list(state["loss"]), float(eval_start) if isinstance(eval_start, (int, float)) else None


