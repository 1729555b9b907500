"""Worker for tests/pipelines/test_vsa_parallel.py: VSA under context parallelism (torchrun, gloo on CPU).

``python -m torch.distributed.run --nproc_per_node 2 tests/pipelines/vsa_cp_worker.py OUT.json``: Ulysses over 2
ranks in both call orders against the single-process result (cp_worker.compare), and the refusal of ring.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.pipelines import cp_worker  # noqa: E402  (sets the harness up: offline, interpreter, device_count)
import torch.distributed as dist  # noqa: E402

import dit_accel  # noqa: E402


def main() -> int:
    path = sys.argv[1]
    dist.init_process_group("gloo")
    method = dit_accel.VSA(topk=1)
    result = {f"ulysses-{order}": cp_worker.compare("wan", method, 2, 1, order)
              for order in ("apply-first", "parallel-first")}
    result["ring"] = cp_worker.refused(lambda: cp_worker.compare("wan", method, 1, 2, "apply-first"))
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
