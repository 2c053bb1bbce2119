"""Serving throughput and latency: `randfeat serve` with and without micro-batching.

For each model (the digits CNN, a timm resnet18 at 32×32 with 10 classes), defended with feature
noise on its penultimate layer, a server runs in its own process on 127.0.0.1 (one worker,
`--threads` torch threads) and a load generator sends single-image `.npy` requests from 1, 16 and
64 concurrent connections, a bounded number of requests per level (`--requests`; killed after
`--seconds`). The load generator is `hey` (Go; `apt-get install hey`) when it is installed, else
asyncio + httpx in this process (`--client`). Reported: requests/s, p50 and p99 latency, the ratio
to the model's offline batched throughput (images/s of one in-process forward of `--max-batch`
images, same threads), and where the CPU went: the client's and the server's CPU time per request,
the server's busiest thread (the inference thread for resnet18), and the machine's idle and
stolen (hypervisor) share of its core-seconds. Two server settings: micro-batching on
(`--max-batch`, `--max-wait-ms`) and off (`max_batch=1`: one forward per request).

Targets (issue 13): with micro-batching, ≥ 2× the unbatched throughput at 16 clients, and ≥ 50% of
the offline batched throughput for resnet18.

`--detect [NAME]` (issue 22) measures instead what query detection costs: the micro-batched server
without a detector and with one (`NAME`, default the library's default detector; memory store,
its default threshold, `on_detect="log"`), in turns (`--repeats`), at each `--clients` level, and
the ratio of their median requests/s (target: ≥ 0.80 for the digits CNN at 64 clients with `hey`).
`hey` sends one body over and over, so from the second request on every query is an exact repeat:
every one is flagged (and answered: `log`), and every lookup meets full posting lists, the
detector's most expensive case.

Usage:

    python benchmarks/serve.py                       # both models, 1000 requests per level
    python benchmarks/serve.py --requests 100 --models digits-cnn    # a quick check
    python benchmarks/serve.py --write               # replace "Serving" in docs/benchmarks.md
    python benchmarks/serve.py --detect --models digits-cnn --clients 64 --repeats 3

The client and the server share the machine, so the client's own CPU time is part of what is
measured: about 0.3 ms per request for `hey`, 3-7 ms for asyncio + httpx (which is why httpx made
throughput fall at 64 clients). The table says which client ran.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from common.machine import describe_machine, replace_section
from torch import nn

import randfeat
from randfeat.detect import DEFAULT
from randfeat.serve.protocol import NPY, encode_npy

MODELS = ("digits-cnn", "resnet18")
CLIENTS = (1, 16, 64)
NU = 0.1  # a feature-noise variance: its value does not change the cost


def build(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """The defended model and its input shape `(C, H, W)`."""
    torch.manual_seed(0)
    model: nn.Module
    if name == "digits-cnn":
        from randfeat.eval.models import digits_cnn

        model, shape = digits_cnn(), (1, 8, 8)
    else:
        import timm

        model, shape = timm.create_model(name, pretrained=False, num_classes=10), (3, 32, 32)
    return randfeat.wrap(model.eval(), ["penultimate"], nu=NU), shape


def serve_child(args: argparse.Namespace) -> None:
    """The server process: one worker, `args.threads` torch threads, until SIGTERM."""
    from randfeat.serve.config import ModelCard, ServeOptions
    from randfeat.serve.run import run_server

    torch.set_num_threads(args.threads)
    model, shape = build(args.model)
    card = ModelCard(args.model, shape, 10, True, "feature")
    detector = None
    detect = None
    if args.detect_child:
        from randfeat.detect import DETECTORS
        from randfeat.serve.config import DetectOptions

        detector = DETECTORS[args.detect_child](shape=shape)
        detect = DetectOptions("log")
    opts = ServeOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, detect=detect)
    run_server(model, card, opts, port=args.port, log_level="warning", detector=detector)


def offline_throughput(name: str, batch: int, threads: int, seconds: float = 3.0) -> float:
    """Images/s of in-process forwards of `batch` images (the ceiling for a batched server)."""
    torch.set_num_threads(threads)
    model, shape = build(name)
    x = torch.rand(batch, *shape)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += 1
    return n * batch / (time.perf_counter() - t0)


@dataclass(frozen=True)
class CPU:
    """CPU seconds used so far by this process and its finished children (the `hey` client), by
    each thread of the server process, and the machine's stolen and idle core-seconds, read from
    /proc (Linux; zeros elsewhere)."""

    client: float
    threads: dict[int, float]
    steal: float
    idle: float

    @staticmethod
    def now(server_pid: int) -> CPU:
        tick = os.sysconf("SC_CLK_TCK")
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        try:
            tasks = Path(f"/proc/{server_pid}/task")
            threads = {int(t.name): _ticks(t / "stat") / tick for t in tasks.iterdir()}
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            idle, steal = int(fields[3]) / tick, int(fields[7]) / tick
        except (OSError, IndexError, ValueError):
            return CPU(client, {}, 0.0, 0.0)
        return CPU(client, threads, steal, idle)

    def since(self, before: CPU) -> tuple[float, float]:
        """Server CPU seconds since `before`: all threads, and its busiest thread."""
        deltas = [t - before.threads.get(tid, 0.0) for tid, t in self.threads.items()]
        return sum(deltas), max(deltas, default=0.0)


def _ticks(stat: Path) -> int:
    """utime + stime of a /proc stat file (fields 14 and 15, after the command's parentheses)."""
    rest = stat.read_text().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


@dataclass(frozen=True)
class Load:
    client: str
    clients: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    client_ms: float  # client CPU per request
    server_ms: float  # server CPU per request (all threads)
    busiest_ms: float  # the server's busiest thread per request
    steal: float  # fraction of the machine's core-seconds stolen by the hypervisor
    idle: float  # fraction of the machine's core-seconds idle

    @staticmethod
    def of(
        client: str, clients: int, seconds: list[float], elapsed: float, c0: CPU, c1: CPU
    ) -> Load:
        ms, n = sorted(1000 * t for t in seconds), len(seconds)
        cores = (os.cpu_count() or 1) * elapsed
        server, busiest = c1.since(c0)
        return Load(
            client,
            clients,
            n,
            n / elapsed,
            statistics.median(ms),
            ms[min(n - 1, int(0.99 * n))],
            1000 * (c1.client - c0.client) / n,
            1000 * server / n,
            1000 * busiest / n,
            (c1.steal - c0.steal) / cores,
            (c1.idle - c0.idle) / cores,
        )


async def _httpx_load(
    url: str, body: bytes, clients: int, requests: int, seconds: float, server_pid: int
) -> Load:
    """`clients` concurrent connections of one asyncio + httpx client, `requests` in all."""
    headers = {"Content-Type": NPY, "Accept": NPY}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one_client(n: int, deadline: float, record: bool) -> None:
            for _ in range(n):
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                r = await client.post("/v1/predict", content=body, headers=headers)
                r.raise_for_status()
                if record:
                    latencies.append(time.perf_counter() - t0)

        warm = time.perf_counter() + seconds
        await asyncio.gather(*(one_client(3, warm, False) for _ in range(clients)))
        per_client = max(1, requests // clients)
        c0, t0 = CPU.now(server_pid), time.perf_counter()
        await asyncio.gather(*(one_client(per_client, t0 + seconds, True) for _ in range(clients)))
        elapsed, c1 = time.perf_counter() - t0, CPU.now(server_pid)
    return Load.of("httpx", clients, latencies, elapsed, c0, c1)


def _hey(url: str, body: Path, clients: int, requests: int, seconds: float) -> list[list[str]]:
    """One run of `hey` (a load generator written in Go): its per-request CSV rows."""
    cmd = ["hey", "-n", str(requests), "-c", str(clients), "-m", "POST", "-T", NPY, "-A", NPY]
    cmd += ["-D", str(body), "-t", "120", "-o", "csv", url + "/v1/predict"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds, check=True).stdout
    rows = [line.split(",") for line in out.splitlines()[1:] if line.strip()]
    bad = [r for r in rows if r[6] != "200"]
    if bad or not rows:
        raise RuntimeError(f"hey: {len(bad)} of {len(rows)} requests failed: {bad[:3]}")
    return rows


def _hey_load(
    url: str, body: Path, clients: int, requests: int, seconds: float, server_pid: int
) -> Load:
    """`clients` concurrent connections of `hey`, `requests` in all, killed after `seconds`."""
    _hey(url, body, clients, 3 * clients, seconds)  # warm-up: connections, allocator
    c0 = CPU.now(server_pid)
    rows = _hey(url, body, clients, max(requests, clients), seconds)
    c1 = CPU.now(server_pid)
    # columns: response-time, DNS+dialup, DNS, request-write, response-delay, response-read,
    # status-code, offset (seconds since the run started, when the request was sent)
    elapsed = max(float(r[7]) + float(r[0]) for r in rows)
    return Load.of("hey", clients, [float(r[0]) for r in rows], elapsed, c0, c1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_server(
    name: str,
    args: argparse.Namespace,
    max_batch: int,
    shape: tuple[int, int, int],
    detector: str | None = None,
) -> list[Load]:
    port = _free_port()
    cmd = [sys.executable, __file__, "--serve-child", "--model", name, "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    cmd += ["--threads", str(args.threads)]
    cmd += ["--detect-child", detector] if detector else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(url + "/healthz", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server for {name} did not start") from None
                time.sleep(0.2)
        body = encode_npy(np.random.default_rng(0).random((1, *shape), dtype=np.float32))
        if args.client == "httpx":
            return [
                asyncio.run(_httpx_load(url, body, c, args.requests, args.seconds, proc.pid))
                for c in args.clients
            ]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "image.npy"
            path.write_bytes(body)
            return [
                _hey_load(url, path, c, args.requests, args.seconds, proc.pid) for c in args.clients
            ]
    finally:
        proc.terminate()
        proc.wait(60)


def detection_cost(args: argparse.Namespace) -> None:
    """Requests/s of the micro-batched server without and with a query detector, in turns."""
    rows = [
        "| model | detector | client | clients | run | requests | req/s | p50 ms | p99 ms "
        "| server CPU ms/req | busiest thread ms/req | idle | stolen |"
    ]
    rows.append(
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    notes = []
    for name in args.models:
        _, shape = build(name)
        rps: dict[tuple[str, int], list[float]] = {}
        for run in range(1, args.repeats + 1):
            for label, det in (("none", None), (args.detect, args.detect)):
                for r in measure_server(name, args, args.max_batch, shape, det):
                    rps.setdefault((label, r.clients), []).append(r.rps)
                    rows.append(
                        f"| {name} | {label} | {r.client} | {r.clients} | {run} | {r.requests} | "
                        f"{r.rps:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.server_ms:.2f} | "
                        f"{r.busiest_ms:.2f} | {r.idle:.0%} | {r.steal:.0%} |"
                    )
                    print(rows[-1], flush=True)
        for c in args.clients:
            off = statistics.median(rps[("none", c)])
            on = statistics.median(rps[(args.detect, c)])
            notes.append(
                f"- {name}, {c} clients: median {off:.0f} req/s without detection, {on:.0f} with "
                f"`{args.detect}`: **{on / off:.2f}×** (target ≥ 0.80; runs: "
                f"{', '.join(f'{v:.0f}' for v in rps[('none', c)])} without, "
                f"{', '.join(f'{v:.0f}' for v in rps[(args.detect, c)])} with)."
            )
    cmd = " ".join(["python benchmarks/serve.py", *sys.argv[1:]]).replace(" --write", "")
    body = "\n".join(
        [
            f"Machine: {describe_machine()}; server: 1 worker, {args.threads} torch thread(s), "
            f"micro-batching `max_batch={args.max_batch}`, `max_wait_ms={args.max_wait_ms:g}`; "
            "single-image `.npy` requests on 127.0.0.1, client and server on the same machine. "
            f'Detector: `{args.detect}` (memory store, default threshold, `on_detect="log"`); '
            "one image sent over and over, so every query after the first is flagged (the "
            "index's most expensive case). Runs alternate without and with detection.",
            "",
            *rows,
            "",
            *notes,
            "",
            f"Command: `{cmd}`.",
        ]
    )
    print("\n" + body)
    if args.write:
        replace_section("Serving with query detection", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS))
    p.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    p.add_argument("--seconds", type=float, default=60.0, help="time cap per concurrency level")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument(
        "--client",
        choices=("hey", "httpx"),
        default="hey" if shutil.which("hey") else "httpx",
        help="load generator: hey (Go; apt-get install hey), or asyncio + httpx in this process",
    )
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.add_argument(
        "--detect",
        nargs="?",
        const=DEFAULT,
        metavar="NAME",
        help=f"measure the cost of query detection instead (default detector: {DEFAULT})",
    )
    p.add_argument("--repeats", type=int, default=3, help="with --detect: runs of each server")
    p.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--detect-child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_child:
        serve_child(args)
        return
    if args.detect:
        detection_cost(args)
        return

    rows = [
        "| model | server | client | clients | requests | req/s | p50 ms | p99 ms | ÷ offline "
        "| ÷ offline at batch = clients | client CPU ms/req | server CPU ms/req "
        "| busiest thread ms/req | idle | stolen |"
    ]
    rows.append("| --- | --- | --- |" + " ---: |" * 12)
    notes = []
    for name in args.models:
        _, shape = build(name)
        sizes = sorted({min(c, args.max_batch) for c in args.clients} | {args.max_batch})
        offline = {b: offline_throughput(name, b, args.threads) for b in sizes}
        full = offline[args.max_batch]
        results = {}
        for label, max_batch in (("micro-batched", args.max_batch), ("unbatched", 1)):
            results[label] = measure_server(name, args, max_batch, shape)
            for r in results[label]:
                at = offline[min(r.clients, args.max_batch)]
                rows.append(
                    f"| {name} | {label} | {r.client} | {r.clients} | {r.requests} | {r.rps:.0f} | "
                    f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.rps / full:.2f} | {r.rps / at:.2f} | "
                    f"{r.client_ms:.2f} | {r.server_ms:.2f} | {r.busiest_ms:.2f} | "
                    f"{r.idle:.0%} | {r.steal:.0%} |"
                )
                print(rows[-1], flush=True)
        by = {lab: {r.clients: r for r in rs} for lab, rs in results.items()}
        sizes_text = ", ".join(f"{offline[b]:.0f} at batch {b}" for b in sizes)
        line = f"- {name}: offline throughput (images/s) {sizes_text}"
        if 16 in args.clients:
            mb, ub = by["micro-batched"][16].rps, by["unbatched"][16].rps
            line += f"; at 16 clients micro-batching gives {mb / ub:.2f}× the unbatched req/s"
        for c in args.clients:
            r = by["micro-batched"][c]
            line += (
                f"; micro-batched at {c} client(s): {r.rps / full:.0%} of the offline throughput "
                f"at batch {args.max_batch} ({r.rps / offline[min(c, args.max_batch)]:.0%} of "
                f"it at batch {min(c, args.max_batch)}), the busiest server thread "
                f"{r.busiest_ms * r.rps / 1000:.0%} busy"
            )
        notes.append(line + ".")
    cmd = " ".join(["python benchmarks/serve.py", *sys.argv[1:]]).replace(" --write", "")
    body = "\n".join(
        [
            f"Machine: {describe_machine()}; server: 1 worker, {args.threads} torch thread(s); "
            f"micro-batching `max_batch={args.max_batch}`, `max_wait_ms={args.max_wait_ms:g}`. "
            "Single-image `.npy` requests on 127.0.0.1, client and server on the same machine. "
            "`÷ offline`: requests/s over the images/s of in-process forwards of a full batch; "
            "`÷ offline at batch = clients`: over those of batches of as many images as there are "
            "clients (at most `max_batch`), the most a server can merge when each client has one "
            "request in flight. CPU columns: per request, from /proc; idle and stolen: the "
            "machine's share of its core-seconds.",
            "",
            *rows,
            "",
            *notes,
            "",
            f"Command: `{cmd}`.",
        ]
    )
    print("\n" + body)
    if args.write:
        replace_section("Serving", body)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
