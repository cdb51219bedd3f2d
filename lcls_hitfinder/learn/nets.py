"""Networks: the twin-network embedder and the design study's multi-output CNN baselines.

All take one-channel thumbnails (N, 1, S, S) from the shared preprocessing. The baselines are built
from one layer specification each (plain stacks of conv-BN-ReLU with max-pooling, VGG16's layout,
ResNet18's basic blocks), branching into the structure and count heads late (after the trunk) or
early (after the first layer, two towers).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

COUNT_CLASSES = 5  # 0 (blank) .. 4 particles


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SpaceToDepth(nn.Module):
    """(N, 1, S, S) -> (N, f², S/f, S/f), each f x f block of pixels into f² channels (pixel_unshuffle's order).

    A convolution with fixed one-hot kernels rather than pixel_unshuffle, whose ONNX export loses the static
    image size that the head's pooling needs.
    """

    weight: torch.Tensor

    def __init__(self, f: int) -> None:
        super().__init__()
        self.f = f
        self.register_buffer("weight", torch.eye(f * f).reshape(f * f, 1, f, f), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight, stride=self.f)


class RadialProfile(nn.Module):
    """(N, 1, S, S) -> (N, 2R): the mean and the spread of each of R rings about the thumbnail's centre.

    Why: a pair lined up with the beam shows no fringe across the detector, only the Ewald sphere's slow
    radial modulation of its intensity, and averaging around each ring gathers that signal from every
    pixel of the ring. A fixed linear map (one matrix product), so it exports to ONNX and costs little.
    """

    rings: torch.Tensor

    def __init__(self, size: int, n_rings: int) -> None:
        super().__init__()
        c = (size - 1) / 2
        yy, xx = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")
        r = torch.sqrt(xx**2 + yy**2).flatten()
        ring = torch.clamp((r / (r.max() + 1e-6) * n_rings).long(), max=n_rings - 1)
        onehot = nn.functional.one_hot(ring, n_rings).to(torch.float32)  # (S², R)
        self.register_buffer("rings", onehot / onehot.sum(0, keepdim=True), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mean = flat @ self.rings
        spread = torch.sqrt(torch.relu(flat.square() @ self.rings - mean.square()) + 1e-6)
        return torch.cat([mean, spread], dim=1)


class TwinEmbedder(nn.Module):
    """A small CNN: thumbnail (N, 1, S, S) -> embedding (N, D). Shared by both arms of the twin.

    `depth` conv blocks, each halving the size; channels grow from `width` by 1.5x per block (not 2x), so
    every block costs less than the one before and the whole net stays fast on a CPU. Each block has
    `convs` 3x3 conv layers before its pooling (more capacity and a wider receptive field per scale). `unshuffle` f > 1
    first moves each f x f block of pixels into f² channels (space to depth): a 128 x 128 thumbnail then
    costs what a 64 x 64 one does, and the net, not sum-binning, decides how the four pixels combine.
    `radial_rings` R > 0 adds the thumbnail's ring profile (`RadialProfile`, through one hidden layer) to
    what the head sees; it needs the thumbnail side `size`.
    """

    def __init__(
        self,
        embed_dim: int = 32,
        width: int = 8,
        depth: int = 4,
        unshuffle: int = 1,
        radial_rings: int = 0,
        size: int = 64,
        convs: int = 1,
    ) -> None:
        super().__init__()
        if not 2 <= embed_dim <= 128:
            raise ValueError(f"embed_dim must be in [2, 128], got {embed_dim}")
        chans = [unshuffle**2] + [round(width * 1.5**i) for i in range(depth)]
        blocks: list[nn.Module] = [SpaceToDepth(unshuffle)] if unshuffle > 1 else []
        for a, b in itertools.pairwise(chans):
            blocks += [*conv_bn_relu(a, b), *(m for _ in range(convs - 1) for m in conv_bn_relu(b, b)), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        radial_out = 32 if radial_rings else 0
        self.radial = (
            nn.Sequential(RadialProfile(size, radial_rings), nn.Linear(2 * radial_rings, radial_out), nn.ReLU())
            if radial_rings
            else None
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * chans[-1] + radial_out, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, embed_dim),
        )
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.radial is None:
            return self.head(self.features(x))
        pooled = self.head[:2](self.features(x))
        return self.head[2:](torch.cat([pooled, self.radial(x)], dim=1))


class ConcatEmbedder(nn.Module):
    """Several embedders side by side, their embeddings concatenated: an ensemble that serves as one model.

    Under the RMS distance of the triplet loss the squared distance over the concatenation is the
    members' squared distances averaged with their embedding dimensions as weights, so a bank built with
    it decides on the ensemble's mean distance, with no change to the bank or the service.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=1)


def plain_spec(n_layers: int, width: int) -> list[int | str]:
    """Conv widths of an n-layer plain CNN with 4 max-pools (fewer if n < 4) spread evenly; 'M' = pool."""
    n_pools = min(n_layers, 4)
    pool_after = {round((k + 1) * n_layers / n_pools) - 1 for k in range(n_pools)}
    spec: list[int | str] = []
    for i in range(n_layers):
        spec.append(width * 2 ** min(i * 4 // n_layers, 3))
        if i in pool_after:
            spec.append("M")
    return spec


def vgg16_spec(width: int) -> list[int | str]:
    """VGG16's 13 conv layers and 5 pools, channels scaled so `width` is the first layer's (64 in VGG16)."""
    w = width
    return [w, w, "M", 2 * w, 2 * w, "M", *[4 * w] * 3, "M", *[8 * w] * 3, "M", *[8 * w] * 3, "M"]


def stack(spec: list[int | str], c_in: int) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for item in spec:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += conv_bn_relu(c_in, int(item))
            c_in = int(item)
    return nn.Sequential(*layers), c_in


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block, with a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(c_in, c_out, stride),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.skip: nn.Module = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet18_trunk(width: int) -> tuple[nn.Sequential, int]:
    """ResNet18 for one-channel thumbnails: a 3x3 stem (no 7x7 / max-pool, inputs are small), 4 stages of 2 blocks."""
    layers: list[nn.Module] = conv_bn_relu(1, width)
    c = width
    for stage in range(4):
        out = width * 2**stage
        for block in range(2):
            layers.append(BasicBlock(c, out, 2 if stage > 0 and block == 0 else 1))
            c = out
    return nn.Sequential(*layers), c


class MultiOutputCNN(nn.Module):
    """Predicts (structure logits, count logits) from a thumbnail: the design study's baselines.

    `shared` runs once; each of the two heads has its own `tower` (empty for late branching) followed
    by global average pooling and a two-layer classifier.
    """

    def __init__(
        self, shared: nn.Module, towers: tuple[nn.Module, nn.Module], features: int, n_structures: int
    ) -> None:
        super().__init__()
        self.shared = shared
        self.towers = nn.ModuleList(towers)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(features, 128),
                nn.ReLU(inplace=True),
                nn.Linear(128, n),
            )
            for n in (n_structures, COUNT_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.shared(x)
        structure, count = (head(tower(h)) for head, tower in zip(self.heads, self.towers, strict=True))
        return structure, count


def build_cnn(arch: str, width: int, n_structures: int) -> MultiOutputCNN:
    """`late{3,5,10,18}`, `early{3,5,10,18}`, `resnet18` or `vgg16` (both late-branching)."""
    if arch == "resnet18":
        trunk, c = resnet18_trunk(width)
        return MultiOutputCNN(trunk, (nn.Identity(), nn.Identity()), c, n_structures)
    if arch == "vgg16":
        trunk, c = stack(vgg16_spec(width), 1)
        return MultiOutputCNN(trunk, (nn.Identity(), nn.Identity()), c, n_structures)
    for kind in ("late", "early"):
        if arch.startswith(kind) and arch[len(kind) :].isdigit():
            spec = plain_spec(int(arch[len(kind) :]), width)
            if kind == "late":
                trunk, c = stack(spec, 1)
                return MultiOutputCNN(trunk, (nn.Identity(), nn.Identity()), c, n_structures)
            split = 2 if spec[1] == "M" else 1  # the first conv layer (and its pool) is shared
            shared, c0 = stack(spec[:split], 1)
            (t1, c), (t2, _) = stack(spec[split:], c0), stack(spec[split:], c0)
            return MultiOutputCNN(shared, (t1, t2), c, n_structures)
    raise ValueError(f"unknown CNN architecture {arch!r}")
