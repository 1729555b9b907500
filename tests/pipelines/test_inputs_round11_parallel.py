"""Context parallelism beside what users do (round 11): a Ulysses degree that does not divide the heads, and
``--cp`` strings with a typo. Tiny models on the CPU (one torchrun launch); each test names what was wrong before
its fix."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dit_accel.models import tiny as T

REPO = Path(__file__).resolve().parents[2]


def _wan(heads: int = 2):
    import diffusers

    entry = T.TRANSFORMERS["wan"]
    return getattr(diffusers, entry.class_name)(**{**entry.config, "num_attention_heads": heads})


class _Pipe:
    def __init__(self, transformer, transformer_2=None):
        self.transformer, self.transformer_2 = transformer, transformer_2


@pytest.mark.parametrize("degree", [3, 4])
def test_a_ulysses_degree_that_does_not_divide_the_heads_is_refused_before_the_model_changes(degree):
    """Before: the degree was found out only at the first attention call (after the model loaded and the prompt
    was encoded); here, without process group, enable() failed on torch.distributed's own error instead. Now
    one line naming the head count and the degrees that divide it, and the model is left without a config."""
    from diffusers import ContextParallelConfig

    from dit_accel.cli.parallel import enable

    model = _wan(2)
    with pytest.raises(ValueError, match=rf"--cp ulysses={degree}\) splits the attention heads into {degree} equal "
                                         r"groups, but WanTransformer3DModel has num_attention_heads=2: use a Ulysses "
                                         r"degree that divides it \(2\), or ring"):
        enable(_Pipe(model), ContextParallelConfig(ulysses_degree=degree))
    assert getattr(model, "_parallel_config", None) is None


def test_the_second_transformer_is_checked_before_the_first_is_changed():
    """Wan 2.2's two transformers: before, the first was put under context parallelism before the second was
    checked (here torch.distributed's error came first). Now both are checked first, the second named."""
    from diffusers import ContextParallelConfig

    from dit_accel.cli.parallel import enable

    first, second = _wan(4), _wan(6)
    with pytest.raises(ValueError, match="num_attention_heads=6: use a Ulysses degree that divides it "
                                         r"\(2, 3, 6\)"):
        enable(_Pipe(first, second), ContextParallelConfig(ulysses_degree=4))
    assert getattr(first, "_parallel_config", None) is None and getattr(second, "_parallel_config", None) is None


@pytest.mark.parametrize("cp, said", [
    ("ulyses=2", "--cp 'ulyses=2': expected ulysses=N and/or ring=M with N, M >= 1, e.g. ulysses=2 or "
                 "ulysses=2,ring=2 ('ulyses' is not a key)"),
    ("ulysses = 2", "(no spaces around '=')"),
    ("ring=0", "('ring=0' is not a whole number >= 1)"),
    ("ulysses=2,ring=two", "('ring=two' is not a whole number >= 1)"),
])
def test_a_cp_typo_is_named_in_its_one_line_error(cp, said, capsys, tmp_path):
    """Before: every one of these said only "expected ulysses=N and/or ring=M", not which part was wrong (and
    ``ulysses = 2`` with spaces failed while ``ulysses=2 ring=2`` ran). Now the part is named, exit 2."""
    from dit_accel.cli.generate import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "tiny-wan", "--cp", cp, "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and said in err[-1], err


def test_generate_under_torchrun_refuses_a_ulysses_degree_above_the_heads_before_denoising(tmp_path):
    """``torchrun --nproc_per_node 4 -m dit_accel.cli.generate --cp ulysses=4`` on tiny-wan (2 heads). Before: every
    rank loaded the model, encoded the prompt and started denoising, then said "Ulysses over 4 ranks splits the 2
    attention heads ..." (not naming --cp). Now every rank says it after loading, before any denoising step, exit 2,
    and no output is written."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "f.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m",
           "dit_accel.cli.generate", "--cp", "ulysses=4", "--model", "tiny-wan", "--method", "tile", "--tile", "1,8,8",
           "--window", "3,1,1", "--frames", "13", "--height", "128", "--width", "128", "--steps", "2", "--device",
           "cpu", "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    # (counted in the log, not by line: four ranks write to one stderr, and two lines may run together)
    said = "dit-accel generate: error: context parallelism with ulysses_degree=4 (--cp ulysses=4) splits the " \
           "attention heads into 4 equal groups, but WanTransformer3DModel has num_attention_heads=2"
    assert res.returncode != 0 and log.count("dit-accel generate: error:") == log.count(said) == 4, log[-4000:]
    assert "denoising" not in log and "exitcode  : 2" in log and not out.exists(), log[-4000:]
