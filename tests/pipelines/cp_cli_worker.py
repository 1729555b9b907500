"""Worker for tests/pipelines/test_parallel.py: ``dit-accel generate --cp ...`` under torchrun.

Test harness only: on CPU Diffusers computes ``rank % torch.accelerator.device_count()``,
a modulo by zero, so ``device_count`` is patched to 1 in this process before the CLI runs.
"""

import sys

import torch

torch.accelerator.device_count = lambda: 1

from dit_accel.cli.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
