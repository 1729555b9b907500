"""VSA under context parallelism against one process (torchrun, tests/pipelines/vsa_cp_worker.py): Ulysses (heads
split) and ring attention where every rank's video rows are whole cubes (tiny Wan, grid (4, 8, 8), tile (2, 4, 4):
2 frames per rank), gates and gradients under ring; a ring split that cuts the cubes, and a gate under Ulysses,
are refused clearly."""

import json

from tests.pipelines.test_parallel import _torchrun


def test_vsa_ulysses_and_ring_match_one_process_and_straddling_cubes_are_refused(tmp_path):
    out = tmp_path / "vsa.json"
    _torchrun(2, "vsa_cp_worker.py", out)
    result = json.loads(out.read_text())
    for order in ("apply-first", "parallel-first"):
        for split, tol in (("ulysses", 0.0), ("ring", 2e-6)):
            case = result[f"{split}-{order}"]
            assert case["diff"] <= tol and case["finite"] and case["remove_exact"], (split, order, case)
            assert case["sparse_calls"] > 0 and case["dense_calls"] == 0, (split, order, case)
    gate = result["ring-gate"]
    assert gate["diff"] < 2e-6 and gate["finite"] and gate["gate_effect"] > 1e-2, gate
    grad = result["ring-grad"]
    assert grad["rel"] < 1e-5 and grad["params"] > 0, grad
    refusal = result["ring-straddling"]
    for part in ("ring attention", "tokens 0..127", "(2 frames of grid (4, 8, 8))", "tile=(4, 4, 4)",
                 "multiple of the ring degree x 4", "Ulysses"):
        assert part in refusal, (part, refusal)
    assert "gate covers the tokens of the attention module's input" in result["ulysses-gate"], result["ulysses-gate"]
