"""Worker for tests/pipelines/test_vsa_parallel.py: VSA under context parallelism (torchrun, gloo on CPU).

``python -m torch.distributed.run --nproc_per_node 2 tests/pipelines/vsa_cp_worker.py OUT.json``: against the
single-process result (cp_worker.compare), Ulysses over 2 ranks and ring attention over 2 ranks in both call
orders, ring with non-zero to_gate_compress gates, LoRA gradients under ring, and the refusals of a gate under
Ulysses and of a ring split whose shares cut VSA's cubes.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.pipelines import cp_worker  # noqa: E402  (sets the harness up: offline, interpreter, device_count)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dit_accel  # noqa: E402
from dit_accel.pipelines.vsa_gates import add_trainable_gates  # noqa: E402

# cp_worker.WAN_GRID (4, 8, 8) over 2 ring ranks: 2 frames per rank, whole cubes of a tile 2 deep (8 cubes).
RING = dit_accel.VSA(topk=2, tile=(2, 4, 4))


def gated(ulysses: int, ring: int) -> dict:
    """Ring with non-zero trainable gates (the same in both runs) against one process; ``gate_effect``: how far
    the gated single-process output is from the ungated one (the gates matter)."""
    def run(parallel: bool, gates: bool):
        model = cp_worker.build("wan")
        kwargs = cp_worker.inputs("wan", model)
        handle = dit_accel.apply(model, RING, backend="torch")
        if gates:
            for i, gate in enumerate(add_trainable_gates(handle).values()):
                with torch.no_grad():
                    gen = torch.Generator().manual_seed(i)
                    gate.proj.weight.copy_(torch.randn(gate.proj.weight.shape, generator=gen) * 0.1)
                    gate.proj.bias.copy_(torch.randn(gate.proj.bias.shape, generator=gen) * 0.1)
        if parallel:
            model.enable_parallelism(config=cp_worker.cp_config(ulysses, ring))
        out = cp_worker.run(model, kwargs)
        handle.remove()
        return out

    want, got = run(False, True), run(True, True)
    return {"diff": float((got - want).abs().max()), "finite": bool(torch.isfinite(got).all()),
            "gate_effect": float((want - run(False, False)).abs().max())}


def main() -> int:
    path = sys.argv[1]
    dist.init_process_group("gloo")
    method = dit_accel.VSA(topk=1)
    result = {f"ulysses-{order}": cp_worker.compare("wan", method, 2, 1, order)
              for order in ("apply-first", "parallel-first")}
    result.update({f"ring-{order}": cp_worker.compare("wan", RING, 1, 2, order)
                   for order in ("apply-first", "parallel-first")})
    result["ring-gate"] = gated(1, 2)
    result["ring-grad"] = cp_worker.gradients("wan", RING, 1, 2)
    # Under Ulysses a rank's gate covers its sequence share while it attends every token for some heads.
    result["ulysses-gate"] = cp_worker.refused(lambda: gated(2, 1))
    # The default tile (4, 4, 4): a rank's 2 frames cut the 4-deep cubes.
    result["ring-straddling"] = cp_worker.refused(lambda: cp_worker.compare("wan", method, 1, 2, "apply-first"))
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
