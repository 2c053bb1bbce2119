"""Shared fixtures: the embedded digits data set and a trained digits CNN (once per session).

The CNN is trained into a cache directory under pytest's ``tmp_path_factory`` so the tests never
read or write the user's cache (``$RANDFEAT_CACHE`` / ``~/.cache/randfeat``); training takes a few
seconds on one CPU core and happens once per session (once per worker under pytest-xdist).

It also sorts the suite into two tiers. `pytest --fast` (`scripts/test.sh --fast`, `make
test-fast`) runs the fast tier: every test not marked `slow`. `pytest_collection_modifyitems`
marks `slow`, so that nobody has to remember it, every test that

- uses a fixture of `SLOW_FIXTURES` (directly or through another fixture), or
- reaches a name of `SLOW_CALLS` (its code, the code of the fixtures it uses, or of a helper under
  `tests/` that they call, names it): `subprocess` (a server process, `torchrun`, the docs build,
  Chromium, a script) or the training loop;

and `pytest --fast` ends with the tests that belong in the slow tier all the same, to be marked by
hand: those whose call used more than `FAST_TIER_CPU_SECONDS` of CPU time (CPU time, not wall time,
so that other work on a shared machine hardly changes it) or that started a slow process through a
library. Without `--fast` the whole suite runs, as `.ci/run` does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import subprocess
import sys
import types
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from randfeat.eval import models as rf_models
from randfeat.eval.data import loaders as rf_data

pytest_plugins = ("pytester",)  # tests/test_fast_tier.py runs tiny suites under this file


@pytest.fixture(scope="session")
def digits_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-private cache directory holding the trained digits CNN."""
    return tmp_path_factory.mktemp("randfeat_cache")


@pytest.fixture(scope="session")
def digits() -> rf_data.Digits:
    """The fixed digits split: ``x_*: [N, 1, 8, 8]`` float32 in [0, 1], ``y_*: [N]`` int64.

    Session-scoped and shared: tests must not modify the tensors in place.
    """
    return rf_data.digits()


@pytest.fixture(scope="session")
def digits_model(digits_cache_dir: Path) -> rf_models.DigitsCNN:
    """The trained digits CNN (eval mode, >= 97% test accuracy, classifier ``head``).

    Session-scoped and shared: tests must not modify its parameters (wrap it, don't train it).
    """
    return rf_models.digits_cnn(cache_dir=digits_cache_dir)


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Start real uvicorn servers on free 127.0.0.1 ports; all are stopped at teardown.

    `serve(model, card=None, **options) -> base URL`: `card` defaults to the digits CNN's
    (`(1, 8, 8)`, 10 classes, defended iff `model` is a wrapper); `options` are
    [ServeOptions][randfeat.serve.config.ServeOptions] fields.
    """
    from randfeat import RandomizedFeatureWrapper
    from randfeat.serve.app import create_app
    from randfeat.serve.config import ModelCard, ServeOptions
    from randfeat.serve.run import serve_in_thread

    with contextlib.ExitStack() as stack:

        def start(model: Callable[..., Any], card: ModelCard | None = None, **options: Any) -> str:
            if card is None:
                defended = isinstance(model, RandomizedFeatureWrapper)
                card = ModelCard(
                    "digits-cnn",
                    (1, 8, 8),
                    10,
                    defended=defended,
                    defense="feature" if defended else "base",
                )
            app = create_app(model, card, ServeOptions(**options))
            return stack.enter_context(serve_in_thread(app))

        yield start


@pytest.fixture(scope="session")
def fashion_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory shared by all pytest-xdist workers of a run.

    Under xdist each worker has its own base temporary directory; their parent is the run's. The
    Fashion-MNIST CNN is trained into this shared directory once: the cache's lock makes the other
    workers wait for its file instead of training again.
    """
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "randfeat_fashion_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def fashion_model(fashion_cache_dir: Path) -> rf_models.FashionCNN:
    """The real fashion-cnn, trained once per test run into `fashion_cache_dir`.

    Only for tests marked to need the real Fashion-MNIST files (Debian's `dataset-fashion-mnist`).
    """
    return rf_models.fashion_cnn(root=rf_data.FASHION_MNIST_DEBIAN_DIR, cache_dir=fashion_cache_dir)


# ------------------------------------------------------------------------------------------------
# The fast tier

