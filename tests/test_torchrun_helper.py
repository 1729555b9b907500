"""The CPU-process test launcher's reading of torchrun's failure report (tests/torchrun.py)."""
from tests.torchrun import crashed_rank_output, killed_by_signal

REPORT = """[default0]:step 1
[default1]:step 1
[default1]:Fatal Python error: Aborted
[default1]:Current thread 0x1 (most recent call first):
[default0]:RuntimeError: Connection closed by peer
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 11)
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 12)
"""


def test_a_signal_death_of_the_root_cause_rank_is_told_from_a_python_error():
    assert killed_by_signal(REPORT.format(code=-6)) and not killed_by_signal(REPORT.format(code=1))
    assert not killed_by_signal("no report at all")


def test_the_crashed_rank_output_is_its_own_lines():
    out = crashed_rank_output(REPORT.format(code=-6)).splitlines()
    assert out == ["[default1]:step 1", "[default1]:Fatal Python error: Aborted",
                   "[default1]:Current thread 0x1 (most recent call first):"]
    assert crashed_rank_output("nothing") == "(no root-cause rank in the log)"
