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
    **{name: "sparse_plan" for name in ("SparsePlan", "Phase")},
    "PerHead": "per_head",
    "vsa_attention": "kernels.vsa",
    **{name: "weights" for name in ("load_method", "read_weights_info")},
    "DitAccelWarning": "_util",
    "BadFileError": "atomic_files",
    **{name: "pipelines.apply" for name in ("apply", "AccelHandle")},
    **{name: "pipelines.presets" for name in ("register_preset", "unregister_preset", "Preset", "GridInfo",
                                              "recommended", "published_settings")},
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dit_accel' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return __all__
