"""The checks of :mod:`dit_accel.eval.runner`'s inputs that run before anything loads: a ``--method-config`` file
and its ``dit_accel.apply`` options, and the arguments of :func:`~dit_accel.eval.runner.run_eval` from Python.
Each raises ValueError naming the argument or file, what is allowed and what to do."""

from __future__ import annotations

import json
import os

from ..methods import Method, registered_methods

__all__ = ["RESERVED_LABELS", "check_apply_options", "read_config", "check_run_arguments", "check_dense_shapes"]

#: The labels of the dense baseline and the dense-vs-dense floor rows, which no method row may take: results.json,
#: the statistics and ``--compare`` tell rows apart by label.
RESERVED_LABELS = ("dense", "dense~seed", "dense~triton", "dense~sdpa-math")


def check_apply_options(options: dict, where: str) -> None:
    """The ``dit_accel.apply`` options of a config entry, checked when the file is read: a bad one would
    otherwise fail its row only after the model loaded and the dense rows ran."""
    from .._util import is_int
    from ..pipelines.apply_checks import BACKENDS

    for key in ("dense_steps", "dense_last_steps"):
        if key in options and not (is_int(options[key]) and options[key] >= 0):
            raise ValueError(f"{where}: {key}={options[key]!r} is invalid: expected an int >= 0")
    layers = options.get("dense_layers")
    if layers is not None and not (is_int(layers) and layers >= 0) and not (
            isinstance(layers, list) and all(is_int(i) and i >= 0 for i in layers)):
        raise ValueError(f"{where}: dense_layers={layers!r} is invalid: expected an int >= 0 (the first N layers) "
                         "or a list of layer indices such as [0, 5]")
    if "layer_methods" in options and not (isinstance(options["layer_methods"], dict) and all(
            is_int(i) and i >= 0 and isinstance(m, Method) for i, m in options["layer_methods"].items())):
        raise ValueError(f"{where}: layer_methods={options['layer_methods']!r} is invalid: expected {{layer index: "
                         "dit_accel method config}} (a Python mapping; a JSON/YAML file cannot spell a config: give "
                         "the layer its own entry instead)")
    if "backend" in options and options["backend"] not in BACKENDS:
        raise ValueError(f"{where}: backend={options['backend']!r} is invalid: choose one of {', '.join(BACKENDS)}")
    if "weights" in options and not isinstance(options["weights"], str):
        raise ValueError(f"{where}: weights={options['weights']!r} is invalid: expected the path of a "
                         "`dit-accel finetune` folder")


def read_config(path: str):
    """The --method-config file's contents; ValueError with the parser's one-line reason when it is not valid."""
    from ..atomic_files import read_text

    text = read_text(path, what="--method-config: a JSON or YAML file of method options")
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"--method-config {path}: not valid YAML{where} "
                             f"({getattr(err, 'problem', None) or err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--method-config {path}: not valid JSON ({err}); YAML files need a .yaml suffix") from None


def check_run_arguments(settings, specs, out_dir, settings_type, spec_type) -> None:
    """``run_eval``'s ``settings`` (an ``settings_type``), ``specs`` (a list of ``spec_type`` rows, each of its own
    label, none the baseline's) and ``out_dir`` (a path). Before: a method config or a name in ``specs`` was an
    AttributeError ('Tile' object has no attribute 'label') after the dense rows had run, and two rows of one label
    were paired by ``--compare`` and the statistics as one."""
    if not isinstance(settings, settings_type):
        raise ValueError(f"settings={settings!r:.80} is invalid: run_eval takes an EvalSettings, e.g. "
                         "EvalSettings(model='tiny-wan', prompts=['a cat'], seeds=[0])")
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise ValueError(f"out_dir={out_dir!r:.80} is invalid: give the folder (a str or os.PathLike) that "
                         "results.json, report.md, pareto.png and grid.png go to")
    if isinstance(specs, (str, bytes, spec_type, Method)) or not isinstance(specs, (list, tuple)):
        raise ValueError(f"specs={specs!r:.80} is invalid: run_eval takes a list of MethodSpec rows, e.g. "
                         "load_method_specs(['tile', 'gna']) or [MethodSpec.parse('tile', {...})] ([] for the dense "
                         "rows only)")
    labels = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, spec_type):
            name = next((n for n, e in registered_methods().items() if e.cls is type(spec)), "label")
            hint = (f"MethodSpec({name!r}, specs[{i}]) wraps it" if isinstance(spec, Method)
                    else "MethodSpec.parse(name, options) builds one")
            raise ValueError(f"specs[{i}] is {type(spec).__name__} {spec!r:.60}, not a MethodSpec: {hint} "
                             "(load_method_specs(names) builds the rows of method names)")
        if spec.label in RESERVED_LABELS:
            raise ValueError(f"specs[{i}] is labelled {spec.label!r}, the label of a dense row run_eval adds itself "
                             f"({', '.join(RESERVED_LABELS)}); give it another label (MethodSpec.parse(name, options, "
                             "label=...))")
        if spec.label in labels:
            raise ValueError(f"specs[{labels[spec.label]}] and specs[{i}] are both labelled {spec.label!r}; give each "
                             "row its own label (MethodSpec.parse(name, options, label=...)): results.json, the "
                             "statistics and --compare tell rows apart by label")
        labels[spec.label] = i


def check_dense_shapes(dense_videos, fresh_videos, entry_path) -> None:
    """ValueError naming the dense cache entry (``entry_path(i)``, removed) whose frames are not of the shape this
    run's own generations (``fresh_videos``: the method rows') have: a file replaced or copied in. Before: "frame
    shapes differ ... generate both with the same --frames/--height/--width", which they had, and the entry stayed."""
    fresh = next((video.shape for video in fresh_videos), None)
    for i, video in enumerate(dense_videos):
        if fresh is not None and video.shape != fresh:
            path = entry_path(i)
            path.unlink(missing_ok=True)
            raise ValueError(f"dense cache entry {path} holds frames {tuple(video.shape)} [F, H, W, 3], but this "
                             f"run's videos are {tuple(fresh)} (the file was replaced or copied in): it is removed; "
                             "run the eval again to generate it")
