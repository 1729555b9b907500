"""Threads for the reliability suite: run callables in threads of their own and collect what they raise."""

import threading
from typing import Callable, List


def run_threads(*targets: Callable[[], object], timeout: float) -> List[BaseException]:
    """Run each target in its own (daemon) thread, wait for all, and return what they raised, in the order they
    raised it; fail the test on a thread still running after ``timeout`` seconds (a deadlock would hang forever)."""
    errors, threads = [], []
    for target in targets:
        def body(target=target):
            try:
                target()
            except BaseException as error:  # returned to the test
                errors.append(error)
        threads.append(threading.Thread(target=body, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish: deadlock"
    return errors
