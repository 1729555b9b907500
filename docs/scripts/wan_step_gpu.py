"""The figure users see (issue 72, item 8): one denoising step of Wan 2.1 1.3B, dense against the recommended Tile
and VSA settings and against both at 10% density, and the README's main job against dense.

The transformer is Wan 2.1 T2V 1.3B's configuration (30 blocks, 12 heads x 128, 1,536 wide) with random weights,
in bf16, at 480p and 81 frames: latents (1, 16, 21, 60, 104), a (21, 30, 52) token grid of 32,760 tokens, 512 text
tokens of width 4,096. Each setting is applied with ``dit_accel.apply`` (Tile from ``dit_accel.recommended``, VSA
at its (4, 4, 4) cubes without gates: random weights have none), warmed up (kernel compiles, the autotuner, the
first-use self-checks), then timed over ``--steps`` transformer calls with CUDA events (median); its output is
compared with the dense step's (relative error, bf16). The main job is read from the sidecar(s) of
``dit-accel generate`` (``--sidecar``, as docs/scripts/gpu_offline_run.sh writes them): its transformer time
against the dense run beside it.

    python docs/scripts/wan_step_gpu.py --out wan_step.json [--sidecar gen_fp32.json ...]
    python docs/scripts/wan_step_gpu.py --tiny --device cpu --out /tmp/wan_step.json     # the dry run on a CPU

``--tiny``: 2 blocks, 2 heads x 32 and a (3, 8, 8) grid, on the CPU in fp32 (what the dry run checks: the script
runs end to end and writes its JSON; its times are not the figure). Prints one line per setting and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

WAN_1P3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LATENT_480P = (21, 60, 104)  # 81 frames of 832x480 through Wan's VAE (4x time, 8x space)
TINY = dict(WAN_1P3B, num_attention_heads=2, attention_head_dim=32, text_dim=64, ffn_dim=128, num_layers=2)
LATENT_TINY = (3, 16, 16)


def _model(config: dict, device, dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    model = model.to(dtype).eval()
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, param in model.named_parameters():  # as from_pretrained(torch_dtype=bf16) keeps them
        if any(k in name.split(".") for k in keep):
            param.data = param.data.float()
    return model


def _inputs(config: dict, latent, device, dtype, text_tokens: int):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, config["in_channels"], *latent, generator=g).to(device, dtype)
    text = torch.randn(1, text_tokens, config["text_dim"], generator=g).to(device, dtype)
    return dict(hidden_states=x, timestep=torch.tensor([500], device=device), encoder_hidden_states=text,
                return_dict=False)


def _time(model, inputs, steps: int, warmup: int, device, before=lambda: None) -> tuple:
    """``(median seconds per step, output of the last step)``; ``before()`` runs ahead of each call, untimed."""
    with torch.no_grad():
        for _ in range(warmup):
            before()
            out = model(**inputs)[0]
        times = []
        for _ in range(steps):
            before()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = model(**inputs)[0]
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                out = model(**inputs)[0]
                times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _settings(model, tiny: bool, grid):
    """``{label: (method, apply kwargs)}``: the recommended Tile and VSA of the model's preset, then both at the
    issue's 10% density (Tile's window at 10% of the blocks on ``grid``, VSA at sparsity 0.9), every step sparse."""
    import dit_accel

    tile, tile_kw = dit_accel.recommended(model, "tile")
    cube = (1, 4, 4) if tiny else (4, 4, 4)
    vsa = dit_accel.VSA(sparsity=0.5 if tiny else 0.875, tile=cube)
    tile10, vsa10 = dit_accel.Tile().at_density(tuple(grid), 0.1), dit_accel.VSA(sparsity=0.9, tile=cube)
    return {f"tile {tile!r}": (tile, tile_kw), f"vsa {vsa!r}": (vsa, {}),
            f"tile at 10% {tile10!r}": (tile10, {}), f"vsa at 10% {vsa10!r}": (vsa10, {})}


def _main_job(sidecars) -> list:
    """The main job's transformer time against the dense run beside it, per ``dit-accel generate`` sidecar."""
    out = []
    for path in sidecars:
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            out.append({"sidecar": str(path), "error": f"{type(exc).__name__}: {exc}"})
            continue
        cmp = record.get("compare_dense") or {}
        speedup = cmp.get("transformer_speedup")
        out.append({"sidecar": str(path), "transformer_speedup": speedup, "end_to_end_speedup":
                    cmp.get("end_to_end_speedup"), "psnr_db": cmp.get("psnr_db"),
                    "not_slower_than_dense": None if speedup is None else speedup >= 1.0})
    return out


def run(args) -> dict:
    import dit_accel

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config, latent = (TINY, LATENT_TINY) if args.tiny else (WAN_1P3B, LATENT_480P)
    model = _model(config, device, dtype)
    inputs = _inputs(config, latent, device, dtype, 16 if args.tiny else 512)
    grid = (latent[0], latent[1] // 2, latent[2] // 2)
    report = {"model": "Wan 2.1 T2V 1.3B config, random weights" + (" (tiny dry run)" if args.tiny else ""),
              "dtype": str(dtype), "latent": list(latent), "grid": list(grid), "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "steps": args.steps,
              "rows": []}
    dense_s, dense_out = _time(model, inputs, args.steps, args.warmup, device)
    report["rows"].append({"setting": "dense", "step_s": dense_s, "speedup": 1.0})
    print(f"dense: {dense_s * 1e3:.1f} ms per step", flush=True)
    for label, (method, kwargs) in _settings(model, args.tiny, grid).items():
        row = {"setting": label}
        try:
            handle = dit_accel.apply(model, method, **kwargs)
            # A sparse step of a 50-step run (a setting's first dense steps would time dense attention).
            step = int(kwargs.get("dense_steps", 0) or 0)
            row["step"] = f"{step} of 50"
            try:
                step_s, out = _time(model, inputs, args.steps, args.warmup, device,
                                    before=lambda: handle.set_step(step, 50))
                summary = handle.summary() if hasattr(handle, "summary") else None
            finally:
                handle.remove()
            err = float((out.float() - dense_out.float()).norm() / dense_out.float().norm())
            row.update(step_s=step_s, speedup=dense_s / step_s, rel_error_vs_dense=err,
                       summary=str(summary)[:2000] if summary is not None else None)
            print(f"{label}: {step_s * 1e3:.1f} ms per step, {dense_s / step_s:.2f}x dense, "
                  f"relative difference to dense {err:.3f}", flush=True)
        except Exception as exc:  # one setting's failure is its row, the others still run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
            print(f"{label}: FAILED {row['error']}", flush=True)
        report["rows"].append(row)
    report["main_job"] = _main_job(args.sidecar or [])
    for job in report["main_job"]:
        print(f"main job ({job['sidecar']}): transformer {job.get('transformer_speedup')}x dense, not slower: "
              f"{job.get('not_slower_than_dense')}", flush=True)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON report path")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the CPU dry run: a 2-block model at a (3, 8, 8) grid")
    p.add_argument("--steps", type=int, default=5, help="timed transformer calls per setting (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compiles, autotuning, self-checks)")
    p.add_argument("--sidecar", action="append", help="a dit-accel generate sidecar (JSON) of the main job")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("wan_step_gpu: --device cuda but no CUDA device here; the dry run is --tiny --device cpu",
              file=sys.stderr)
        return 2
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
