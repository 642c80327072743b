"""Registry of image classifiers for Fashion-MNIST (1x28x28), also usable on 3x32x32.

Every model returns raw logits of shape ``(N, num_classes)``; losses such as
``nn.CrossEntropyLoss`` apply log-softmax themselves, so a softmax here would be
applied twice. Layers are direct, named children of each model and run in
registration order, so forward hooks can be attached by the names listed in the
class attribute ``feature_layers`` (names as in ``model.named_modules()``).
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

if TYPE_CHECKING:
    from fmnist_core.core.data import ImageDataset

__all__ = [
    "MODELS", "register", "build_model", "list_models", "count_parameters",
    "MLP", "LeNet5", "MyCNN", "AlexNet", "VGG16", "BasicBlock", "ResNet",
    "WideBasicBlock", "WideResNet", "SmallCNN",
]

MODELS: dict[str, Callable[..., nn.Module]] = {}

_IN_CHANNELS = (1, 3)
_IMAGE_SIZES = (28, 32)


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Return a decorator that adds a model builder to :data:`MODELS`.

    Parameters
    ----------
    name : str
        Registry name; must not be registered already.

    Returns
    -------
    callable
        Decorator returning the builder unchanged. The builder is called as
        ``builder(in_channels, num_classes, image_size, **kwargs)``.
    """
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder
    return decorator


def list_models() -> list[str]:
    """Return the registered model names, sorted.

    Returns
    -------
    list of str
        Names accepted by :func:`build_model`.
    """
    return sorted(MODELS)


def build_model(name: str, in_channels: int = 1, num_classes: int = 10,
                image_size: int = 28, **kwargs) -> nn.Module:
    """Build a registered classifier.

    Parameters
    ----------
    name : str
        Registry name, see :func:`list_models`.
    in_channels : int, default 1
        1 (grayscale) or 3 (RGB).
    num_classes : int, default 10
        Number of output logits.
    image_size : int, default 28
        Side of the square input, 28 or 32.
    **kwargs
        Passed to the model's builder.

    Returns
    -------
    torch.nn.Module
        Model mapping ``(N, in_channels, image_size, image_size)`` to logits
        ``(N, num_classes)``.

    Raises
    ------
    ValueError
        For an unknown name or an unsupported ``in_channels``/``image_size``.
    """
    if name not in MODELS:
        msg = f"unknown model {name!r}; choose one of: {', '.join(list_models())}"
        close = difflib.get_close_matches(name, list_models(), n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        raise ValueError(msg)
    if in_channels not in _IN_CHANNELS:
        raise ValueError(f"in_channels must be one of {_IN_CHANNELS}, got {in_channels!r}")
    if image_size not in _IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {_IMAGE_SIZES}, got {image_size!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes!r}")
    return MODELS[name](in_channels, num_classes, image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Count trainable parameters.

    Parameters
    ----------
    model : torch.nn.Module
        Any module.

    Returns
    -------
    int
        Number of elements over parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- helpers

def _flat_size(layers: Iterable[nn.Module], in_channels: int, image_size: int) -> int:
    """Features per sample after ``layers`` for a square input."""
    probe = nn.Sequential(*layers)
    was_training = probe.training
    probe.eval()  # a train-mode probe would shift BatchNorm running stats
    with torch.no_grad():
        out = probe(torch.zeros(1, in_channels, image_size, image_size))
    probe.train(was_training)
    return out[0].numel()


def _conv_relu(cin: int, cout: int, kernel: int, padding: int = 0) -> nn.Sequential:
    # Bundled so a hook on the name sees the post-activation map.
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding), nn.ReLU(inplace=True))


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _linear_relu(fin: int, fout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(fin, fout), nn.ReLU(inplace=True))


def _global_pool() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


class _LayeredNet(nn.Module):
    """Runs its named children in order; subclasses only declare the layers."""

    feature_layers: list[str] = []

    def __init__(self, layers: "OrderedDict[str, nn.Module]"):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x


# --------------------------------------------------------------------------- models

@register("mlp")
class MLP(_LayeredNet):
    """One-hidden-layer perceptron, 784-128-10 on Fashion-MNIST."""

    feature_layers = ["flatten", "fc1", "fc2"]

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 hidden: int = 128):
        super().__init__(OrderedDict(
            flatten=nn.Flatten(),
            fc1=_linear_relu(in_channels * image_size * image_size, hidden),
            fc2=nn.Linear(hidden, num_classes),
        ))


