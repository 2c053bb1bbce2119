"""Models for the deployment tests: the digits CNN, timm resnet18 and vit_tiny (random weights).

Every one ends in a linear classifier W, so with the noise δ ~ N(0, ν I) at its input
("penultimate") the logits change by Wδ, and E‖Wδ‖² = ν‖W‖²_F (`check_variance`).
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable

import timm
import torch
from torch import Tensor, nn

from randfeat.layers import find_classifier

NU = 0.05


def digits_cnn() -> tuple[nn.Module, Callable[[int], Tensor]]:
    from randfeat.eval.models import DigitsCNN

    torch.manual_seed(0)
    return DigitsCNN().eval(), lambda n: torch.rand(n, 1, 8, 8)


def resnet18() -> tuple[nn.Module, Callable[[int], Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    return model, lambda n: torch.rand(n, 3, 32, 32)


def vit_tiny() -> tuple[nn.Module, Callable[[int], Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32
    ).eval()
    return model, lambda n: torch.rand(n, 3, 32, 32)


MODELS = {"digits_cnn": digits_cnn, "resnet18": resnet18, "vit_tiny": vit_tiny}


def check_variance(model: nn.Module, noisy: Tensor, clean: Tensor) -> None:
    """E‖Δ‖² = ν‖W‖²_F for Δ = Wδ; Var(‖Wδ‖²) = 2ν²‖W Wᵀ‖²_F per row, so the mean of n rows has
    SE = ν·sqrt(2‖W Wᵀ‖²_F / n); we accept 5 SE (false alarm < 1e-6 by the CLT)."""
    w = find_classifier(model)[1].weight.detach().double()
    sq = (noisy.double() - clean.double()).pow(2).sum(dim=1)
    n = sq.numel()
    expected = NU * w.pow(2).sum().item()
    se = NU * math.sqrt(2 * (w @ w.T).pow(2).sum().item() / n)
    assert abs(sq.mean().item() - expected) < 5 * se, (sq.mean().item(), expected, se)


def features(model: nn.Module) -> int:
    """The classifier's input size."""
    return int(find_classifier(model)[1].weight.shape[1])


def draw_in_forked_children(
    fn: Callable[[], torch.Tensor], children: int = 2
) -> list[torch.Tensor]:
    """Fork `children` processes; each sends back `fn()` through a pipe."""
    results = []
    pids = []
    for _ in range(children):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                os.close(r)
                with os.fdopen(wfd, "wb") as f:
                    f.write(pickle.dumps(fn()))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(wfd)
        with os.fdopen(r, "rb") as f:
            results.append(pickle.loads(f.read()))
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    return results
