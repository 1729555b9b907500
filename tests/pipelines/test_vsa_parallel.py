"""VSA under context parallelism: Ulysses (heads split) equals one process; ring attention is refused clearly."""

import json

from tests.pipelines.test_parallel import _torchrun


def test_vsa_ulysses_matches_one_process_and_ring_is_refused(tmp_path):
    out = tmp_path / "vsa.json"
    _torchrun(2, "vsa_cp_worker.py", out)
    result = json.loads(out.read_text())
    for order in ("apply-first", "parallel-first"):
        case = result[f"ulysses-{order}"]
        assert case["diff"] == 0.0 and case["finite"] and case["remove_exact"], (order, case)
        assert case["sparse_calls"] > 0 and case["dense_calls"] == 0, (order, case)
    assert "ring attention" in result["ring"] and "Ulysses" in result["ring"]
