"""A defended toy model served by `run_server` in its own process (run by test_run.py).

`python tests/serve/toy_server.py PORT WORKERS`: an 8×8 one-channel "image" classifier with noise
on its penultimate features; an all-ones image takes 2 s (a request to be in flight at SIGTERM).
`python tests/serve/toy_server.py PORT WORKERS STORE`: the same with keyed noise and the default
query detector on the shared store `STORE` (`sqlite:PATH`), flagged queries answered and logged.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import Tensor, nn

import randfeat
from randfeat.detect import DEFAULT
from randfeat.serve.config import DetectOptions, ModelCard, ServeOptions
from randfeat.serve.guard import DetectorSpec
from randfeat.serve.run import run_server


class Slow(nn.Module):
    """A linear classifier that sleeps 2 s on an all-ones image."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        if bool((x == 1).all()):
            time.sleep(2.0)
        return self.head(self.flatten(x))


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    if len(sys.argv) > 3:  # keyed noise (one key, drawn here) and detection on a shared store
        defended = randfeat.wrap(Slow().eval(), ["head.pre"], nu=0.5, noise="keyed")
        card = ModelCard("toy", (1, 8, 8), 10, True, "feature", ("head.pre",), 0.5, "keyed")
        options = ServeOptions(admin_key="admin", max_wait_ms=0, detect=DetectOptions("log"))
        spec = DetectorSpec(DEFAULT, store=sys.argv[3], threshold=0.9)
        run_server(defended, card, options, port=port, workers=workers, detector=spec)
        sys.exit(0)
    defended = randfeat.wrap(Slow().eval(), ["head.pre"], nu=0.5)
    card = ModelCard("toy", (1, 8, 8), 10, True, "feature", ("head.pre",), 0.5)
    options = ServeOptions(max_queries_per_key=40, admin_key="admin", max_wait_ms=0)
    run_server(defended, card, options, port=port, workers=workers, log_level="info")
