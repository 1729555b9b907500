"""``python -m dit_accel ...`` is the same as the ``dit-accel`` command."""

import sys

from dit_accel.cli.main import main

sys.exit(main())
