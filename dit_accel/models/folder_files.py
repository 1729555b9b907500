"""The JSON files of a Diffusers pipeline folder, checked without loading anything: what is wrong with a damaged
one (empty, cut short, no JSON, no JSON object), in words that name the file and say what to do, and which values
of a component's config.json are text where its class takes a number. :mod:`dit_accel.models.loading` raises these
as its ModelLoadError."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

__all__ = ["json_object", "json_problem", "damaged_component", "mistyped"]

_LARGEST = 64 << 20  # (a tokenizer.json is a few MB; past this a file is not read to explain a failure)


def json_object(file: Path) -> Tuple[Optional[dict], Optional[str]]:
    """``(object, None)`` of ``file`` read as a JSON object; ``(None, what is wrong)`` (``"is empty (0 bytes)"``,
    ``"is not valid JSON (...)"``, ``"holds a JSON list"``) for a damaged one; ``(None, None)`` where it is not there
    to read (or too large to read for an explanation)."""
    from ..atomic_files import BadFileError, read_json

    try:
        if not file.is_file() or file.stat().st_size > _LARGEST:
            return None, None
        return read_json(file, finite=False), None
    except BadFileError as err:
        return None, "is empty (0 bytes)" if err.problem == "is empty" and not file.stat().st_size else err.problem
    except OSError:
        return None, None


def json_problem(file: Path) -> Optional[str]:
    """What is wrong with ``file`` as a JSON object (:func:`json_object`'s); None where it is one, or is not there to
    read."""
    return json_object(file)[1]


def damaged_component(folder: Path, name: str) -> Optional[str]:
    """The line for the first damaged JSON file of ``folder``'s component ``name`` (its config.json first, then the
    others by name: ``tokenizer_config.json``, ``scheduler_config.json``), else None. Before: "Expecting value:
    line 1 column 1 (char 0)" for an empty tokenizer_config.json, naming neither the file nor what to do."""
    component = folder / name
    try:
        files = sorted((f for f in component.iterdir() if f.suffix == ".json"), key=lambda f: (f.name != "config.json",
                                                                                              f.name))
    except OSError:
        return None
    for file in files:
        problem = json_problem(file)
        if problem is not None:
            what = "config" if file.name == "config.json" else file.name
            return (f"{file} {problem}, not the {name}'s {what} (a JSON object of its settings): copy or download "
                    f"{component} again")
    return None


def mistyped(config: dict) -> list:
    """``key: "4" is text`` for each value of ``config`` that its class (``_class_name`` in Diffusers) defaults to a
    number but the file gives as a string."""
    import inspect

    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None) if config.get("_class_name") else None
    try:
        params = inspect.signature(cls.__init__).parameters if cls is not None else {}
    except (TypeError, ValueError):
        return []
    return [f"{key}: {value!r} is text, not a number" for key, value in config.items()
            if key in params and isinstance(value, str) and isinstance(params[key].default, (int, float))
            and not isinstance(params[key].default, bool)]
