"""``python -m dit_accel.comfyui install /path/to/ComfyUI`` (see :mod:`.install`)."""

import sys

from .install import main

if __name__ == "__main__":
    sys.exit(main())
