"""Worker for tests/pipelines/test_parallel.py: run under ``torchrun --nproc_per_node N``.

``python -m torch.distributed.run --nproc_per_node N tests/pipelines/cp_worker.py SCENARIO OUT.json``

Every rank builds the same tiny transformers (fixed seeds), computes the single-process
dit_accel result itself (no parallelism), then the context-parallel result through
Diffusers' ``enable_parallelism`` in both call orders, and rank 0 writes the largest
differences (and the errors of the cases that must be refused) to OUT.json.

Test harness only: on CPU Diffusers computes ``rank % torch.accelerator.device_count()``,
which is a modulo by zero, so ``device_count`` is patched to 1 in this process.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.accelerator.device_count = lambda: 1  # the harness workaround (see module docstring)

import dit_accel  # noqa: E402
from diffusers import ContextParallelConfig  # noqa: E402
from dit_accel.models import tiny as T  # noqa: E402

WAN_GRID, FLUX_GRID = (4, 8, 8), (8, 16)
METHODS = {
    "wan": {"dense": dit_accel.Dense(), "tile": dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)),
            "gna": dit_accel.GNA(kernel_size=(2, 5, 5)), "radial": dit_accel.Radial(block_size=64, decay=1.0),
            "sla": dit_accel.SLA(topk=0.5),
            # causal in time: under ring, the first rank's queries see no key of the second rank's shard
            "gna-causal": dit_accel.GNA(kernel_size=(2, 5, 5), is_causal=(True, False, False))},
    "flux": {"dense": dit_accel.Dense(), "tile": dit_accel.Tile(tile=(4, 16), window=(1, 1)),
             "gna": dit_accel.GNA(kernel_size=(3, 5)), "sla": dit_accel.SLA(topk=0.5)},
}


def build(name: str):
    """A tiny transformer with 4 heads (Ulysses over 4 ranks needs H % 4 == 0), same weights on every rank."""
    cls_name, config = T.TRANSFORMERS[name].class_name, T.TRANSFORMERS[name].config
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        heads = {"num_attention_heads": 4}
        if config.get("added_kv_proj_dim"):  # Wan-lineage image projections are as wide as the heads
            heads["added_kv_proj_dim"] = 4 * config["attention_head_dim"]
        if name in VIDEO_C_CP:  # Diffusers' Helios _cp_plan names blocks 0..39: the real model's 40 layers
            heads["num_layers"] = 40
        if name == "ltx2":  # LTX-2: the text projection's width is the video attention's inner width
            heads["cross_attention_dim"] = 4 * config["attention_head_dim"]
        model = getattr(diffusers, cls_name)(**{**config, **heads})
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.data.normal_(0, 0.05)
    return model.eval()


def inputs(name, model):
    grid = FLUX_GRID if name == "flux" else WAN_GRID  # the Wan lineage shares the Wan grid
    kwargs = T.tiny_transformer_inputs(name, model, grid=grid, batch=1, text=8)  # 8 text tokens: 2 or 4 equal shares
    if name in VIDEO_C_CP:  # Helios: the first chunk's call, without a packed history
        kwargs = {k: v for k, v in kwargs.items() if "history" not in k}
    if name == "ltx2":  # Diffusers 0.42.1's LTX-2 _cp_plan fails on its own for a text mask (viewed with all heads,
        # which Ulysses splits) and for audio<->video attention (its rotary table is not split): neither here
        kwargs.update(encoder_attention_mask=None, audio_encoder_attention_mask=None, isolate_modalities=True)
    return kwargs


def run(model, kwargs, grad=False):
    with torch.set_grad_enabled(grad):
        return model(**kwargs)[0]


def cp_config(ulysses: int, ring: int):
    return ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring)


def compare(name, method, ulysses, ring, order):
    """Max |single-process - context-parallel| of one (model, method, call order)."""
    single_model = build(name)
    kwargs = inputs(name, single_model)
    with dit_accel.apply(single_model, method, backend="torch"):
        want = run(single_model, kwargs)
    model = build(name)
    if order == "apply-first":
        handle = dit_accel.apply(model, method, backend="torch")
        model.enable_parallelism(config=cp_config(ulysses, ring))
    else:
        model.enable_parallelism(config=cp_config(ulysses, ring))
        handle = dit_accel.apply(model, method, backend="torch")
    got = run(model, kwargs)
    stats = handle.summary()
    handle.remove()
    plain_model = build(name)
    plain_model.enable_parallelism(config=cp_config(ulysses, ring))
    # After remove() the model is a plain context-parallel model again: the same result, or (Diffusers' ring on
    # the native backend) the same error.
    after_remove, plain_cp = outcome(model, kwargs), outcome(plain_model, kwargs)
    same = after_remove == plain_cp if isinstance(plain_cp, str) else (
        not isinstance(after_remove, str) and torch.equal(after_remove, plain_cp))
    return {"diff": float((got - want).abs().max()), "finite": bool(torch.isfinite(got).all()),
            "sparse_calls": stats["sparse_calls"], "dense_calls": stats["dense_calls"], "remove_exact": same}


def outcome(model, kwargs):
    """The output, or the error message of a model that cannot run."""
    try:
        return run(model, kwargs)
    except ValueError as exc:
        return str(exc)


def gradients(name, method, ulysses, ring):
    """Max relative difference of LoRA and SLA-projection gradients, context-parallel (summed over ranks) vs one
    process."""
    from peft import LoraConfig

    def grads(parallel: bool):
        model = build(name)
        kwargs = inputs(name, model)
        handle = dit_accel.apply(model, method, backend="torch")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v"]))
        if parallel:
            model.enable_parallelism(config=cp_config(ulysses, ring))
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        for i, (proj_name, proj) in enumerate(handle.sla_projections().items()):
            with torch.no_grad():  # non-zero projections, the same in both runs
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
            params.update({f"{proj_name}.{n}": p for n, p in proj.named_parameters()})
        for p in params.values():
            p.requires_grad_(True)
        out = run(model, kwargs, grad=True)
        (out.float() ** 2).mean().backward()
        out_grads = {n: p.grad.detach().clone() for n, p in params.items()}
        if parallel:  # each rank holds the gradient through its own tokens: the total is the sum
            for g in out_grads.values():
                dist.all_reduce(g)
        handle.remove()
        return out_grads

    want, got = grads(False), grads(True)
    assert want.keys() == got.keys() and want
    return {"rel": max(float((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)) for n in want),
            "params": len(want), "sla_params": sum("lora_" not in n for n in want)}


def capture(ulysses, ring) -> float:
    """Captured q/k/v under context parallelism (one file per head group) == the single-process capture."""
    import shutil
    import tempfile

    folder = os.path.join(tempfile.gettempdir(),  # one per launch and scenario (a launch runs several)
                          f"dit_accel_cp_capture_{os.environ['TORCHELASTIC_RUN_ID']}_u{ulysses}r{ring}")
    single = build("wan")
    # one folder per rank: every rank runs the single-process model, and a capture folder holds one run
    one = f"{folder}/one{dist.get_rank()}"
    with dit_accel.apply(single, dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), capture=one,
                         capture_layers=[0]):
        run(single, inputs("wan", single))
    model = build("wan")
    model.enable_parallelism(config=cp_config(ulysses, ring))
    with dit_accel.apply(model, dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), capture=folder + "/cp",
                         capture_layers=[0]):
        run(model, inputs("wan", model))
    dist.barrier()
    want = torch.load(f"{one}/layer000_step000.pt")
    parts = sorted(os.listdir(folder + "/cp"))
    got = [torch.load(f"{folder}/cp/{p}") for p in parts]
    heads = sorted(tuple(g["heads"]) for g in got)
    q = torch.cat([g["q"] for g in sorted(got, key=lambda g: g["heads"])], dim=1)
    assert heads == [(i * 4 // ulysses, (i + 1) * 4 // ulysses) for i in range(ulysses)], heads
    dist.barrier()  # every rank has read the folder
    if dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
    return float((q - want["q"]).abs().max())


def refused(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return str(exc)
    return ""


# Wan-lineage classes with a Diffusers _cp_plan (Ulysses over 2 ranks; scenario "lineage")
LINEAGE_CP = ("chronoedit",)


# models-video-c: Helios (its _cp_plan splits blocks.*.attn1); its packed history is refused under CP
VIDEO_C_CP = ("helios",)


def _video_c(model_name: str) -> dict:
    out = {f"{model_name}/{label}/apply-first": compare(model_name, METHODS["wan"][label], 2, 1, "apply-first")
           for label in ("dense", "gna", "sla")}

    def with_history():
        model = build(model_name)
        dit_accel.apply(model, METHODS["wan"]["gna"], backend="torch")
        model.enable_parallelism(config=cp_config(2, 1))
        run(model, T.tiny_transformer_inputs(model_name, model, grid=WAN_GRID, batch=1, text=8))

    out[f"{model_name}/history"] = refused(with_history)
    return out


# models-video-d (issue 28): audio-video classes with a Diffusers _cp_plan (Ulysses over 2 ranks; scenario "av").
AV_CP = ("ltx2", "minimax_h3")


def av_scenario() -> dict:
    """LTX-2 (video self-attention sparse; audio and cross-modal attention Diffusers' own) and MiniMax-H3 (its
    packed [text | keyframe | audio | video] sequence split contiguously: Preset.split_whole) under Ulysses."""
    out = {f"{model_name}/{label}/{order}": compare(model_name, method, 2, 1, order)
           for model_name in AV_CP for label, method in METHODS["wan"].items()
           if label in ("dense", "gna", "sla") for order in ("apply-first", "parallel-first")}
    out["ltx2-appended/gna/apply-first"] = ltx2_appended(METHODS["wan"]["gna"])
    return out


def ltx2_appended(method) -> dict:
    """LTX2ConditionPipeline's call (one keyframe of tokens appended after the grid, dense, text_position "last")
    under Ulysses: its _cp_plan splits [video | keyframe] contiguously."""
    def call(model):
        kwargs = inputs("ltx2", model)
        hw = WAN_GRID[1] * WAN_GRID[2]
        extra = torch.randn(1, hw, kwargs["hidden_states"].shape[2], generator=torch.Generator().manual_seed(3))
        coords = kwargs["video_coords"]
        kwargs.update(hidden_states=torch.cat([kwargs["hidden_states"], extra], 1),
                      video_coords=torch.cat([coords, coords[:, :, :hw]], 2))
        return kwargs

    single = build("ltx2")
    with dit_accel.apply(single, method, backend="torch"):
        want = run(single, call(single))
    model = build("ltx2")
    handle = dit_accel.apply(model, method, backend="torch")
    model.enable_parallelism(config=cp_config(2, 1))
    got = run(model, call(model))
    stats = handle.summary()
    handle.remove()
    plain = build("ltx2")
    plain.enable_parallelism(config=cp_config(2, 1))
    return {"diff": float((got - want).abs().max()), "finite": bool(torch.isfinite(got).all()),
            "sparse_calls": stats["sparse_calls"], "dense_calls": stats["dense_calls"],
            "remove_exact": torch.equal(run(model, call(model)), run(plain, call(plain)))}


# LTX-Video (test_parallel_ltx.py): Ring fails in Diffusers' own cross-attention on the native backend (refused up
# front); Ulysses works for calls without a text mask (Diffusers 0.42.1 fails on its own with one, e.g. LTXPipeline's)
def ltx_scenario() -> dict:
    def build_ltx():
        entry = T.TRANSFORMERS["ltx"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return getattr(__import__("diffusers"), entry.class_name)(**entry.config).eval()

    def call(model):
        kwargs = T.tiny_transformer_inputs("ltx", model, grid=WAN_GRID, batch=1, text=8)
        return run(model, {**kwargs, "encoder_attention_mask": None})

    tile = METHODS["wan"]["tile"]

    models = {}

    def ring(order):
        model = models[order] = build_ltx()
        if order == "parallel-first":
            model.enable_parallelism(config=cp_config(1, 2))
        dit_accel.apply(model, tile, backend="torch")
        if order == "apply-first":
            model.enable_parallelism(config=cp_config(1, 2))
        call(model)

    out = {f"ring/{order}": refused(lambda: ring(order)) for order in ("apply-first", "parallel-first")}
    plain = build_ltx()
    plain.enable_parallelism(config=cp_config(1, 2))
    out["ring/plain"] = refused(lambda: call(plain))  # Diffusers alone: the reason the refusal gives
    single = build_ltx()
    with dit_accel.apply(single, tile, backend="torch"):
        want = call(single)
    model = build_ltx()
    handle = dit_accel.apply(model, tile, backend="torch")
    model.enable_parallelism(config=cp_config(2, 1))
    got = call(model)
    out["ulysses/tile"] = {"diff": float((got - want).abs().max()), "sparse_calls": handle.summary()["sparse_calls"]}
    # the model whose Ring enable_parallelism was refused is as it was: Ulysses on it works
    retry = models["apply-first"]
    out["ring-refused/parallel_config"] = repr(retry._parallel_config)
    try:
        retry.enable_parallelism(config=cp_config(2, 1))
        out["ring-refused/then-ulysses"] = ""
    except (RuntimeError, ValueError) as exc:  # ("Parallelism is already applied" before)
        out["ring-refused/then-ulysses"] = str(exc)
    if not out["ring-refused/then-ulysses"]:
        out["ring-refused/then-ulysses/diff"] = float((call(retry) - want).abs().max())
    return out


def scenario(name: str) -> dict:
    if name == "ltx":
        return ltx_scenario()
    if name == "video_c":
        return {k: v for model_name in VIDEO_C_CP for k, v in _video_c(model_name).items()}
    if name == "av":
        return av_scenario()
    if name == "lineage":
        return {f"{model_name}/{label}/{order}": compare(model_name, method, 2, 1, order)
                for model_name in LINEAGE_CP for label, method in METHODS["wan"].items()
                if label in ("dense", "tile", "gna", "sla") for order in ("apply-first", "parallel-first")}
    if name == "four":  # Ulysses over 4 ranks and Ulysses x Ring (2 x 2), Wan, one call order (4 CPU processes)
        return {f"{split}/{label}": compare("wan", method, *degrees, "apply-first")
                for split, degrees in (("ulysses4", (4, 1)), ("unified", (2, 2)))
                for label, method in METHODS["wan"].items() if label != "gna-causal"}
    ulysses, ring = {"ulysses2": (2, 1), "ring2": (1, 2)}[name]
    out = {f"{model_name}/{label}/{order}": compare(model_name, method, ulysses, ring, order)
           for model_name in ("wan", "flux") for label, method in METHODS[model_name].items()
           for order in ("apply-first", "parallel-first")}
    # training: gradients through the sparse op
    out["grad/wan/sla"] = gradients("wan", dit_accel.SLA(topk=0.5), ulysses, ring)
    out["grad/wan/tile"] = gradients("wan", dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), ulysses, ring)

    def uneven():
        model = build("wan")
        dit_accel.apply(model, dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), backend="torch")
        model.enable_parallelism(config=cp_config(ulysses, ring))
        run(model, T.tiny_transformer_inputs("wan", model, grid=(3, 5, 5)))

    out["uneven"] = refused(uneven)
    out["capture"] = capture(ulysses, ring)
    if name == "ring2":
        def straddling():
            model = build("wan")
            dit_accel.apply(model, dit_accel.Radial(block_size=64), backend="torch")
            model.enable_parallelism(config=cp_config(ulysses, ring))
            run(model, T.tiny_transformer_inputs("wan", model, grid=(5, 8, 8)))  # 160 tokens per rank

        out["straddling"] = refused(straddling)
    return out


def main() -> int:
    """``cp_worker.py NAME PATH [NAME PATH ...]``: each scenario in turn in one launch (one start-up for all)."""
    pairs = list(zip(sys.argv[1::2], sys.argv[2::2]))
    dist.init_process_group("gloo")
    for name, path in pairs:
        torch.manual_seed(0)
        result = scenario(name)
        if dist.get_rank() == 0:
            with open(path, "w") as fh:
                json.dump(result, fh, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
