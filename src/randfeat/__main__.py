"""`python -m randfeat ...`: the command line of [`randfeat.cli`][randfeat.cli] (also under `torchrun -m`)."""

from __future__ import annotations

from randfeat.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
