"""Method configs: valid values are normalised, invalid ones fail at construction naming the field."""

import pytest

from dit_accel import GNA, SLA, Dense, Radial, Tile, method_from_name


def test_valid_configs_are_normalised():
    gna = GNA(kernel_size=[3, 5], stride=(1, 2), is_causal=[True, False])
    assert gna.kernel_size == (3, 5) and gna.stride == (1, 2) and gna.is_causal == (True, False)
    assert GNA(kernel_size=7).kernel_size == 7
    assert Tile(tile=[2, 4, 4], window=[1, 3, 3]).tile == (2, 4, 4)
    assert Radial(decay=1).decay == 1.0 and isinstance(Radial(decay=1).decay, float)
    assert SLA(topk=1).topk == 1.0
    assert method_from_name("TILE", tile=(2, 4, 4), window=(1, 3, 3)) == Tile(tile=(2, 4, 4), window=(1, 3, 3))
    assert method_from_name("dense") == Dense()
    assert Tile().to_dict()["method"] == "tile"
    assert Tile(window=(2, 3, 4)).window == (2, 3, 4)  # even windows: FastVideo's convention, like w + 1


@pytest.mark.parametrize(
    "factory, field",
    [
        (lambda: GNA(kernel_size=1), "GNA.kernel_size"),
        (lambda: GNA(kernel_size=(3, 3, 3, 3)), "GNA.kernel_size"),
        (lambda: GNA(kernel_size=3.5), "GNA.kernel_size"),
        (lambda: GNA(kernel_size=True), "GNA.kernel_size"),
        (lambda: GNA(kernel_size=3, stride=4), "GNA.stride"),
        (lambda: GNA(kernel_size=(3, 5), stride=(1, 6)), "GNA.stride"),
        (lambda: GNA(kernel_size=3, dilation=0), "GNA.dilation"),
        (lambda: GNA(kernel_size=(3, 3, 3), stride=(1, 1)), "same length"),
        (lambda: GNA(kernel_size=(3, 3), is_causal=(True, False, True)), "same length"),
        (lambda: GNA(is_causal=()), "GNA.is_causal"),
        (lambda: GNA(is_causal="yes"), "GNA.is_causal"),
        (lambda: Tile(window=(0, 3, 3)), "Tile.window"),
        (lambda: Tile(tile=(6, 8), window=(3, 3, 3)), "Tile.window"),
        (lambda: Tile(tile=0), "Tile.tile"),
        (lambda: Radial(decay=0.0), "Radial.decay"),
        (lambda: Radial(decay=True), "Radial.decay"),
        (lambda: Radial(block_size=96), "Radial.block_size"),
        (lambda: Radial(sink_frames=(-1,)), "Radial.sink_frames"),
        (lambda: SLA(topk=0.0), "SLA.topk"),
        (lambda: SLA(topk=True), "SLA.topk"),
        (lambda: SLA(topk=0.5, negligible=0.6), "SLA.negligible"),
        (lambda: SLA(block_q=32), "SLA.block_q"),
        (lambda: SLA(block_k=32), "SLA.block_k"),
        (lambda: SLA(feature_map="tanh"), "SLA.feature_map"),
        (lambda: SLA(linear_tokens="some"), "SLA.linear_tokens"),
        (lambda: method_from_name("sparse"), "is not a registered method"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_invalid_values_name_the_field(factory, field):
    with pytest.raises((ValueError, TypeError), match=field.replace(".", r"\.")):
        factory()


def test_grid_dependent_errors_give_followable_advice():
    with pytest.raises(ValueError, match="exceeds the grid extent 6 along dimension 1.*smaller kernel"):
        GNA(kernel_size=(3, 7, 3)).plan((4, 6, 8))
    # A single latent frame cannot take any GNA kernel (>= 2): point to what works.
    with pytest.raises(ValueError, match="extent 1 along dimension 0.*use Tile"):
        GNA(kernel_size=(3, 3, 3)).plan((1, 8, 8))
    assert Tile(tile=(1, 4, 4), window=(1, 1, 1)).plan((1, 8, 8)).kind == "layout"
