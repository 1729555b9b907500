"""SLA on one GPU, the fused kernel's parts: accuracy, forward times with and without a projection,
forward + backward, with ``--configs`` the forward under other launches, with ``--bwd-configs`` forward + backward
under the linear-branch dK/dV kernel's launches, and with ``--profile`` the CUDA kernels of forward and of
forward + backward calls.

Run from the repository root on a CUDA machine (BENCHMARKS.md section 10)::

    PYTHONPATH=. python docs/scripts/sla_gpu_parts.py NAME [--configs] [--bwd-configs] [--profile]
    TRITON_INTERPRET=1 PYTHONPATH=. python docs/scripts/sla_gpu_parts.py NAME --dry-run   # on a CPU: tiny, fp16

NAME labels the output, ``$OUT/sla_NAME.json`` (or ``./sla_NAME.json``). To compare two versions of the
package, run it once per version with that version's directory first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.nn.functional as F

import dit_accel
from dit_accel.eval.bench import time_fn
from dit_accel.kernels import sla_attention
from dit_accel.methods import SLA
from tests.kernels.sla_reference import reference_sla

DEVICE = torch.device("cuda")
HEAD_DIM = 128
#: The token counts (Wan 2.1 1.3B 480p; 720p's 75,600 for the forward; the accuracy problem), heads and dtypes; the
#: dry run's (``--dry-run``: the Triton interpreter on a CPU) are tiny, in fp16 (the interpreter's bf16 dot is wrong).
N_MAIN, N_LONG, N_ACC, HEADS, DTYPES = 32760, 75600, 4096, 12, (torch.bfloat16, torch.float16)


def dry_run() -> None:
    """The script's sizes for a CPU run through the interpreter (a check that every part runs, timing nothing)."""
    from dit_accel.kernels.interpreter import speed_up_interpreter
    from dit_accel.kernels.request import interpreting

    global DEVICE, HEAD_DIM, N_MAIN, N_LONG, N_ACC, HEADS, DTYPES
    DEVICE, HEAD_DIM, N_MAIN, N_LONG, N_ACC, HEADS, DTYPES = torch.device("cpu"), 64, 130, 129, 130, 2, (torch.float16,)
    if interpreting():  # (what the test suite does: the interpreter without the costs that change no result)
        speed_up_interpreter()


def qkv(n: int, heads: int = None, grad: bool = False, seed: int = 0, dtype=None):
    """Random (1, heads, n, HEAD_DIM) q, k, v; the keys share a per-head offset, so blocks rank unevenly."""
    heads, dtype = heads or HEADS, dtype or DTYPES[0]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, HEAD_DIM, device=DEVICE, generator=g) for _ in range(3))
    k = k + 0.5 * torch.randn(1, heads, 1, HEAD_DIM, device=DEVICE, generator=g)
    return [t.to(dtype).requires_grad_(grad) for t in (q, k, v)]


def projection(zero: bool, dtype=None) -> torch.nn.Linear:
    dtype = dtype or DTYPES[0]
    torch.manual_seed(1)
    proj = torch.nn.Linear(HEAD_DIM, HEAD_DIM, device=DEVICE, dtype=dtype)
    if zero:
        torch.nn.init.zeros_(proj.weight)
        torch.nn.init.zeros_(proj.bias)
    return proj


def ms(fn) -> float:
    if DEVICE.type != "cuda":  # (the dry run: runs it, times nothing)
        fn()
        return 0.0
    return round(time_fn(fn, DEVICE, warmup=3, repeats=10) * 1e3, 3)


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((a.float() - ref).abs().max() / ref.abs().max()), 6)


def accuracy() -> dict:
    """Largest error relative to the largest value, output and gradients, against the fp32 dense reference
    (N = 4,096, 2 heads, topk 0.05, a random projection)."""
    out = {}
    for dtype in DTYPES:
        for feature in ("softmax", "elu"):
            q, k, v = qkv(N_ACC, heads=2, grad=True, seed=3, dtype=dtype)
            method = SLA(topk=0.05, feature_map=feature)
            proj = projection(False, dtype)
            o_s, _, o_lp, info = sla_attention(q, k, v, method, proj, backend="triton", return_parts=True)
            o = o_s + o_lp
            grad_out = torch.randn_like(o)
            grads = torch.autograd.grad(o, (q, k, v), grad_out)
            q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
            ref = reference_sla(q32, k32, v32, info["blocks"].classes, method, copy.deepcopy(proj).float())[0]
            ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out.float())
            out[f"{str(dtype)[6:]}/{feature}"] = {
                "o": relative_error(o, ref),
                **{name: relative_error(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)}}
    return out


