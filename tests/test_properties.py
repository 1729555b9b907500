"""Property tests of the API boundary: any value of any method-config field or apply() argument either
works or raises ValueError/TypeError whose message names the argument; never another exception."""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dit_accel
from dit_accel.models.tiny import build_tiny_transformer

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.sampled_from([np.int64(3), np.int32(64), np.float32(0.5), np.float64(0.2), np.bool_(True), np.float32("nan"),
                     np.int8(-1), 64.0, 0.5, 1e-7]),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4).map(tuple),
    st.lists(SCALARS, max_size=4),
    st.lists(st.lists(st.integers(-1, 6), max_size=3).map(tuple), max_size=3).map(tuple),  # per-head windows
    st.dictionaries(st.integers(-1, 3), st.sampled_from([dit_accel.Dense(), "tile", None, 3]), max_size=2),
    st.builds(object),
)

# The fields every config needs besides the one under test.
CONFIGS = {dit_accel.Dense: {}, dit_accel.GNA: {"kernel_size": 3}, dit_accel.Tile: {}, dit_accel.Radial: {},
           dit_accel.SLA: {}}


def _names_argument(error: Exception, name: str) -> bool:
    return name in str(error)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_every_config_field_is_checked_at_construction(data):
    cls = data.draw(st.sampled_from(sorted(CONFIGS, key=lambda c: c.__name__)), label="config")
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    if not fields:
        return
    name = data.draw(st.sampled_from(fields), label="field")
    value = data.draw(VALUES, label="value")
    try:
        config = cls(**{**CONFIGS[cls], name: value})
    except (ValueError, TypeError) as error:
        assert _names_argument(error, name), f"{cls.__name__}({name}={value!r}): {error}"
        return
    # Accepted: the config is usable, hashable, and its field holds a plain Python value (numpy scalars converted).
    hash(config)
    accepted = getattr(config, name)
    assert not isinstance(accepted, np.generic), f"{cls.__name__}.{name} kept numpy scalar {accepted!r}"
    assert config == cls(**{**CONFIGS[cls], name: accepted})


@pytest.fixture(scope="module")
def transformer():
    return build_tiny_transformer("wan")


APPLY_ARGS = ("method", "dense_steps", "dense_last_steps", "dense_layers", "layer_methods", "backend", "weights",
              "capture", "capture_layers", "capture_steps", "scheduler", "timing")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_apply_argument_is_checked(transformer, tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)  # a string `capture` makes a folder: here, not in the repository
    name = data.draw(st.sampled_from(APPLY_ARGS), label="argument")
    value = data.draw(VALUES, label="value")
    kwargs = {"method": dit_accel.Tile(tile=(2, 4, 4), window=1), name: value}
    try:
        handle = dit_accel.apply(transformer, **kwargs)
    except (ValueError, TypeError) as error:
        assert _names_argument(error, name), f"apply({name}={value!r}): {error}"
        return
    handle.remove()


@pytest.mark.parametrize("value", [None, 3, "", "nope", ("tile",)])
def test_method_from_name_rejects_non_names(value):
    with pytest.raises((ValueError, TypeError), match="name"):
        dit_accel.method_from_name(value)
