"""Whole-frame Tile with and without the copies it no longer makes (BENCHMARKS.md sections 8.4
and 8.7).

Self-attention (``attn1``) milliseconds per transformer call of tiny-shapes-63 at its grid (32, 12, 12), Tile 3
frames, batch 1, 2 threads: 7 interleaved rounds of 3 calls each (``--rounds``), A against B:

- ``python docs/scripts/tile_identity_ab.py`` (or ``permutation``): the identity permutation handing q, k, v and the
  output through (``identity``), against the four gathers forced back (``gathers``);
- ``python docs/scripts/tile_identity_ab.py kv``: the PyTorch twin reading K and V as views of the caller's tensors
  (``views``), against the copy of both into one buffer it made before (``copy``).
"""

from __future__ import annotations

import copy
import gc
import statistics
import time

import torch


def main(what: str = "permutation", rounds: int = 7) -> None:
    import dit_accel
    from diffusers import WanTransformer3DModel

    from dit_accel.models.tiny import tiny_transformer_inputs
    from dit_accel.models.tiny_shapes import TINY_SHAPES_63_DIR
    from dit_accel.kernels.block_sparse import naive
    from dit_accel.patterns.permutation import TilePermutation

    torch.set_num_threads(2)
    base = WanTransformer3DModel.from_pretrained(TINY_SHAPES_63_DIR, subfolder="transformer").eval()
    inputs = tiny_transformer_inputs("wan", base, grid=(32, 12, 12), batch=1)
    inputs.pop("return_dict", None)
    model = copy.deepcopy(base)
    dit_accel.apply(model, dit_accel.Tile(tile=(1, 12, 12), window=(3, 1, 1), block_size=144))
    spent = [0.0]

    def pre(_module, _args):
        spent.append(time.perf_counter())

    def post(_module, _args, _out):
        spent[0] += time.perf_counter() - spent.pop()

    for block in model.blocks:
        block.attn1.register_forward_pre_hook(pre)
        block.attn1.register_forward_hook(post)
    with torch.no_grad():
        model(**inputs, return_dict=False)  # builds the plan and its permutation
        perms = [o for o in gc.get_objects() if isinstance(o, TilePermutation)]
        assert perms and all(p.identity for p in perms)
        a, b = ("identity", "gathers") if what == "permutation" else ("views", "copy")
        view_or_none = naive._view_or_none
        ms = {a: [], b: []}
        for r in range(rounds):
            for mode in ((a, b) if r % 2 else (b, a)):
                for p in perms:
                    p.identity = mode != "gathers"
                naive._view_or_none = view_or_none if mode != "copy" else (lambda x, shape: None)
                model(**inputs, return_dict=False)
                spent[0] = 0.0
                for _ in range(3):
                    model(**inputs, return_dict=False)
                ms[mode].append(spent[0] / 3 * 1e3)
        naive._view_or_none = view_or_none
    for mode, values in ms.items():
        print(f"{mode}: median {statistics.median(values):.1f} ms (min {min(values):.1f}, max {max(values):.1f})")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="permutation", choices=("permutation", "kv"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    main(args.what, args.rounds)