def forward_times(n: int, topks) -> dict:
    q, k, v = qkv(n)
    rand, zero = projection(False), projection(True)
    out = {}
    with torch.no_grad():
        out["sdpa"] = ms(lambda: F.scaled_dot_product_attention(q, k, v))
        for topk in topks:
            method = SLA(topk=topk)
            for label, proj in (("none", None), ("zero", zero), ("rand", rand)):
                out[f"{topk}/{label}"] = ms(lambda: sla_attention(q, k, v, method, proj, backend="triton"))
    return out


def forward_backward_times() -> dict:
    """Forward + backward at N = 32,760, top-k 0.05, a random projection: the default (the backward's glue kernels
    where their self-check passed), with the glue forced to PyTorch operators and to the kernels, and the largest
    difference of the gradients between the two, relative to their largest value."""
    from dit_accel.kernels.sla import glue

    q, k, v = qkv(N_MAIN, grad=True)
    proj = projection(False)
    grad_out = torch.randn(q.shape, device=DEVICE, dtype=q.dtype)
    method = SLA(topk=0.05)

    def call():
        sla_attention(q, k, v, method, proj, backend="triton").backward(grad_out)

    out = {"sdpa": ms(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad_out)), "0.05/rand": ms(call),
           "glue_runs": glue.glue_runs(q)}
    grads = {}
    for label, on in (("operators", False), ("glue", True)):
        with glue.forced(on):
            try:
                out[f"0.05/rand/{label}"] = ms(call)
                q.grad = k.grad = v.grad = None
                call()
                grads[label] = [t.grad.float() for t in (q, k, v)]
            except Exception as exc:  # a glue that fails its check: reported, not raised
                out[f"0.05/rand/{label}"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if len(grads) == 2:
        out["glue_vs_operators"] = max(relative_error(g, r) for g, r in zip(grads["glue"], grads["operators"]))
    return out


def kernel_profile(backward: bool = False) -> str:
    """The CUDA kernels of five N = 32,760 calls with a random projection: forwards, or forwards + backwards."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = qkv(N_MAIN, grad=backward)
    proj, method = projection(False), SLA(topk=0.05)
    grad_out = torch.randn(q.shape, device=DEVICE, dtype=q.dtype)

    def call():
        out = sla_attention(q, k, v, method, proj, backend="triton")
        if backward:
            out.backward(grad_out)

    with torch.set_grad_enabled(backward):
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)


#: Launches of the d128 forward with the linear branch to time against the shipped one: (warps, stages, chained
#: products, TMA loads). The chained ones spill or serialise wgmma (C7515) when compiled for sm_90 (BENCHMARKS.md
#: section 10); the shipped sm_90 launch (configs.MEASURED_LAUNCH) is one of them, picked by these times. The
#: pointer-load ones are the launcher's fallback for inputs that are not 16-byte aligned.
FORWARD_CANDIDATES = ((8, 3, False, True), (8, 2, False, True), (4, 2, False, True), (8, 3, True, True),
                      (8, 2, True, True), (4, 2, True, True), (8, 3, False, False), (4, 2, True, False))


def forward_configs() -> dict:
    """The SLA forward at N = 32,760, topk 0.05, a random projection, under each of :data:`FORWARD_CANDIDATES`
    (milliseconds, and the largest difference of o and o_l from the shipped launch's, relative to their largest
    value)."""
    import dataclasses

    from dit_accel.kernels.sla import triton as st

    q, k, v = qkv(N_MAIN)
    proj, method = projection(False), SLA(topk=0.05)
    shipped = st.select_sla_config

    def parts():
        return sla_attention(q, k, v, method, proj, backend="triton", return_parts=True)

    out = {}
    with torch.no_grad():
        ref = parts()
        for warps, stages, chain, tma in FORWARD_CANDIDATES:
            def chosen(kernel, *args, w=warps, s=stages, c=chain, t=tma):
                cfg = shipped(kernel, *args)
                if kernel != "fwd" or not cfg.has_lin:
                    return cfg
                return dataclasses.replace(cfg, num_warps=w, num_stages=s, lin_chain=c, tma=t)

            st.select_sla_config = chosen
            st._FWD_LAUNCHES.clear()
            name = f"w{warps}s{stages}{'-chain' if chain else '-split'}{'' if tma else '-pointers'}"
            try:
                got = parts()
                diff = max(relative_error(got[i], ref[i].float()) for i in (0, 2))
                out[name] = {"ms": ms(lambda: sla_attention(q, k, v, method, proj, backend="triton")), "diff": diff}
            except Exception as exc:  # a launch that does not fit or compile: reported, not raised
                out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            finally:
                st.select_sla_config = shipped
                st._FWD_LAUNCHES.clear()
    return out


def backward_configs() -> dict:
    """Forward + backward at N = 32,760, topk 0.05, a random projection, with the linear-branch dK/dV kernel
    under each candidate launch (``configs.candidates``; milliseconds, and the largest difference of dK and dV
    from the shipped launch's, relative to their largest value)."""
    import dataclasses

    from dit_accel.kernels.sla import backward as sb
    from dit_accel.kernels.sla import configs as sc

    q, k, v = qkv(N_MAIN, grad=True)
    proj, method = projection(False), SLA(topk=0.05)
    grad_out = torch.randn(q.shape, device=DEVICE, dtype=q.dtype)
    shipped = sb.select_sla_config  # (the backward's launcher: sla/backward.py)

    def grads():
        q.grad = k.grad = v.grad = None
        sla_attention(q, k, v, method, proj, backend="triton").backward(grad_out)
        return k.grad.float(), v.grad.float()

    ref = grads()
    out = {}
    for cand in sc.candidates("bwd_dkdv_lin", q.dtype, HEAD_DIM, True, 90):
        def chosen(kernel, *args, c=cand):
            cfg = shipped(kernel, *args)
            return dataclasses.replace(cfg, num_warps=c.num_warps, num_stages=c.num_stages) \
                if kernel == "bwd_dkdv_lin" else cfg

        sb.select_sla_config = chosen
        name = f"w{cand.num_warps}s{cand.num_stages}"
        try:
            got = grads()
            diff = max(relative_error(g, r) for g, r in zip(got, ref))
            out[name] = {"ms": ms(lambda: sla_attention(q, k, v, method, proj, backend="triton").backward(grad_out)),
                         "diff": diff}
        except Exception as exc:  # a launch that does not fit or compile: reported, not raised
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            sb.select_sla_config = shipped
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--configs", action="store_true", help="time the d128 linear-branch forward's launches")
    parser.add_argument("--bwd-configs", action="store_true",
                        help="time forward + backward under the linear-branch dK/dV kernel's launches")
    parser.add_argument("--dry-run", action="store_true", help="run every part tiny on the CPU (TRITON_INTERPRET=1), "
                        "timing nothing")
    args = parser.parse_args()
    if args.dry_run:
        dry_run()
    res = {"name": args.name, "package": dit_accel.__file__, "accuracy_rel_maxerr": accuracy()}
    print(args.name, "accuracy", res["accuracy_rel_maxerr"], flush=True)
    for n, topks in ((N_MAIN, (0.05, 0.2)), (N_LONG, (0.05,))):
        res[f"fwd_{n}"] = forward_times(n, topks)
        print(args.name, n, res[f"fwd_{n}"], flush=True)
    res[f"fwdbwd_{N_MAIN}"] = forward_backward_times()
    print(args.name, "forward + backward", res[f"fwdbwd_{N_MAIN}"], flush=True)
    if args.configs:
        res["forward_configs"] = forward_configs()
        print(args.name, "forward launches", res["forward_configs"], flush=True)
    if args.bwd_configs:
        res["backward_configs"] = backward_configs()
        print(args.name, "backward launches", res["backward_configs"], flush=True)
    if args.profile and DEVICE.type == "cuda":  # (CUDA kernels: nothing to profile in a dry run)
        res["profile"] = kernel_profile()
        res["profile_backward"] = kernel_profile(backward=True)
        print(res["profile"], res["profile_backward"], sep="\n")
    with open(os.path.join(os.environ.get("OUT", "."), f"sla_{args.name}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