class LeNet5(_LayeredNet):
    """LeNet-5 with ReLU; ``pool`` is ``"avg"`` (classic) or ``"max"``."""

    feature_layers = ["conv1", "pool1", "conv2", "pool2", "fc1", "fc2", "fc3"]

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 pool: str = "avg"):
        pools = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}
        if pool not in pools:
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        features = OrderedDict(
            conv1=_conv_relu(in_channels, 6, 5, padding=2), pool1=pools[pool](2),
            conv2=_conv_relu(6, 16, 5), pool2=pools[pool](2), flatten=nn.Flatten(),
        )
        flat = _flat_size(features.values(), in_channels, image_size)
        super().__init__(OrderedDict(
            **features, fc1=_linear_relu(flat, 120), fc2=_linear_relu(120, 84),
            fc3=nn.Linear(84, num_classes),
        ))


@register("lenet_avg")
def _lenet_avg(in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    return LeNet5(in_channels, num_classes, image_size, pool="avg", **kwargs)


@register("lenet_max")
def _lenet_max(in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    return LeNet5(in_channels, num_classes, image_size, pool="max", **kwargs)


@register("mycnn")
class MyCNN(_LayeredNet):
    """Two conv/max-pool stages, then a 128-unit dense layer with dropout."""

    feature_layers = ["conv1", "pool1", "conv2", "pool2", "fc1", "fc2"]

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 dropout: float = 0.5):
        features = OrderedDict(
            conv1=_conv_relu(in_channels, 32, 3, padding=1), pool1=nn.MaxPool2d(2),
            conv2=_conv_relu(32, 64, 3, padding=1), pool2=nn.MaxPool2d(2), flatten=nn.Flatten(),
        )
        flat = _flat_size(features.values(), in_channels, image_size)
        super().__init__(OrderedDict(
            **features, fc1=_linear_relu(flat, 128), dropout=nn.Dropout(dropout),
            fc2=nn.Linear(128, num_classes),
        ))


@register("alexnet")
class AlexNet(_LayeredNet):
    """AlexNet shrunk to 28px: 3x3 convs, three 2x2 max-pools, no LRN."""

    feature_layers = ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5",
                      "pool3", "fc1", "fc2", "fc3"]

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 dropout: float = 0.5):
        features = OrderedDict(
            conv1=_conv_relu(in_channels, 64, 3, 1), pool1=nn.MaxPool2d(2),
            conv2=_conv_relu(64, 192, 3, 1), pool2=nn.MaxPool2d(2),
            conv3=_conv_relu(192, 384, 3, 1), conv4=_conv_relu(384, 256, 3, 1),
            conv5=_conv_relu(256, 256, 3, 1), pool3=nn.MaxPool2d(2), flatten=nn.Flatten(),
        )
        flat = _flat_size(features.values(), in_channels, image_size)
        super().__init__(OrderedDict(
            **features, dropout1=nn.Dropout(dropout), fc1=_linear_relu(flat, 1024),
            dropout2=nn.Dropout(dropout), fc2=_linear_relu(1024, 512),
            fc3=nn.Linear(512, num_classes),
        ))


@register("vgg16")
class VGG16(_LayeredNet):
    """VGG-16 with BatchNorm, four max-pools (28->1 px) and global average pooling.

    A fifth pool would shrink 28px to zero, and without BatchNorm this depth
    barely trains from scratch.
    """

    feature_layers = ["block1", "block2", "block3", "block4", "block5", "classifier"]
    _stages = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 dropout: float = 0.5):
        blocks, cin = OrderedDict(), in_channels
        for i, widths in enumerate(self._stages, start=1):
            layers = []
            for cout in widths:
                layers.append(_conv_bn_relu(cin, cout))
                cin = cout
            if i < len(self._stages):
                layers.append(nn.MaxPool2d(2))
            blocks[f"block{i}"] = nn.Sequential(*layers)
        super().__init__(OrderedDict(
            **blocks, pool=_global_pool(), dropout=nn.Dropout(dropout),
            classifier=nn.Linear(cin, num_classes),
        ))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs); 1x1 projection shortcut on shape change."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(_LayeredNet):
    """CIFAR-style ResNet: 3x3 stem without max-pool, four stages of basic blocks."""

    feature_layers = ["stem", "layer1", "layer2", "layer3", "layer4", "pool", "fc"]

    def __init__(self, blocks_per_stage: tuple[int, int, int, int], in_channels: int = 1,
                 num_classes: int = 10, image_size: int = 28, dropout: float = 0.3):
        stages, cin = OrderedDict(), 64
        for i, (width, n, stride) in enumerate(zip((64, 128, 256, 512), blocks_per_stage,
                                                   (1, 2, 2, 2)), start=1):
            layers = []
            for s in [stride] + [1] * (n - 1):
                layers.append(BasicBlock(cin, width, s))
                cin = width
            stages[f"layer{i}"] = nn.Sequential(*layers)
        super().__init__(OrderedDict(
            stem=nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(64), nn.ReLU(inplace=True)),
            **stages, pool=_global_pool(), dropout=nn.Dropout(dropout),
            fc=nn.Linear(cin, num_classes),
        ))


