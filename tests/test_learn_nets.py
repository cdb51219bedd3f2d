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


def test_radial_profile_is_the_ring_mean_and_spread() -> None:
    """A pattern that depends on the radius only has its value as the ring means and no spread; a pattern
    that alternates around each ring has the ring means of a flat one and the alternation as its spread."""
    from lcls_hitfinder.learn.nets import RadialProfile

    size, n = 32, 8
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")
    r = torch.sqrt(xx**2 + yy**2)
    ring = torch.clamp((r / r.max() * n).long(), max=n - 1)
    radial_only = ring.to(torch.float32)[None, None] * 0.5  # thumbnails are z-scored: values of order 1
    out = RadialProfile(size, n)(radial_only)
    assert torch.allclose(out[0, :n], torch.arange(n, dtype=torch.float32) * 0.5, atol=1e-5)
    assert out[0, n:].max() < 1e-2
    checker = (((xx > 0) ^ (yy > 0)).to(torch.float32) * 2 - 1)[None, None]  # +-1 quadrants, mean 0 per ring
    out = RadialProfile(size, n)(checker)
    assert out[0, :n].abs().max() < 1e-5 and torch.allclose(out[0, n:], torch.ones(n), atol=1e-2)


def test_radial_embedder_sees_the_ring_profile() -> None:
    """With `radial_rings`, two thumbnails that differ only in a ring modulation get different embeddings
    through the radial branch even when the conv features are blind to it (their weights zeroed)."""
    net, plain = TwinEmbedder(8, 4, 2, radial_rings=8, size=32).eval(), TwinEmbedder(8, 4, 2).eval()
    assert net(torch.zeros(3, 1, 32, 32)).shape == (3, 8)
    for m in [*net.features.modules(), *plain.features.modules()]:
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
    c = 15.5
    yy, xx = torch.meshgrid(torch.arange(32) - c, torch.arange(32) - c, indexing="ij")
    r = torch.sqrt(xx**2 + yy**2)
    flat, modulated = torch.ones(1, 1, 32, 32), (1 + 0.5 * torch.cos(r / 3))[None, None]
    with torch.no_grad():
        assert not torch.allclose(net(flat), net(modulated))
        assert torch.allclose(plain(flat), plain(modulated))  # the control: without the branch, blind
