"""The arguments of ``dit-accel generate``: the checks that need no model, and the one-line error they raise
(the parser is :func:`dit_accel.cli.generate.register`)."""

from __future__ import annotations

from pathlib import Path

_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_PROMPT = "a red panda climbing a bamboo stalk, soft morning light"
DEFAULT_MODEL = "tiny-shapes-63"


class _UsageError(Exception):
    """A problem the user can fix; printed as one line."""


def _check_flags(args) -> None:
    """Everything about the flags that needs no model: fail before a (possibly long) load."""
    from ..videos import VIDEO_SUFFIXES
    from .checks import finite_error, seed_error

    for flag in ("frames", "height", "width", "steps", "max_sequence_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise _UsageError(f"--{flag.replace('_', '-')} must be >= 1; got {value}")
    if finite_error(args.guidance, "--guidance-scale", minimum=0):  # a NaN would silently turn guidance off
        raise _UsageError(finite_error(args.guidance, "--guidance-scale", minimum=0))
    if args.out is not None and not args.out.strip():
        raise _UsageError("--out is empty: give a file (.mp4, .gif, .png) or folder path, or leave --out out for "
                          "the default outputs/<model>-<method>.mp4")
    if args.out and Path(args.out).suffix and Path(args.out).suffix.lower() not in VIDEO_SUFFIXES:
        raise _UsageError(f"--out {args.out}: unknown suffix {Path(args.out).suffix!r}; use .mp4, .gif, .png "
                          "or a folder path (PNG frames)")
    if args.fps <= 0:
        raise _UsageError(f"--fps must be >= 1; got {args.fps}")
    if seed_error(args.seed):
        raise _UsageError(seed_error(args.seed))
    _check_writable(Path(args.out) if args.out else Path("outputs") / "out.mp4", "--out" if args.out else
                    "the default output folder outputs/ (pass --out PATH)")


def _check_writable(out: Path, what: str) -> None:
    """The folder ``out`` (and its sidecar) will be written to exists or can be made, and takes a file: checked
    before a long generation, not after it."""
    import tempfile

    folder = out if not out.suffix else out.parent
    if out.suffix and out.is_dir():
        raise _UsageError(f"{what}: {out} is a folder; give a file path such as {out / 'video.mp4'}")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise _UsageError(f"{what}: {existing} is a file, so the folder {folder} cannot be made; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dit-accel-write-check-"):
            pass
    except OSError as err:
        raise _UsageError(f"{what}: cannot write to {folder} ({err.strerror or err}); choose a writable path") \
            from None
