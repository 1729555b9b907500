"""One applied transformer called from two threads at two resolutions: every call equals the same call made
alone (the call context and each layer's plan are per thread), and every call is counted."""

import threading

import torch

import dit_accel
from dit_accel.models.tiny import build_tiny_transformer, tiny_transformer_inputs

GRIDS = [(4, 8, 8), (2, 8, 12)]
CALLS_PER_THREAD = 6


def test_two_threads_two_resolutions_match_sequential_calls():
    model = build_tiny_transformer("wan")
    handle = dit_accel.apply(model, dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)), backend="torch")
    inputs = [tiny_transformer_inputs("wan", model, grid=grid) for grid in GRIDS]
    with torch.no_grad():
        alone = [model(**kwargs)[0] for kwargs in inputs]
    results = {i: [] for i in range(len(GRIDS))}
    errors = []
    start = threading.Barrier(len(GRIDS))

    def worker(i):
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(CALLS_PER_THREAD):
                    results[i].append(model(**inputs[i])[0])
        except Exception as error:  # surfaced below with the thread's index
            errors.append((i, error))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(GRIDS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, outs in results.items():
        assert len(outs) == CALLS_PER_THREAD
        for out in outs:
            torch.testing.assert_close(out, alone[i], atol=0, rtol=0)
    summary = handle.summary()
    calls = (1 + CALLS_PER_THREAD) * len(GRIDS) * summary["layers"]
    assert summary["sparse_calls"] == calls and summary["dense_calls"] == 0
    handle.remove()
