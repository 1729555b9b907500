"""``dit-accel finetune``: LoRA (+ SLA projections, + VSA gates) for a sparse method, by distillation or on data.

Examples::

    # distill the dense model into SLA, no dataset (how SLA was tuned)
    dit-accel finetune --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --method sla --topk 0.05 \\
        --mode distill --prompts prompts.txt --steps 2000 --lr 1e-4 --rank 64 --output sla-wan \\
        --mixed-precision bf16 --gradient-checkpointing --checkpoint-every 200

    # several GPUs; on a machine without CUDA the same line runs N CPU processes over gloo.
    # --multi_gpu is needed for CPU processes too: without it (or with --cpu) accelerate starts ONE process.
    accelerate launch --multi_gpu --num_processes 2 -m dit_accel.cli.finetune --model tiny-wan --method gna ...

    # VSA: a zero-initialised to_gate_compress gate per layer plus LoRA; the sparsity rises from 0 to 0.9
    # over the first 500 steps (FastVideo's decay)
    dit-accel finetune --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --method vsa --vsa-sparsity 0.9 \\
        --vsa-decay-steps 500 --prompts prompts.txt --steps 2000 --output vsa-wan

    # under a calibrated plan (dit-accel calibrate): a method per layer, head and step
    dit-accel finetune --model tiny-shapes --plan plan.json --prompts prompts.txt --steps 200 --output plan-ft

    # load the result
    handle = dit_accel.apply(pipe, dit_accel.training.load_method("sla-wan"), weights="sla-wan")
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Optional, Sequence

from .._util import use_interpreter_without_cuda
from .options import HelpFormatter, add_method_options, method_from_args
from .parallel import add_cp_option

__all__ = ["register", "run", "main", "config_from_args"]

_DESCRIPTION = (
    "Fine-tune LoRA adapters (and SLA's projections) so a model works well under a sparse attention method. "
    "distill: the dense model is the teacher (MSE between student and teacher transformer outputs on the same "
    "noisy latents, timesteps and prompts); data: flow-matching loss on a caption folder (metadata.jsonl). "
    "Runs under `accelerate launch` on 1..N processes."
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ..methods import METHOD_ALIASES

    add_method_options(p, default_method=None, weights=False)
    for action in p._actions:  # (the shared help offered dense "as a baseline" and denoising-step flags: refused here)
        if action.dest == "method":
            action.help = ("the sparse method to adapt the model to (required unless --plan): sla, radial, tile, "
                           "gna or vsa (dense has nothing to adapt to); aliases: "
                           + ", ".join(f"{a} = {n}" for a, n in METHOD_ALIASES.items()))
        elif action.dest in ("dense_steps", "dense_last_steps"):
            action.help = argparse.SUPPRESS  # a denoising-loop schedule; finetune trains single transformer calls
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="train under a calibrated SparsePlan (dit-accel calibrate --out) instead of --method: "
                        "every layer, head and step runs what the plan says; LoRA on every layer, SLA projections "
                        "where the plan has SLA heads. Sizes default to the plan's")
    g.add_argument("--model", default="tiny-wan", help="tiny-wan, tiny-flux, a local Diffusers folder or a hub id (Wan, HunyuanVideo or FLUX; --mode data: Wan)")
    g.add_argument("--mode", choices=("distill", "data"), default="distill",
                   help="distill: dense teacher, needs --prompts; data: needs --data (default: distill)")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay, >= 0 (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm, >= 0; 0 disables (default 1.0)")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    g.add_argument("--target-modules", default="to_q,to_k,to_v,to_out.0",
                   help="comma-separated module names that get LoRA (default to_q,to_k,to_v,to_out.0)")
    g.add_argument("--prompts", default=None, metavar="FILE", help="text file, one prompt per line (distill)")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="folder with metadata.jsonl ({'file_name', 'text'}) and images/videos (data mode; "
                        "in distill mode it supplies real latents and prompts)")
    g.add_argument("--output", required=True, metavar="DIR", help="output folder (weights, checkpoints, log)")
    g.add_argument("--batch-size", type=int, default=1, help="samples per process per micro-batch (default 1)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=None, metavar="A",
                   help="micro-batches per optimizer step (samples per step = batch x A x processes). Default: "
                        "distill: enough for 8 samples per step (one-sample distillation steps mostly fit noise), "
                        "data: 1")
    g.add_argument("--frames", type=int, default=None,
                   help="frames per sample (default: 81 for video models, 1 for image models; embedded models: "
                        "their own size, e.g. tiny-wan 17, tiny-shapes 7, tiny-flux 1)")
    g.add_argument("--height", type=int, default=None,
                   help="pixel height (default: 480 for video, 1024 for image models; embedded models: their own)")
    g.add_argument("--width", type=int, default=None,
                   help="pixel width (default: 832 for video, 1024 for image models; embedded models: their own)")
    g.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (default 512; tiny: 32)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="checkpoint every K steps (the last step is always checkpointed)")
    g.add_argument("--checkpoints-total-limit", type=int, default=2, help="checkpoints kept (0: all; default 2)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    g.add_argument("--overwrite", action="store_true", help="replace what --output holds")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="frozen weights in this dtype, forward under autocast (default: what `accelerate launch "
                        "--mixed_precision` or its config says, else no)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--log-every", type=int, default=10, help="progress-bar loss update interval (default 10)")
    g.add_argument("--eval-batches", type=int, default=2,
                   help="held-out batches whose loss is logged before and after training (default 2, 0 disables)")
    g.add_argument("--eval-data", default=None, metavar="DIR",
                   help="with --data: a caption folder of clips kept out of training, for the held-out batches "
                        "(default: --data's clips at noise levels and timesteps of their own)")
    g.add_argument("--sla-lr-scale", type=float, default=1.0, help="SLA projection learning rate relative to --lr")
    g.add_argument("--vsa-decay-steps", type=int, default=None, metavar="N",
                   help="--method vsa: steps over which the sparsity rises from 0 (dense) to the target, FastVideo's "
                        "VSA sparsity decay (default: a quarter of --steps; 0: the target from the start)")
    g.add_argument("--vsa-decay-interval", type=int, default=1, metavar="K",
                   help="--method vsa: the sparsity rises every K steps (FastVideo's VSA_decay_interval_steps; "
                        "default 1)")
    g.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bar and no warnings on the terminal (they stay in the output folder's log)")
    add_cp_option(g)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("finetune", help="fine-tune LoRA (+ SLA projections) for a sparse method",
                              description=_DESCRIPTION, formatter_class=HelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run, _parser=p)
    return p


def config_from_args(args: argparse.Namespace):
    """Parsed options -> :class:`dit_accel.training.FinetuneConfig` (ValueError on bad combinations)."""
    from ..training import FinetuneConfig
    from .options import check_plan_flags

    plan = getattr(args, "plan", None)
    check_plan_flags(args)
    if plan is None and args.method is None:
        raise ValueError("--method is required: one of sla, radial, tile, gna, vsa (or --plan PLAN.json).")
    if args.method == "dense":
        raise ValueError("--method dense has nothing to adapt to; choose sla, radial, tile, gna or vsa.")
    for flag in ("dense_steps", "dense_last_steps"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} is a denoising-loop schedule; finetune trains single "
                             "transformer calls. Pass it to `generate` instead.")
    # Without the parser, a bad method option is a ValueError: run() prints it as one line (no usage block).
    bare = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "_parser"})
    method = method_from_args(bare, parser=None) if plan is None else None
    defaults = _size_defaults(args.model, plan)
    from ..models.loading import early_size_error, early_text_length_error

    problem = (early_size_error(args.model, args.height, args.width)  # (else refused only once the model loaded)
               or early_text_length_error(args.model, args.max_sequence_length) or _early_rank_error(args))
    if problem:
        raise ValueError(problem)
    dense_layers = args.dense_layers
    if isinstance(dense_layers, int):
        if dense_layers < 0:  # range(-1) is empty: every layer would train sparse, as if the flag were not given
            raise ValueError(f"--dense-layers {dense_layers} is invalid: give a count >= 0 (the first N layers "
                             "run dense) or a list of layer indices such as 0,5,7.")
        dense_layers = list(range(dense_layers))
    return FinetuneConfig(
        model=args.model, method=method, output=args.output, mode=args.mode, steps=args.steps, lr=args.lr,
        rank=args.rank, alpha=args.alpha,
        target_modules=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()),
        prompts=args.prompts, data=args.data, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        frames=args.frames if args.frames is not None else defaults["frames"],
        height=args.height if args.height is not None else defaults["height"],
        width=args.width if args.width is not None else defaults["width"],
        max_sequence_length=(args.max_sequence_length if args.max_sequence_length is not None
                             else defaults["max_sequence_length"]),
        seed=args.seed, checkpoint_every=args.checkpoint_every, checkpoints_total_limit=args.checkpoints_total_limit,
        resume=args.resume, overwrite=args.overwrite, mixed_precision=_mixed_precision(args.mixed_precision),
        gradient_checkpointing=args.gradient_checkpointing, log_every=args.log_every,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, lr_warmup_steps=args.lr_warmup_steps,
        backend=args.backend or "auto", dense_layers=dense_layers, eval_batches=args.eval_batches,
        eval_data=args.eval_data,
        sla_lr_scale=args.sla_lr_scale,
        progress=not args.quiet, cp=args.cp, plan=plan,
        vsa_decay_steps=args.vsa_decay_steps, vsa_decay_interval=args.vsa_decay_interval,
    )


#: Attention projections: each has the transformer's heads x head_dim features on one side (fewer with fewer k/v heads).
_PROJECTIONS = frozenset(("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))


def _early_rank_error(args) -> Optional[str]:
    """Why ``--rank`` is past the width of the attention projections ``--target-modules`` adapts, where the model's
    folder (an embedded, local or cached one) gives its transformer's heads and head size before it loads; None where
    it fits or is not known (a model built in code, an uncached hub id: the check after loading names the layer).
    Before: a rank of 100000 on a 128-wide model was refused only once the model had loaded."""
    from .._util import is_int
    from ..models.loading import component_config, model_folder

    targets = {t.strip() for t in args.target_modules.split(",")}
    if not is_int(args.rank) or args.rank <= 0 or not targets & _PROJECTIONS:
        return None  # (a rank < 1 is FinetuneConfig's to refuse, in its words)
    config = component_config(model_folder(args.model), "transformer")
    heads, size = config.get("num_attention_heads"), config.get("attention_head_dim")
    if not (is_int(heads) and is_int(size) and heads > 0 and size > 0) or args.rank <= heads * size:
        return None
    width = heads * size
    return (f"--rank {args.rank} is past the width of the attention layers of {args.model} ({heads} heads x {size} "
            f"= {width} features, its transformer/config.json): a LoRA's rank is at most the fewer of a layer's input "
            f"and output features. Pass --rank {width} or less.")


def _mixed_precision(flag: Optional[str]) -> str:
    """``--mixed-precision``, else what ``accelerate launch --mixed_precision`` (or its config file) asked for. Before:
    the option's default "no" overrode it, so `accelerate launch --mixed_precision bf16 -m dit_accel.cli.finetune`
    trained in float32 (twice the memory) without a word."""
    from ..training.config import launched_mixed_precision

    return flag if flag is not None else launched_mixed_precision()


def _size_defaults(model: str, plan=None) -> dict:
    """Sample sizes when not given: the plan's calibration size with --plan, else an embedded model's own
    (tiny-flux makes images: 1 frame), else 81 frames at 480x832 for video models and one 1024x1024 image
    for image models."""
    from ..models.tiny import TINY_DEFAULTS
    from ..pipelines.presets import model_family

    if plan is not None:
        from ..plans.sparse_plan import SparsePlan

        try:
            call = SparsePlan.load(plan).provenance.get("call") or {}
        except ValueError as err:
            raise ValueError(f"--plan {plan}: {err}") from None
        if {"height", "width"} <= set(call):  # (an image model's plan records no num_frames: one frame)
            sizes = _size_defaults(model)
            return {"frames": call.get("num_frames", 1), "height": call["height"], "width": call["width"],
                    "max_sequence_length": call.get("max_sequence_length") or sizes["max_sequence_length"]}

    if model in TINY_DEFAULTS:
        sizes = TINY_DEFAULTS[model]
        return {"frames": sizes["num_frames"], "height": sizes["height"], "width": sizes["width"],
                "max_sequence_length": 32}
    try:
        image = model_family(model)[0].endswith("2DModel")
    except ValueError:  # unknown here: the loader names the problem
        image = False
    if image:
        return {"frames": 1, "height": 1024, "width": 1024, "max_sequence_length": 512}
    return {"frames": 81, "height": 480, "width": 832, "max_sequence_length": 512}


def run(args: argparse.Namespace) -> int:
    """Run the fine-tuning; prints a one-line summary. Input errors: message on stderr, exit status 2; a run that
    diverged (NaN or inf weights or losses): message on stderr, exit status 1, no weights written."""
    try:
        with _terminate_as_interrupt():
            return _run(args)
    except _Terminated:
        print("dit-accel finetune: stopped (SIGTERM): checkpoints written so far stay in --output for --resume; a run "
              "stopped before its first checkpoint left --output as it was.", file=sys.stderr)
        return 143  # (128 + SIGTERM, what a shell reports for a process the signal ended)
    finally:
        _end_process_group()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it unwinds as it does on Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``timeout``, ``docker stop``, ``kill``, a cluster scheduler's stop or preemption) ends the run as Ctrl-C
    does: a failed run's clean-up runs (a run stopped before its first checkpoint puts --output back as it was, and
    what --overwrite set aside comes back). Before: the process died at once, leaving a run record without weights
    that a new run refused as "another fine-tuning run", and a run with --overwrite lost the run it was replacing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, previous)  # (a second SIGTERM during the clean-up ends it the usual way)
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_process_group() -> None:
    """Tear down the process group of an ``accelerate launch`` run before the interpreter exits: left to exit-time
    destructors, gloo's threads can abort a rank ("terminate called without an active exception", exit status -6)
    after its work is done and the weights are written, and the launcher then reports the whole run failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    from ..errors import NonFiniteOutputError

    try:
        config = config_from_args(args)
        from ..training import finetune

        result = finetune(config)
    except ValueError as err:
        print(f"dit-accel finetune: error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteOutputError, MemoryError) as err:  # diverged, out of memory: the output folder as it was
        print(f"dit-accel finetune: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # model loading errors are one actionable line, not a traceback
        if type(err).__name__ == "ModelLoadError":
            print(f"dit-accel finetune: error: {err}", file=sys.stderr)
            return 2
        raise
    from accelerate import PartialState

    if PartialState().is_main_process:
        loss = result["loss"]
        msg = f"finetune: {result['steps_this_session']} steps this session"
        if result["resumed_from"] is not None:
            msg += f" (resumed at step {result['resumed_from']} of {result['steps']})"
        if loss and result["resumed_from"] is not None:  # (the losses of earlier sessions too: say whose steps)
            msg += f", loss {loss[0]:.4g} at step 1 -> {loss[-1]:.4g} at step {len(loss)}"
        elif loss:
            msg += f", loss {loss[0]:.4g} -> {loss[-1]:.4g}"
        if result.get("eval_loss_start") is not None:
            msg += f", held-out loss {result['eval_loss_start']:.4g} -> {result['eval_loss_end']:.4g}"
        print(msg + f"; weights in {result['output']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry point (``python -m dit_accel.cli.finetune`` / ``accelerate launch -m ...``)."""
    use_interpreter_without_cuda()  # before anything imports triton
    parser = argparse.ArgumentParser(prog="dit-accel finetune", description=_DESCRIPTION, formatter_class=HelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    args._parser = parser
    from .main import _show_warnings

    # (as `dit-accel finetune` shows them: before, `accelerate launch -m dit_accel.cli.finetune --quiet` printed every
    # warning in Python's format all the same)
    with _show_warnings(args.quiet):
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
