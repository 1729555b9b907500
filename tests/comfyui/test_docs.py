"""docs/comfyui.md's workflow: its dit_accel node's inputs run on a tiny Wan model of ComfyUI's own class."""

import json
import re
from pathlib import Path

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS
from tests.comfyui.models import CASES, build, sample

DOC = Path(__file__).resolve().parents[2] / "docs" / "comfyui.md"


def test_the_documented_workflows_node_runs(comfy):
    workflow = json.loads(re.search(r"```json\n(.*?)```", DOC.read_text(), re.S).group(1))
    ours = {k: n for k, n in workflow.items() if n["class_type"] in NODE_CLASS_MAPPINGS}
    assert len(ours) == 1
    (node,) = ours.values()
    source = workflow[node["inputs"]["model"][0]]
    assert source["class_type"] == "UNETLoader"  # between the loader ...
    assert any(n["class_type"] == "KSampler" and n["inputs"]["model"][0] in ours for n in workflow.values())  # ... and the sampler
    cls = NODE_CLASS_MAPPINGS[node["class_type"]]
    inputs = {k: v for k, v in node["inputs"].items() if k != "model"}
    assert set(inputs) == set(cls.INPUT_TYPES()["required"]) - {"model"}  # every widget, none unknown
    model = build(comfy, CASES["wan21-t2v"])
    (patched,) = getattr(cls(), cls.FUNCTION)(model, **inputs)
    patch = patched.model_options["transformer_options"]["optimized_attention_override"].patch
    assert patch.schedule.method == dit_accel.Tile(tile=(3, 6, 4), window=(3, 3, 3))
    assert patch.schedule.dense_steps == 6
    sample(comfy, patched, CASES["wan21-t2v"], steps=2)
