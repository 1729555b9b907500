"""Worker for tests/pipelines/test_minimax_h3.py: MiniMax-H3 under Ulysses, run with ``torchrun --nproc_per_node 2``.

``python -m torch.distributed.run --nproc_per_node 2 tests/pipelines/minimax_h3_cp_worker.py OUT.json TMPDIR``

Every rank builds the same 4-head tiny MiniMax-H3 inside Diffusers' modular pipeline, loads one Diffusers-format
LoRA with ``pipe.load_lora_weights``, computes the single-process dit_accel output itself, then the Ulysses output
(``enable_parallelism``), and rank 0 writes the largest differences to OUT.json. The harness patch of
``torch.accelerator.device_count`` comes with cp_worker (see its docstring).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.pipelines import cp_worker as W  # noqa: E402  (patches torch.accelerator.device_count in this process)
from tests.pipelines.test_minimax_h3 import GRID, inputs, sta_mask  # noqa: E402,F401

import dit_accel  # noqa: E402

METHODS = {"tile": dit_accel.Tile(tile=(1, 8, 8), window=(3, 3, 3)), "sla": dit_accel.SLA(topk=0.5)}


def lora_folder(root: Path) -> Path:
    from diffusers.modular_pipelines import MiniMaxH3ModularPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = W.build("minimax_h3")
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                        target_modules=r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        donor.add_adapter(config)
    out = root / f"lora-rank{dist.get_rank()}"
    MiniMaxH3ModularPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(donor),
                                               transformer_lora_adapter_metadata=config.to_dict())
    return out


def pipeline(lora: Path):
    from diffusers.modular_pipelines.minimax_h3.modular_blocks_minimax_h3 import MiniMaxH3Blocks

    pipe = MiniMaxH3Blocks().init_pipeline()
    pipe.update_components(transformer=W.build("minimax_h3"))
    pipe.load_lora_weights(str(lora))
    return pipe


def compare(method, form: str, lora: Path) -> dict:
    single = pipeline(lora)
    kwargs = inputs(single.transformer, form, batch=1, text=8)  # Ulysses splits the packed sequence in halves
    with dit_accel.apply(single, method, backend="torch"), torch.no_grad():
        want = single.transformer(**kwargs)[0]
    pipe = pipeline(lora)
    handle = dit_accel.apply(pipe, method, backend="torch")
    pipe.transformer.enable_parallelism(config=W.cp_config(2, 1))
    with torch.no_grad():
        got = pipe.transformer(**kwargs)[0]
    stats = handle.summary()
    handle.remove()
    return {"diff": float((got - want).abs().max()), "finite": bool(torch.isfinite(got).all()),
            "sparse_calls": stats["sparse_calls"], "lora": list(pipe.transformer.peft_config) == ["default_0"]}


def main() -> int:
    path, tmp = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    lora = lora_folder(tmp)
    result = {f"{label}/{form}": compare(method, form, lora)
              for label, method in METHODS.items() for form in ("i2va", "ref2va")}
    if dist.get_rank() == 0:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
