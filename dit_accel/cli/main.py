"""``dit-accel``: generate, info, finetune, eval, bench, convert, calibrate, selftest.

Each subcommand lives in its own module ``dit_accel.cli.<name>`` exposing
``register(subparsers)`` (adds its parser and ``set_defaults(func=run)``) and
``run(args) -> int``. Only the module of the subcommand being run is imported,
so ``dit-accel --help`` stays fast and does not import torch or Diffusers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from .._util import use_interpreter_without_cuda
from ..errors import one_line_error

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

# name -> (module, one-line help shown by `dit-accel --help`)
SUBCOMMANDS = {
    "generate": ("dit_accel.cli.generate", "generate a video/image with a sparse-attention method (default: a "
                                           "trained tiny-shapes model with its calibrated plan, beside a dense run "
                                           "of the same call)"),
    "info": ("dit_accel.cli.info", "versions, device, kernel backends, supported models and methods"),
    "finetune": ("dit_accel.cli.finetune", "fine-tune a model for a sparse method (SLA projections, LoRA) by distillation"),
    "eval": ("dit_accel.cli.eval", "quality of a sparse method against dense (PSNR, SSIM, LPIPS, FID, CLIP)"),
    "bench": ("dit_accel.cli.bench", "attention kernel and end-to-end speed benchmarks"),
    "convert": ("dit_accel.cli.convert", "an SLA/TurboDiffusion Wan checkpoint as a dit_accel weights folder"),
    "calibrate": ("dit_accel.cli.calibrate", "search a sparse plan per layer, head and step under a quality budget"),
    "selftest": ("dit_accel.cli.selftest", "check every kernel variant this machine would use against its fp32 twin"),
}

_EPILOG = """examples:
  dit-accel generate                                   # a trained, shipped model with its calibrated plan vs dense
  dit-accel generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --method radial --device cuda --dtype bfloat16
  dit-accel info
run `dit-accel COMMAND --help` for the options of a command."""


class _NoTorchvisionNotice(logging.Filter):
    """Transformers' notice that an image processor falls back to its PIL version without torchvision:
    dit_accel does not use torchvision (it is not a dependency), so the fallback is the intended path."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_TRANSFORMERS_IMPORTS = "transformers.utils.import_utils"  # the logger that emits it (a filter needs no import)


def _setup_environment() -> None:
    # Triton on a machine without CUDA only runs through its interpreter, which must be
    # chosen before anything imports triton (Diffusers does).
    use_interpreter_without_cuda()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def _show_warnings(quiet: bool):
    """dit_accel's warnings as one clean line each on stderr (above any progress bar), none with ``--quiet``.

    Either way they are kept: the commands write them into their JSON outputs. Other libraries' warnings
    keep Python's format.
    """
    import warnings

    from .._util import DitAccelWarning

    python_default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, DitAccelWarning):
            return python_default(message, category, filename, lineno, file, line)
        if quiet:
            return None
        text = str(message)
        text = text[len("dit_accel: "):] if text.startswith("dit_accel: ") else text
        try:
            from tqdm import tqdm

            tqdm.write(f"dit-accel: warning: {text}", file=sys.stderr)
        except ImportError:
            print(f"dit-accel: warning: {text}", file=sys.stderr)
        return None

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = python_default


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported and registered."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="dit-accel",
        description="Sparse attention (radial, sliding tile, GNA, SLA, VSA) for Diffusers diffusion transformers.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dit-accel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        if name == command:
            importlib.import_module(SUBCOMMANDS[name][0]).register(sub)
            continue
        # Placeholder so `--help` lists every command without importing it.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dit-accel`` console script; returns the exit status (130 on Ctrl-C)."""
    # Ctrl-C ends a command the same way at any moment: during the first seconds (importing a subcommand's
    # module pulls in torch and Diffusers) as later in its work, with one line and no traceback.
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("dit-accel: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader closed stdout (`dit-accel bench layouts --json | head -1`): stop quietly
        if not _stdout_closed():
            raise  # (another pipe broke: its traceback is the useful part)
        _drop_stdout()
        return 141  # what a shell reports for a writer a closed pipe ended (128 + SIGPIPE)


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone: what is left in its buffer cannot be written, or the pipe reports an error."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError, AttributeError):
        return False
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _drop_stdout() -> None:
    """stdout pointed at the null device: the interpreter flushes it on exit, which would raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # (a stdout with no file behind it, as under a test's capture)
        pass


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in SUBCOMMANDS:
        command = None  # let argparse report the invalid choice
    if command is not None:
        _setup_environment()
    parser = build_parser(command)
    args = parser.parse_args(argv)
    args._argv = argv  # recorded in output metadata (e.g. the generate sidecar)
    if args.command is None:
        parser.print_help()
        return 0
    notice = _NoTorchvisionNotice()
    logging.getLogger(_TRANSFORMERS_IMPORTS).addFilter(notice)
    try:
        with _show_warnings(bool(getattr(args, "quiet", False))):
            return int(args.func(args) or 0)
    except (OSError, RuntimeError) as err:  # a full disk, a forced backend that cannot run: one line, no traceback
        message = one_line_error(err)
        if message is None:
            raise
        print(f"dit-accel: error: {message}", file=sys.stderr)
        return 1
    finally:
        logging.getLogger(_TRANSFORMERS_IMPORTS).removeFilter(notice)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