TESTS = Path(__file__).resolve().parent
SLOW_FIXTURES: dict[str, str] = {
    "fashion_model": "trains the Fashion-MNIST CNN on 60,000 images (fixture `fashion_model`)",
}
"""Fixtures that put every test using them, directly or through another fixture, in the slow tier."""
SLOW_CALLS: dict[str, str] = {
    "subprocess": "starts a process",
    "randfeat.eval.models.training.train": "trains a model",
}
"""Modules (any of their names) and functions that put a test reaching them in the slow tier."""
SLOW_PROGRAMS = re.compile(r"python|torchrun|node|npm|chrom|mkdocs|jupyter|uvicorn")
"""Programs whose start makes a test slow (by the name of the file run): they import torch, build the
docs or run a browser. Quick tools (`fc-list`, `openssl`) that libraries start are left out."""
FAST_TIER_CPU_SECONDS = 1.0
"""`pytest --fast` lists the tests whose call used more CPU time than this: mark them `slow`."""
_PROCESS = "fast_tier_process"  # user property: a slow process that a fast-tier test started
_CPU = "fast_tier_cpu_s"  # user property: the CPU seconds of a fast-tier test's call


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast",
        action="store_true",
        help="run the fast tier: leave out the tests marked slow (by hand, or by tests/conftest.py "
        "for the fixtures they use and the processes they start)",
    )


def slow_reason(fixturenames: Iterable[str], functions: Iterable[Callable[..., Any]]) -> str | None:
    """Why a test belongs in the slow tier, or `None` when nothing in it is known to be slow.

    Args:
        fixturenames: every fixture the test uses, directly or through other fixtures.
        functions: the test function and its fixtures' functions; only those defined under
            `tests/` are read, and so are the helpers under `tests/` that they call.

    Returns:
        The first reason found: a fixture of `SLOW_FIXTURES`, or a name of `SLOW_CALLS` that one
        of the functions reaches.
    """
    for name in fixturenames:
        if name in SLOW_FIXTURES:
            return SLOW_FIXTURES[name]
    seen: set[object] = set()
    for func in functions:
        found = _slow_call(func, seen)
        if found is not None:
            return found
    return None


