"""Ground truth of tiny-shapes videos (colour, shape, motion, one stable object): :mod:`dit_accel.models.groundtruth`,
which lives beside the synthetic clips it scores; this name is kept for eval's callers."""

from ..models.groundtruth import *  # noqa: F401,F403
from ..models.groundtruth import __all__  # noqa: F401
