"""Peak memory of one no-grad forward against the batch size ("Forward memory" in docs/benchmarks.md).

For a timm model (`pretrained=False`) at `--image-size`, the peak memory of one forward under
`torch.no_grad` is measured at a few small batch sizes, in float32 and under bfloat16 autocast
(as `randfeat eval --dtype bfloat16` runs it, through `randfeat.eval.forward.Forward`), and a line
`peak = fixed + per_image · batch` is fitted by least squares and extrapolated to
`--extrapolate` rows (the `--forward-batch` of a run).

What is measured: the bytes of every tensor the forward's operations create, live at once, at
their peak (a `TorchDispatchMode` sees each operation's outputs; a storage counts from its
creation until its last tensor is gone; views add nothing; the weights and the input are held
before the forward and counted apart). That is the memory a GPU's caching allocator must hand
out (`torch.cuda.max_memory_allocated`, which the script also reports on a GPU), without the
kernels' own workspaces (cuDNN, cuBLAS), which no operation returns. The CPU's resident set is
no measure of it: the allocator keeps freed memory and reuses it, so the process grows by less
than the forward holds. The autocast weight cache (bfloat16 copies of the weights, kept while
the autocast region lasts) is in the fixed part.

Usage::

    python benchmarks/forward_memory.py                        # vit_base_patch16_224, CPU
    python benchmarks/forward_memory.py --batches 1,2,4 --write
    python benchmarks/forward_memory.py --device cuda --batches 64,128,256 --write
"""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Iterable

import timm
import torch
from common.machine import describe_machine, replace_section
from common.measure import sync
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from randfeat.eval.forward import Forward, ForwardOptions

MiB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Inside the mode: the bytes of the storages created by operations, live now and at peak."""

    def __init__(self, held: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.held = {t.untyped_storage().data_ptr() for t in held}
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.current -= self.size.pop(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.held or storage.nbytes() == 0:
                continue
            if ptr in self.refs:  # a view, or an in-place result: no new memory
                self.refs[ptr] += 1
            else:
                self.refs[ptr] = 1
                self.size[ptr] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, ptr)
        return out


def peak_of_forward(
    f: Forward, model: torch.nn.Module, x: torch.Tensor, device: torch.device
) -> tuple[float, float]:
    """Bytes the forward of `x` held at its peak: traced tensors, and (GPU) the allocator's."""
    held = [*model.parameters(), *model.buffers(), x]
    allocator = float("nan")
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            f(x)
        sync(device)
        allocator = float(torch.cuda.max_memory_allocated(device) - before)
    mode = LiveTensorBytes(held)
    with torch.no_grad(), mode:
        out = f(x)
    del out
    return float(mode.peak), allocator


def fit(batches: list[int], peaks: list[float]) -> tuple[float, float]:
    """Least-squares `peak = a + b · batch`: `(a, b)` in bytes."""
    n = len(batches)
    mx, my = sum(batches) / n, sum(peaks) / n
    sxx = sum((b - mx) ** 2 for b in batches)
    b = sum((bx - mx) * (p - my) for bx, p in zip(batches, peaks, strict=True)) / sxx
    return my - b * mx, b


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", default="1,2,4", help="comma list of batch sizes")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--extrapolate", type=int, default=1024, help="the --forward-batch to project")
    p.add_argument("--device", default="cpu")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    params = sum(t.numel() * t.element_size() for t in model.parameters())
    batches = [int(b) for b in args.batches.split(",")]
    gpu = device.type == "cuda"
    lines = [
        f"Machine: {describe_machine(device)}.",
        "",
        f"`{args.model}` at {args.image_size}×{args.image_size}, `torch.no_grad`: the peak of the "
        "tensors the forward's operations hold at once (traced; the weights and the input apart)"
        + (", and `max_memory_allocated` above the memory allocated before" if gpu else "")
        + f". Weights: {params / MiB:,.0f} MiB (float32). Fit: least squares "
        "`peak = fixed + per image × batch`.",
        "",
        f"| dtype | {' | '.join(f'batch {b} (MiB)' for b in batches)} | per image (MiB) | "
        f"fixed (MiB) | projected at {args.extrapolate}, activations (GiB) | with the weights "
        "(GiB) |",
        "|---|" + "---|" * (len(batches) + 4),
    ]
    for dtype in args.dtypes.split(","):
        f = Forward(model, ForwardOptions(dtype=dtype), device)
        peaks, allocs = [], []
        for b in batches:
            x = torch.rand(b, 3, args.image_size, args.image_size, device=device)
            traced, alloc = peak_of_forward(f, model, x, device)
            peaks.append(traced)
            allocs.append(alloc)
            print(f"{dtype} batch {b}: {traced / MiB:,.1f} MiB traced", flush=True)
        a, slope = fit(batches, peaks)
        proj = a + slope * args.extrapolate
        cells = " | ".join(
            f"{pk / MiB:,.1f}" + (f" (allocator {al / MiB:,.1f})" if gpu else "")
            for pk, al in zip(peaks, allocs, strict=True)
        )
        lines.append(
            f"| {dtype} | {cells} | {slope / MiB:.2f} | {a / MiB:,.0f} | {proj / 2**30:.2f} | "
            f"{(proj + params) / 2**30:.2f} |"
        )
    body = "\n".join(lines)
    print(body)
    if args.write:
        replace_section(
            f"Forward memory, {args.model} {args.image_size}×{args.image_size}", body, device
        )


if __name__ == "__main__":
    main()
