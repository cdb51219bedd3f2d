"""Shapes and layer counts of the embedder and of the design study's CNN baselines."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lcls_hitfinder.learn.nets import COUNT_CLASSES, TwinEmbedder, build_cnn, plain_spec, vgg16_spec


def convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in module.modules())


@pytest.mark.parametrize("dim", [2, 32, 128])
def test_embedder_dimensions(dim: int) -> None:
    assert TwinEmbedder(dim)(torch.zeros(3, 1, 64, 64)).shape == (3, dim)


@pytest.mark.parametrize("dim", [1, 129])
def test_embedder_refuses_dimensions_outside_2_to_128(dim: int) -> None:
    with pytest.raises(ValueError, match="embed_dim"):
        TwinEmbedder(dim)


@pytest.mark.parametrize("n", [3, 5, 10, 18])
def test_plain_specs_have_n_conv_layers(n: int) -> None:
    spec = plain_spec(n, 8)
    assert sum(x != "M" for x in spec) == n
    assert spec.count("M") == min(n, 4) and spec[-1] == "M"


@pytest.mark.parametrize(
    ("arch", "n_convs"),
    [("late3", 3), ("late10", 10), ("late18", 18), ("early5", 9), ("early18", 35), ("vgg16", 13), ("resnet18", 17)],
)
def test_baselines_predict_structure_and_count(arch: str, n_convs: int) -> None:
    net = build_cnn(arch, 4, n_structures=7).eval()
    structure, count = net(torch.zeros(2, 1, 64, 64))
    assert structure.shape == (2, 7) and count.shape == (2, COUNT_CLASSES)
    # early branching: the first layer shared, the other n - 1 once per head
    assert convs(net) == n_convs


def test_vgg16_layout() -> None:
    spec = vgg16_spec(64)
    assert [x for x in spec if x != "M"][:3] == [64, 64, 128] and spec.count("M") == 5


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown CNN"):
        build_cnn("late", 8, 3)
