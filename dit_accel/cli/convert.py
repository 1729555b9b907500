"""``dit-accel convert``: an SLA checkpoint of the reference code (TurboDiffusion, thu-ml/SLA) as a weights folder.

Examples::

    # TurboDiffusion's Wan 2.1 checkpoint, its SLA projections for a Diffusers Wan model that already
    # holds the checkpoint's own weights (see docs/api.md, "Converting SLA checkpoints")
    dit-accel convert TurboWan2.1-T2V-1.3B-480P.pth --out turbo-sla --topk 0.1 --block-q 128 --skip-base-weights
    dit-accel generate --model ./TurboWan2.1-diffusers --weights turbo-sla ...
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from .options import HelpFormatter, plain

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="an SLA/TurboDiffusion Wan checkpoint as a dit_accel weights folder",
                              description=plain(__doc__), formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="the checkpoint (.pth, .pt or .safetensors) in the reference key layout "
                                      "(blocks.{i}.self_attn.<...>.proj_l.weight/.bias); Wan 2.2: the high-noise "
                                      "expert")
    p.add_argument("--transformer-2", default=None, metavar="CKPT",
                   help="Wan 2.2 A14B: the low-noise expert's checkpoint (Diffusers' transformer_2)")
    p.add_argument("--out", required=True, metavar="DIR", help="the weights folder to write")
    p.add_argument("--topk", type=float, default=0.1,
                   help="the top-k the weights were trained with (default 0.1, TurboDiffusion's default)")
    p.add_argument("--block-q", type=int, default=64, choices=(64, 128),
                   help="query block (default 64 as in training; TurboDiffusion's sla inference uses 128)")
    p.add_argument("--block-k", type=int, default=64, choices=(64, 128),
                   help="key block (default 64; TurboDiffusion's SageSLA uses 128 on sm_90)")
    p.add_argument("--feature-map", default="softmax", choices=("softmax", "elu", "relu"))
    p.add_argument("--linear-tokens", default="all", choices=("all", "marginal"),
                   help="the linear branch's tokens; the reference trains with all (marginal warns)")
    p.add_argument("--skip-base-weights", action="store_true",
                   help="the checkpoint also holds the model's own weights and the Diffusers model you will load "
                        "has them: convert only the SLA projections and LoRA")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing --out folder")
    p.set_defaults(func=run, _parser=p)
    return p


def run(args) -> int:
    from ..checkpoints.convert import convert_checkpoint
    from ..errors import one_line_error
    from ..methods import SLA

    if not args.out.strip():  # "" would name the current folder (and --overwrite would write into it)
        print("dit-accel convert: --out is empty: give the weights folder to write, e.g. --out turbo-sla",
              file=sys.stderr)
        return 2
    if not (math.isfinite(args.topk) and 0 < args.topk <= 1):  # (the config's error named SLA.topk, not the flag)
        print(f"dit-accel convert: --topk must be a number in (0, 1], the top-k fraction the weights were trained "
              f"with (TurboDiffusion's default 0.1); got {args.topk}", file=sys.stderr)
        return 2
    try:
        method = SLA.reference(topk=args.topk, block_q=args.block_q, block_k=args.block_k,
                               feature_map=args.feature_map).replace(linear_tokens=args.linear_tokens)
        out = convert_checkpoint(args.checkpoint, args.out, method=method, transformer_2=args.transformer_2,
                                 base_weights="skip" if args.skip_base_weights else "refuse",
                                 overwrite=args.overwrite, flags=True)
    except (ValueError, TypeError) as err:
        print(f"dit-accel convert: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # (before: a raw traceback for an --out where this user may not write, say)
        if one_line_error(err) is not None:  # a full disk: main's one line
            raise
        why = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        inputs = {os.path.abspath(p) for p in (args.checkpoint, args.transformer_2) if p}
        if err.filename and os.path.abspath(os.fsdecode(err.filename)) in inputs:
            print(f"dit-accel convert: cannot read the checkpoint ({why}); give a file you can read",
                  file=sys.stderr)
        else:
            print(f"dit-accel convert: cannot write --out {args.out} ({why}); give a folder "
                  "you can write to", file=sys.stderr)
        return 1
    print(f"dit-accel convert: wrote {out} ({method!r}); run it with dit_accel.apply(pipe, "
          f"dit_accel.load_method({str(out)!r}), weights={str(out)!r}) or dit-accel generate --weights {out}")
    return 0
