"""dit_accel: sparse attention for Diffusers diffusion transformers.

One line on any supported pipeline::

    import dit_accel
    handle = dit_accel.apply(pipe, dit_accel.Tile(tile=(6, 8, 8), window=(3, 3, 3)))
    ...
    handle.remove()

Methods: :class:`Dense`, :class:`GNA`, :class:`Tile`, :class:`Radial`, :class:`SLA`, :class:`VSA` (and its
functional op :func:`vsa_attention`), and any
method registered with :func:`register_method`; models: the presets, and any class
registered with :func:`register_preset`.
"""

__version__ = "0.2.0"

# Names resolve on first use: `import dit_accel` (and `dit-accel --help`) stays free of torch and diffusers.
_EXPORTS = {
    **{name: "methods" for name in ("Method", "Dense", "GNA", "Tile", "TileStrategy", "Radial", "SLA", "VSA",
                                    "method_from_name", "canonical_method_name", "register_method", "unregister_method", "registered_methods",
                                    "option")},
    **{name: "plans.sparse_plan" for name in ("SparsePlan", "Phase")},
    "PerHead": "plans.per_head",
    "vsa_attention": "kernels.vsa",
    **{name: "checkpoints.finetuned" for name in ("load_method", "read_weights_info")},
    "DitAccelWarning": "_util",
    "BadFileError": "atomic_files",
    **{name: "pipelines.apply" for name in ("apply", "AccelHandle")},
    **{name: "pipelines.presets" for name in ("register_preset", "unregister_preset", "Preset", "GridInfo",
                                              "recommended", "published_settings")},
}

__all__ = sorted(_EXPORTS) + ["__version__"]

# Modules that moved into the plans/ and checkpoints/ packages, importable under their old names
# (`import dit_accel.weights`, `from dit_accel.sparse_plan import SparsePlan`, `dit_accel.convert`).
_MOVED = {
    "sparse_plan": "plans.sparse_plan",
    "sparse_plan_json": "plans.plan_json",
    "sparse_plan_text": "plans.plan_text",
    "per_head": "plans.per_head",
    "vsa_plan": "plans.vsa",
    "weights": "checkpoints.finetuned",
    "gate_weights": "checkpoints.vsa_gates",
    "convert": "checkpoints.convert",
}


class _MovedModules:
    """Imports an old module name as the module it moved to (one module object under both names)."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        package, _, leaf = fullname.rpartition(".")
        if package != __name__ or leaf not in _MOVED:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(fullname, _MovedModules)

    @staticmethod
    def create_module(spec):
        import importlib

        module = importlib.import_module(f".{_MOVED[spec.name.rpartition('.')[2]]}", __name__)
        spec.loader_state = module.__spec__
        return module

    @staticmethod
    def exec_module(module):
        # Already executed under its new name; the import system set the alias's spec on it: give its own back.
        module.__spec__ = module.__spec__.loader_state


def _install_moved_modules():
    import sys

    if not any(finder is _MovedModules for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules)


_install_moved_modules()


def __getattr__(name):
    import importlib

    if name in _MOVED:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dit_accel' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return __all__
