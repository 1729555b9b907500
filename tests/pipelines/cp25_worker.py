"""Worker for tests/pipelines/test_round25_parallel.py: run under ``torchrun --nproc_per_node 2``.

``python -m torch.distributed.run --nproc_per_node 2 tests/pipelines/cp25_worker.py OUT``

Every rank runs each case: the same tiny transformer and method on one process (no parallelism) and under
Diffusers' ``ContextParallelConfig`` (Ulysses 2 or Ring 2), at grids whose shares are uneven or under one block, one
frame, Flux's joint text, Qwen-Image's padded text masks with batch 2, a ``dense_steps=1`` schedule; it records the
largest difference, the stats of its own rank, or the refusal's message. Each rank writes ``OUT.<rank>`` (the test
compares the ranks' messages). After every case the ranks meet (a barrier and a sum over them), so a refusal said
on one rank only would hang the next case: the launch's timeout and the process group's (60 s) catch it.
"""

import datetime
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.accelerator.device_count = lambda: 1  # the harness workaround (see cp_worker.py)

import dit_accel  # noqa: E402
from diffusers import ContextParallelConfig  # noqa: E402
from dit_accel.models import tiny as T  # noqa: E402
from tests.pipelines.cp_worker import build  # noqa: E402

D = dit_accel
SPLITS = {"ulysses": (2, 1), "ring": (1, 2)}


def compare(family, method, split, grid, *, batch=1, text=8, text_valid=None, steps=0, apply_kw=None):
    """Max |one process - context parallel| over ``steps`` steps (0: one call without a step), this rank's
    summary and its handle's plan density, for ``method`` on ``family`` at ``grid``."""
    apply_kw = dict(apply_kw or {}, backend="torch")
    single = build(family)
    kwargs = T.tiny_transformer_inputs(family, single, grid=grid, batch=batch, text=text, text_valid=text_valid)
    handle = dit_accel.apply(single, method, **apply_kw)
    wants = []
    for step in range(max(steps, 1)):
        if steps:
            handle.set_step(step, steps)
        with torch.no_grad():
            wants.append(single(**kwargs)[0])
    handle.remove()
    model = build(family)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=SPLITS[split][0],
                                                          ring_degree=SPLITS[split][1]))
    handle = dit_accel.apply(model, method, **apply_kw)
    diffs, calls = [], []
    for step in range(max(steps, 1)):
        if steps:
            handle.set_step(step, steps)
        with torch.no_grad():
            got = model(**kwargs)[0]
        diffs.append(float((got - wants[step]).abs().max()))
        summary = handle.summary()
        calls.append((summary["sparse_calls"], summary["dense_calls"]))
    own, every = handle.summary(), handle.summary(all_ranks=True)
    plan = handle.plan(method, grid) if not isinstance(method, D.Dense) else None
    return {"diff": max(diffs), "diffs": diffs, "calls": calls, "density": own["mean_density"],
            "all_ranks_density": every["mean_density"], "plan_density": None if plan is None else plan.density,
            "finite": bool(torch.isfinite(got).all())}


def cases():
    """``(name, family, method, split, grid, options)``: every case runs on both ranks."""
    wan_methods = {"tile": D.Tile(tile=(1, 8, 8), window=(3, 1, 1)), "radial": D.Radial(block_size=64, decay=1.0),
                   "gna": D.GNA(kernel_size=(2, 3, 3)), "sla": D.SLA(topk=0.5), "vsa": D.VSA(topk=2, tile=(2, 4, 4))}
    out = []
    for split in SPLITS:
        for label, method in wan_methods.items():
            # 8 frames of 4x4 (shares of 64 tokens: whole blocks, whole (2, 4, 4) cubes); 4x6x6 (shares of 72 tokens)
            out.append((f"wan/{label}/{split}/8x4x4", "wan", method, split, (8, 4, 4), {}))
            out.append((f"wan/{label}/{split}/4x6x6", "wan", method, split, (4, 6, 6), {}))
        out.append((f"wan/sla/{split}/1x8x8", "wan", D.SLA(topk=0.5), split, (1, 8, 8), {}))  # one frame, 32 a rank
        out.append((f"wan/gna/{split}/3x5x7", "wan", D.GNA(kernel_size=(2, 3, 3)), split, (3, 5, 7), {}))  # 105
        out.append((f"wan/tile/{split}/dense_steps", "wan", D.Tile(tile=(1, 8, 8), window=(3, 1, 1)), split,
                    (4, 8, 8), {"steps": 2, "apply_kw": {"dense_steps": 1}}))
        for label, method in (("tile", D.Tile(tile=(4, 16), window=(1, 1))), ("gna", D.GNA(kernel_size=(3, 5))),
                              ("sla", D.SLA(topk=0.5))):
            out.append((f"flux/{label}/{split}/8x16", "flux", method, split, (8, 16), {}))
            out.append((f"qwenimage/{label}/{split}/8x16-masked", "qwenimage", method, split, (8, 16),
                        {"batch": 2, "text_valid": [8, 3]}))
        out.append((f"flux/sla/{split}/text7", "flux", D.SLA(topk=0.5), split, (8, 16), {"text": 7}))
        # two layers whose methods both refuse a ring share: every rank says layer 0's (Tile's) refusal
        out.append((f"wan/two-refusals/{split}/1x8x8", "wan", D.Tile(tile=(1, 4, 4), window=(1, 1, 1)), split,
                    (1, 8, 8), {"apply_kw": {"layer_methods": {1: D.SLA(topk=0.5)}}}))
    return out


def main() -> int:
    out_path = sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    result = {}
    for name, family, method, split, grid, options in cases():
        torch.manual_seed(0)
        try:
            result[name] = compare(family, method, split, grid, **options)
        except ValueError as err:
            result[name] = str(err)
        alive = torch.ones(1)
        dist.all_reduce(alive)  # both ranks reached the end of this case
        result[name + "#ranks"] = float(alive)
    with open(f"{out_path}.{dist.get_rank()}", "w") as fh:
        json.dump(result, fh, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
