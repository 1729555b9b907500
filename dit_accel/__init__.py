"""dit_accel: sparse attention for Diffusers diffusion transformers.

One line on any supported pipeline::

    import dit_accel
    handle = dit_accel.apply(pipe, dit_accel.Tile(tile=(6, 8, 8), window=(3, 3, 3)))
    ...
    handle.remove()

Methods: :class:`Dense`, :class:`GNA`, :class:`Tile`, :class:`Radial`, :class:`SLA`.
"""

from .methods import GNA, SLA, Dense, Method, Radial, Tile, method_from_name

__version__ = "0.1.0"

__all__ = ["apply", "Dense", "GNA", "Tile", "Radial", "SLA", "Method", "method_from_name", "__version__"]


def __getattr__(name):
    # apply() pulls in diffusers; keep `import dit_accel` light for kernel-only users.
    if name == "apply":
        from .pipelines.apply import apply

        return apply
    raise AttributeError(f"module 'dit_accel' has no attribute {name!r}")
