"""Models for the deployment tests: the digits CNN, timm resnet18 and vit_tiny (random weights).

Every one ends in a linear classifier W, so with the noise δ ~ N(0, ν I) at its input
("penultimate") the logits change by Wδ, and E‖Wδ‖² = ν‖W‖²_F (`check_variance`).
"""

from __future__ import annotations

import gc
import math
import os
import pickle
import select
import signal
import time
from collections.abc import Callable
from typing import Any

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
    fn: Callable[[], torch.Tensor],
    children: int = 2,
    *,
    before: Callable[[], object] | None = None,
    timeout: float = 60.0,
) -> list[torch.Tensor]:
    """Fork `children` processes; each sends back `fn()` through a pipe, then releases what it
    holds (`gc.collect()`) and exits. `before()` runs in the parent right before each fork. A child
    that has not answered and exited within `timeout` seconds is killed and the test fails (it
    would otherwise hang the suite)."""
    results = []
    for _ in range(children):
        if before is not None:
            before()
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                os.close(r)
                with os.fdopen(wfd, "wb") as f:
                    f.write(pickle.dumps(fn()))
                gc.collect()  # a destructor that hangs in a forked child hangs here
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(wfd)
        deadline = time.monotonic() + timeout

        def give_up(what: str, pid: int = pid) -> AssertionError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return AssertionError(f"a forked child did not {what} within {timeout} s")

        data = b""
        with os.fdopen(r, "rb", buffering=0) as f:
            while chunk := _read_before(f, deadline):
                data += chunk
            if chunk is None:
                raise give_up("answer")
        while not (waited := os.waitpid(pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                raise give_up("exit")
            time.sleep(0.01)
        status = waited[1]
        assert os.waitstatus_to_exitcode(status) == 0
        results.append(pickle.loads(data))
    return results


def _read_before(f: Any, deadline: float) -> bytes | None:
    """The next bytes of `f` (b"" at its end), or None when none came before `deadline`."""
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([f], [], [], left)[0]:
        return None
    return bytes(f.read(1 << 16))