@register("resnet18")
def _resnet18(in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    return ResNet((2, 2, 2, 2), in_channels, num_classes, image_size, **kwargs)


@register("resnet34")
def _resnet34(in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    return ResNet((3, 4, 6, 3), in_channels, num_classes, image_size, **kwargs)


class WideBasicBlock(nn.Module):
    """Pre-activation wide block (BN -> LeakyReLU(0.1) -> conv), as in FixMatch.

    With ``activate_before_residual`` the shortcut also sees the activated input
    (used by the first block only, following the FixMatch reference code).
    """

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool = False,
                 bn_momentum: float = 0.001):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(0.1)
        self.activate_before_residual = activate_before_residual
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.bn1(x))
        out = self.conv2(self.act(self.bn2(self.conv1(pre))))
        if self.shortcut is None:
            return x + out
        return self.shortcut(pre if self.activate_before_residual else x) + out


class WideResNet(_LayeredNet):
    """WideResNet-depth-k (FixMatch variant); WRN-28-2 has about 1.47M parameters."""

    feature_layers = ["stem", "block1", "block2", "block3", "pool", "fc"]

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 depth: int = 28, widen_factor: int = 2, bn_momentum: float = 0.001):
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        groups = OrderedDict()
        for g, stride in enumerate((1, 2, 2), start=1):
            groups[f"block{g}"] = nn.Sequential(*[
                WideBasicBlock(widths[g - 1] if i == 0 else widths[g], widths[g],
                               stride if i == 0 else 1, g == 1 and i == 0, bn_momentum)
                for i in range(n)])
        super().__init__(OrderedDict(
            stem=nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=True),
            **groups,
            # The last blocks end in a conv, so the head supplies the final BN+act.
            head=nn.Sequential(nn.BatchNorm2d(widths[3], momentum=bn_momentum),
                               nn.LeakyReLU(0.1)),
            pool=_global_pool(), fc=nn.Linear(widths[3], num_classes),
        ))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)


@register("wrn28_2")
def _wrn28_2(in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    return WideResNet(in_channels, num_classes, image_size, depth=28, widen_factor=2, **kwargs)


@register("smallcnn")
class SmallCNN(_LayeredNet):
    """Four 3x3 conv-BN-ReLU layers, two max-pools, global average pool: quick runs."""

    feature_layers = ["conv1", "conv2", "pool1", "conv3", "conv4", "pool2", "pool", "fc"]

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__(OrderedDict(
            conv1=_conv_bn_relu(in_channels, 32), conv2=_conv_bn_relu(32, 32),
            pool1=nn.MaxPool2d(2),
            conv3=_conv_bn_relu(32, 64), conv4=_conv_bn_relu(64, 64),
            pool2=nn.MaxPool2d(2),
            pool=_global_pool(), fc=nn.Linear(64, num_classes),
        ))


def model_meta(name: str, ds: ImageDataset) -> dict:
    """What ``predict`` needs to rebuild and feed the model, stored in its checkpoints."""
    c, h, _ = ds.image_shape
    return {"model": name, "in_channels": c, "image_size": h, "mean": list(ds.mean), "std": list(ds.std),
            "class_names": list(ds.class_names)}


def rebuild(config: dict) -> torch.nn.Module:
    """Build the architecture named in a checkpoint's config."""
    return build_model(config["model"], in_channels=config["in_channels"], image_size=config["image_size"],
                       num_classes=len(config["class_names"]))
