"""Every method in the shape of tiny-shapes-63's shipped plan, as plan files for `dit-accel eval --plan`.

The shipped plan runs 2 dense steps, one bridge step of Tile over 17 of 32 frames, then Tile over 3 of 32 frames.
A method-config row has one method after its dense steps, so it cannot hold the bridge step; a plan can. This
writes one plan per method with the same steps and the same densities (17/32 on the bridge step, 3/32 after):

    python docs/scripts/tiny_shapes_63_matched_plans.py OUT_DIR
    dit-accel eval --model tiny-shapes-63 --plan OUT_DIR/gna.json --plan OUT_DIR/sla.json ...

Radial has no density setting (its least on this grid is 0.470), so its plan runs it on every step after the
dense ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dit_accel.methods import GNA, SLA, VSA, Radial, Tile
from dit_accel.plans.sparse_plan import Phase, SparsePlan

SHIPPED = Path(__file__).resolve().parents[2] / "dit_accel" / "models" / "plans" / "tiny-shapes-63.json"
FRAMES = 32  # latent frames of the 32x12x12 grid


def _shape(frames: int) -> dict:
    """Each method's setting that keeps ``frames`` of the 32 latent frames (whole frames where it has windows)."""
    keep = frames / FRAMES
    return {
        "tile": Tile(tile=(1, 12, 12), window=(frames, 1, 1), block_size=144),
        "gna": GNA(kernel_size=(frames, 12, 12)),
        "sla": SLA(topk=keep),
        "vsa": VSA(sparsity=1.0 - keep),
    }


def plans() -> dict:
    """``{name: SparsePlan}``: each method with the shipped plan's steps (its dense, bridge and sparse phases)."""
    shipped = SparsePlan.load(SHIPPED)
    (bridge, rest), layers = shipped.phases, range(shipped.num_layers)
    wide, narrow = _shape(bridge.method(0).window[0]), _shape(rest.method(0).window[0])
    out = {}
    for name in wide:
        out[name] = SparsePlan((Phase(bridge.start, bridge.stop, {i: wide[name] for i in layers}),
                                Phase(rest.start, rest.stop, {i: narrow[name] for i in layers})),
                               num_layers=shipped.num_layers, num_heads=shipped.num_heads)
    radial = Radial(block_size=64, decay=1.0, sink_frames=(0,))
    out["radial"] = SparsePlan((Phase(bridge.start, None, {i: radial for i in layers}),),
                               num_layers=shipped.num_layers, num_heads=shipped.num_heads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the plan files (created)")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    for name, plan in plans().items():
        plan.save(out / f"{name}.json")
        print(f"{out / (name + '.json')}: {plan.summary_line()}")


if __name__ == "__main__":
    main()