def _slow_call(obj: object, seen: set[object]) -> str | None:
    """The first name of `SLOW_CALLS` that `obj` reaches, as "why (`name` in `function`)", or `None`.

    `obj` is a function or a class defined under `tests/`: its code (nested functions, lambdas and
    comprehensions included) is read for global names; a global that is, or whose attribute named in
    the code is, a module or function of `SLOW_CALLS` is the answer; a function or class under
    `tests/` is read in turn. Other code (libraries, scripts/) is not read: the processes it starts
    are seen at run time (the summary of `--fast`).
    """
    obj = getattr(obj, "__func__", obj)  # a bound method, staticmethod or classmethod
    obj = getattr(obj, "fget", obj)  # a property
    if not _under_tests(obj) or obj in seen:  # (what is under tests/ is hashable)
        return None
    seen.add(obj)
    if isinstance(obj, type):
        for member in vars(obj).values():
            found = _slow_call(member, seen)
            if found is not None:
                return found
        return None
    code = getattr(obj, "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    namespace = getattr(obj, "__globals__", {})
    names = set(_global_names(code))
    for name in sorted(names):
        value = namespace.get(name)
        if isinstance(value, types.ModuleType):
            keys = [value.__name__, *(f"{value.__name__}.{attribute}" for attribute in names)]
        else:
            module = getattr(value, "__module__", None)
            keys = [str(module), f"{module}.{getattr(value, '__qualname__', '')}"]
        for key in keys:
            if key in SLOW_CALLS:
                return f"{SLOW_CALLS[key]} (`{name}` in `{code.co_name}`)"
        if isinstance(value, (type, types.FunctionType)):
            found = _slow_call(value, seen)
            if found is not None:
                return found
    return None


def _under_tests(obj: object) -> bool:
    """Whether the function or class `obj` is defined in a file under `tests/`."""
    code = getattr(obj, "__code__", None)
    if isinstance(code, types.CodeType):
        return _file_under_tests(code.co_filename)
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    file = getattr(module, "__file__", None)
    return isinstance(obj, type) and isinstance(file, str) and _file_under_tests(file)


@functools.cache
def _file_under_tests(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(TESTS)


def _global_names(code: types.CodeType) -> Iterator[str]:
    """The names `code` and the code nested in it look up (globals and attributes alike)."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _test_functions(item: pytest.Item) -> list[Callable[..., Any]]:
    """The test function of `item` and the functions of the fixtures it uses."""
    functions = [item.obj] if isinstance(item, pytest.Function) else []
    info = getattr(item, "_fixtureinfo", None)
    for fixturedefs in getattr(info, "name2fixturedefs", {}).values():
        functions += [fixturedef.func for fixturedef in fixturedefs]
    return functions


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the slow tests `slow` (with the reason); under `--fast`, deselect every `slow` test."""
    for item in items:
        if item.get_closest_marker("slow") is None:
            reason = slow_reason(getattr(item, "fixturenames", ()), _test_functions(item))
            if reason is not None:
                item.add_marker(pytest.mark.slow(reason=reason))
    if config.getoption("fast"):
        slow = [item for item in items if item.get_closest_marker("slow") is not None]
        if slow:
            items[:] = [item for item in items if item.get_closest_marker("slow") is None]
            config.hook.pytest_deselected(items=slow)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that were waited for (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Under `--fast`, record the slow processes a test starts (`subprocess.Popen`) for the summary.

    A test that runs pytest inside itself (`pytester`) is left alone: its processes belong to the
    tests of the inner run, which record them.
    """
    if not item.config.getoption("fast") or "pytester" in getattr(item, "fixturenames", ()):
        return (yield)
    popen_init = subprocess.Popen.__init__

    def recording_init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        command = _command(args)
        program = os.path.basename(_command(kwargs.get("executable") or args).split(" ")[0])
        if SLOW_PROGRAMS.match(program):
            item.user_properties.append((_PROCESS, command[:200]))
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = recording_init  # type: ignore[method-assign]
    try:
        return (yield)
    finally:
        subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]


def _command(args: object) -> str:
    """`subprocess.Popen`'s `args` (a string, a path or a sequence of them) as one line."""
    if isinstance(args, (str, bytes, os.PathLike)):
        return os.fsdecode(args)
    try:
        return shlex.join(os.fsdecode(arg) for arg in args)  # type: ignore[attr-defined]
    except TypeError:
        return repr(args)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Under `--fast`, record the CPU seconds of the test's call (its fixtures' set-up excluded)."""
    if not item.config.getoption("fast"):
        return (yield)
    start = _cpu_seconds()
    try:
        return (yield)
    finally:
        item.user_properties.append((_CPU, _cpu_seconds() - start))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Under `--fast`: the sum of the durations, and the tests that belong in the slow tier."""
    if not config.getoption("fast"):
        return
    reports = [
        report
        for reports in terminalreporter.stats.values()
        for report in reports
        if isinstance(report, pytest.TestReport)
    ]
    if not reports:  # --collect-only, or nothing selected
        return
    seconds = sum(report.duration for report in reports)
    cpu: dict[str, float] = {}
    processes: dict[str, str] = {}
    for report in reports:
        for key, value in report.user_properties:
            if key == _CPU and isinstance(value, float):
                cpu[report.nodeid] = value
            elif key == _PROCESS:
                processes.setdefault(report.nodeid, str(value))
    terminalreporter.write_line(
        f"fast tier: {len({report.nodeid for report in reports})} tests; their durations (set-up,"
        f" call, tear-down) sum to {seconds:.1f} s; their calls used {sum(cpu.values()):.1f} CPU s"
    )
    advice = {nodeid: f"started a process: {command}" for nodeid, command in processes.items()}
    for nodeid, used in cpu.items():
        if used > FAST_TIER_CPU_SECONDS:
            advice.setdefault(nodeid, f"its call used {used:.1f} CPU s")
    if advice:
        terminalreporter.section("fast tier: tests that belong in the slow tier")
        for nodeid, why in sorted(advice.items()):
            terminalreporter.write_line(f"{nodeid}: {why}")
        terminalreporter.write_line(
            f"(a slow process, or over {FAST_TIER_CPU_SECONDS:g} CPU s: mark them"
            " @pytest.mark.slow, or give them a fixture of SLOW_FIXTURES in tests/conftest.py)"
        )
