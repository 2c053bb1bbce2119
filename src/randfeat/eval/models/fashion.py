"""`fashion-cnn`: a small CNN for Fashion-MNIST, trained on first use and cached.

[fashion_cnn][randfeat.eval.models.fashion.fashion_cnn] trains
[FashionCNN][randfeat.eval.models.fashion.FashionCNN] on the 60,000 training images of
Fashion-MNIST ([randfeat.eval.data.loaders.fashion_mnist][]) on the CPU in a few minutes, and caches the
weights like the digits CNN ([randfeat.eval.models.cache][]: stale or corrupt caches are retrained,
one process trains while the others wait for its file).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from randfeat.eval.data.loaders import Split, fashion_mnist
from randfeat.eval.models.cache import (
    CACHE_FORMAT_VERSION,
    TrainedModel,
    config_hash,
    data_checksum,
    load_or_train,
    top1_accuracy,
)

__all__ = ["FASHION_CNN_FILE", "FashionCNN", "fashion_cnn"]

FASHION_CNN_FILE = "fashion_cnn.pt"
"""The Fashion-MNIST CNN's file in the cache directory."""

# The training recipe; part of the cache key (a hash of this dict): changing a value retrains.
_FASHION_TRAIN_CONFIG: dict[str, Any] = {
    "arch": "FashionCNN(conv1=16,bn,pool,conv2=32,bn,pool,fc1=128,head=10)/v1",
    "optimizer": "adam",
    "schedule": "cosine-per-step-to-0",
    "lr": 3e-3,
    "epochs": 3,
    "batch_size": 128,
    "seed": 0,
    "dtype": "float32",
}


class FashionCNN(nn.Module):
    """A small CNN for `[N, 1, 28, 28]` Fashion-MNIST images in $[0, 1]$.

    `conv1 → bn1 → relu1 → pool1 → conv2 → bn2 → relu2 → pool2 → flatten → fc1 → relu3 → head`
    (28×28 → 14×14 → 7×7 maps, then 128 features); `head` is the final classifier, so
    `"head.pre"` is the penultimate feature vector where the paper adds its noise, and `conv1`,
    `conv2`, `fc1` are earlier layers of increasing depth for `randfeat.wrap`. The batch norms
    make three epochs enough (they are a fixed affine map at evaluation).

    Args:
        classes: number of classes `K`.
        width: channels of `conv1` (`conv2` has twice as many).
        generator: generator of the initial weights (PyTorch's default `uniform(±1/√fan_in)`);
            `None` uses the global RNG like any `nn.Module`.
    """

    def __init__(
        self, classes: int = 10, *, width: int = 16, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        for name, value, low in (("classes", classes, 2), ("width", width, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"Expected argument `{name}` to be an int >= {low}, but got {value!r}."
                )
        meta = torch.device("meta")  # initialised by reset_parameters, from `generator` only
        self.conv1 = nn.Conv2d(1, width, kernel_size=3, padding=1, device=meta)
        self.bn1 = nn.BatchNorm2d(width, device=meta)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, device=meta)
        self.bn2 = nn.BatchNorm2d(2 * width, device=meta)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * 7 * 7, 128, device=meta)
        self.relu3 = nn.ReLU()
        self.head = nn.Linear(128, classes, device=meta)
        self.to_empty(device="cpu")
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw weights and biases from `uniform(-1/√fan_in, 1/√fan_in)` (PyTorch's default for
        `nn.Conv2d` / `nn.Linear`) from `generator`; batch norms start at the identity."""
        for layer in (self.conv1, self.conv2, self.fc1, self.head):
            bound = 1.0 / math.sqrt(layer.weight[0].numel())
            for p in (layer.weight, layer.bias):
                if p is not None:
                    u = torch.rand(p.shape, generator=generator, dtype=p.dtype)
                    p.copy_(u.mul_(2 * bound).sub_(bound))
        for bn in (self.bn1, self.bn2):
            bn.reset_running_stats()
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits `[N, K]` of `x: [N, 1, 28, 28]` in $[0, 1]$."""
        h = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        h = self.pool2(self.relu2(self.bn2(self.conv2(h))))
        h = self.relu3(self.fc1(self.flatten(h)))
        return self.head(h)

    def get_classifier(self) -> nn.Module:
        """The final classifier `head` (timm's contract)."""
        return self.head


def _train(data: Split, config: dict[str, Any]) -> FashionCNN:
    """Adam with a per-step cosine decay to 0, no augmentation; seeded weights and order."""
    generator = torch.Generator().manual_seed(int(config["seed"]))
    model = FashionCNN(data.classes, generator=generator)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    loss_fn = nn.CrossEntropyLoss()
    n, batch = data.x_train.shape[0], int(config["batch_size"])
    steps = int(config["epochs"]) * math.ceil(n / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in range(int(config["epochs"])):
        for idx in torch.randperm(n, generator=generator).split(batch):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
            optimizer.step()
            schedule.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def fashion_cnn(
    *,
    root: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    retrain: bool = False,
) -> FashionCNN:
    """The Fashion-MNIST CNN, trained on first use (>= 90% test accuracy), then cached.

    Training (Adam, lr 3e-3 with a per-step cosine decay to 0, 3 epochs of batch 128, weights and
    order from a generator seeded with 0) runs on the CPU with torch's thread setting; the result
    is cached in `cache_dir / "fashion_cnn.pt"` with the hash of this recipe and a checksum of the
    data, and reused while both match.

    Args:
        root: the Fashion-MNIST directory (see `randfeat.eval.data.loaders.fashion_mnist`).
        pretrained: return trained weights; `False` returns an untrained model (global RNG).
        cache_dir: cache directory; default `$RANDFEAT_CACHE`, else
            `$XDG_CACHE_HOME/randfeat`, else `~/.cache/randfeat`.
        retrain: ignore any cached file, train and overwrite it.

    Returns:
        A `FashionCNN` in eval mode on the CPU.

    Raises:
        FileNotFoundError: the Fashion-MNIST files are missing (the message says how to get them).
        ValueError: a Fashion-MNIST file is damaged.
    """
    if not pretrained:
        return FashionCNN().eval()
    data = fashion_mnist(root)
    spec = TrainedModel(
        name="Fashion-MNIST CNN",
        file=FASHION_CNN_FILE,
        meta={
            "format_version": CACHE_FORMAT_VERSION,
            "config_hash": config_hash(_FASHION_TRAIN_CONFIG),
            "data_checksum": data_checksum(data),
        },
        build=lambda: FashionCNN(data.classes, generator=torch.Generator()),
        train=lambda: _train(data, _FASHION_TRAIN_CONFIG),
        accuracy=lambda model: top1_accuracy(model, data.x_test, data.y_test),
    )
    return load_or_train(spec, cache_dir, retrain=retrain)
