"""The preset registry: one module per family, all of them registered, each with a tiny transformer."""

import importlib
from pathlib import Path

from dit_accel.models import tiny as T
from dit_accel.pipelines import presets as P


def _family_modules(package) -> set:
    return {p.stem for p in Path(package.__file__).parent.glob("*.py") if not p.stem.startswith("_")}


def test_every_family_module_is_registered_in_order():
    assert _family_modules(P) == set(P.FAMILIES)
    shipped = [p.class_name for name in P.FAMILIES for p in importlib.import_module(f"{P.__name__}.{name}").PRESETS]
    assert list(P.SUPPORTED) == shipped and len(set(shipped)) == len(shipped)


def test_every_supported_class_has_a_tiny_transformer_in_the_module_of_the_same_name():
    assert _family_modules(T) == set(T.FAMILIES) and set(T.FAMILIES) <= set(P.FAMILIES)
    for name in P.FAMILIES:
        classes = {p.class_name for p in importlib.import_module(f"{P.__name__}.{name}").PRESETS}
        tiny = {t.class_name for t in importlib.import_module(f"{T.__name__}.{name}").TRANSFORMERS}
        assert classes <= tiny, name


def test_every_tiny_pipeline_names_its_family():
    for name in T.FAMILIES:
        module = importlib.import_module(f"{T.__name__}.{name}")
        for pipe in getattr(module, "PIPELINES", ()):  # tiny-<family>: resolved without loading it
            assert P.resolve_model_family(pipe.name)[0] in {t.class_name for t in module.TRANSFORMERS}, pipe.name
