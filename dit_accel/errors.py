"""Which errors a command reports in one line, and that line (:func:`one_line_error`).

Errors that say what is wrong and what to do need no traceback: a full disk while writing an artefact (the
message names the file, see :mod:`dit_accel.atomic_files`), and a backend forced by name that cannot run here
(:class:`~dit_accel.kernels.request.BackendUnavailable`, :class:`~dit_accel.kernels.selfcheck.VariantFailed`:
the message names the backend or variant, its error and the fix). Anything else keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from typing import Optional

__all__ = ["one_line_error", "NonFiniteOutputError"]

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class NonFiniteOutputError(RuntimeError):
    """A model's output holds NaN or inf: refused rather than saved as black (or white) pixels, so a command exits
    non-zero and the previous output stays in place. The message says where and what to check."""

    one_line = True


def one_line_error(err: BaseException) -> Optional[str]:
    """The one-line report of ``err`` for a command's user, or None when its traceback is the useful part."""
    if isinstance(err, OSError) and err.errno in _FULL:
        where = f" ({err.filename})" if err.filename and str(err.filename) not in (err.strerror or "") else ""
        return " ".join(f"{err.strerror or err}{where}".split())
    if getattr(err, "one_line", False):  # NonFiniteOutputError, atomic_files.BusyError: the message says what to do
        return " ".join(str(err).split())
    request = sys.modules.get("dit_accel.kernels.request")  # imported by whatever raised one
    if request is not None and isinstance(err, request.BackendUnavailable):
        return " ".join(str(err).split())
    return None
