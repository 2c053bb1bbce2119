"""What the benchmark scripts in `benchmarks/` import; nothing here is run on its own.

The runnable scripts stay at `benchmarks/*.py` (run them from the repository root, e.g.
`python benchmarks/throughput.py --help`); Python puts the script's folder on the import path, so
they import this package as `common`.

Shared by several scripts:

- `machine`: describe the machine, replace a section of `docs/benchmarks.md`;
- `measure`: `sync(device)`, the counting model wrapper `Counting`, timers, the profiler, `log`;
- `memory`: the peak memory of a block, glibc malloc tuning.

The halves of the larger scripts, apart from their measuring code:

- `peers`: torchattacks and ART run and judged like our attacks (`attacks_vs_peers.py`);
- `fashion_report`: the statistics, tables, plots and page of `fashion_claims.py`;
- `throughput_report`: the table and the paper-grid projection of `throughput.py`.
"""
