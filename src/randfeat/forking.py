"""What randfeat does in a forked child for torch's CPU threads.

On Linux torch runs its CPU operators on GNU OpenMP (`torch.__config__.parallel_info()`: "ATen
parallel backend: OpenMP"), and GNU OpenMP is not fork-safe: a child forked after the parent ran a
parallel region with more than one thread waits forever for a thread team that exists only in the
parent. Measured on the digits CNN (a 256-row batch, 2 threads in the parent): 10 of 10 forked
children hung in their first convolution, with or without randfeat's wrapper; with
`torch.set_num_threads(1)` in the child, none of 10, and raising it back to 2 in the child hung 10
of 10. gunicorn `--preload`, `multiprocessing` fork pools and any hand-written pre-fork server
meet this on their first request.

So randfeat registers an `os.register_at_fork` hook: in every forked child of a process that has
imported randfeat, torch's intra-op threads are set to 1 when they were more (what torch's own
`DataLoader` does in its workers). Run more threads per request in spawned workers (`randfeat
serve --workers N` spawns), or more forked workers. Seeds and noise streams are `randfeat.noise`'s
business; an `OnnxDefended`'s session is `randfeat.export`'s.
"""

from __future__ import annotations

import os

import torch

__all__: list[str] = []


def _one_thread_after_fork() -> None:
    if torch.backends.openmp.is_available() and torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_one_thread_after_fork)
