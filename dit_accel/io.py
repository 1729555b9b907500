"""Public alias of :mod:`dit_accel.videos` (reading and writing generated videos), kept so that
``dit_accel.io.save_video`` and ``dit_accel.io.load_video`` go on working."""

from .videos import *  # noqa: F401,F403
from .videos import __all__  # noqa: F401
