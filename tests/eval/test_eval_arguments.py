"""The developer commands under ``python -m dit_accel.eval.*`` refuse bad counts and sizes with a usage error that
names the argument (exit status 2), before any work, as ``dit-accel`` itself does."""

import importlib

import pytest


@pytest.mark.parametrize("module,argv,says", [
    ("host_path", ["--calls", "0"], "argument --calls: 0 must be >= 1"),
    ("host_path", ["--repeats", "-1"], "argument --repeats: -1 must be >= 1"),
    ("host_path", ["--tokens", "100"], "--tokens 100: use a multiple of 256"),
    ("bench_cpu", ["--n", "0"], "argument --n: 0 must be >= 1"),
    ("bench_cpu", ["--heads", "two"], "argument --heads: 'two' is not an integer"),
    ("bench_layouts", ["0", "4", "4"], "argument grid: 0 must be >= 1"),
    ("bench_overhead", ["--rounds", "0"], "argument --rounds: 0 must be >= 1"),
    ("traffic", ["--head-dim", "0"], "argument --head-dim: 0 must be >= 1"),
])
def test_a_bad_count_or_size_is_a_usage_error(module, argv, says, capsys):
    main = importlib.import_module(f"dit_accel.eval.{module}").main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_env_set_restores_the_variable_as_it_was(monkeypatch):
    """The eval commands' and the compile workers' temporary switches (``_util.env_set``): set while inside, back
    to the old value or unset afterwards, also when the body raises; ``value=None`` only restores."""
    import os

    from dit_accel._util import env_set

    monkeypatch.delenv("DIT_ACCEL_T", raising=False)
    with env_set("DIT_ACCEL_T", "1"):
        assert os.environ["DIT_ACCEL_T"] == "1"
    assert "DIT_ACCEL_T" not in os.environ
    monkeypatch.setenv("DIT_ACCEL_T", "old")
    with pytest.raises(RuntimeError), env_set("DIT_ACCEL_T", "new"):
        assert os.environ["DIT_ACCEL_T"] == "new"
        raise RuntimeError
    assert os.environ["DIT_ACCEL_T"] == "old"
    with env_set("DIT_ACCEL_T"):
        assert os.environ["DIT_ACCEL_T"] == "old"
        os.environ["DIT_ACCEL_T"] = "set inside"
    assert os.environ["DIT_ACCEL_T"] == "old"
