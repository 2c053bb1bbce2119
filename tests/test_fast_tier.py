"""The fast tier: `tests/conftest.py` marks `slow` every test that uses a slow fixture, starts a
process or trains a model, `--fast` leaves them out, and its summary names the tests that belong in
the slow tier.

Each test runs a tiny suite under `tests/conftest.py` itself (copied by `pytester`), in process:
only collection for the marks, a few trivial tests for the summary.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
CONFTEST_TEXT = CONFTEST.read_text(encoding="utf-8")
PYPROJECT = (CONFTEST.parent.parent / "pyproject.toml").read_text(encoding="utf-8")
# the inner runs load only what they test: no plugin that costs a second, no assertion rewriting
OPTIONS = ["-pno:randomly", "-pno:xdist", "-pno:cacheprovider", "-pno:hypothesispytest"]
OPTIONS += ["-pno:anyio", "--assert=plain"]

# Each test says in its name whether the hook must mark it slow.
SUITE = """
import importlib
import subprocess as sp
from subprocess import run as sh

import pytest

from randfeat.eval.models import training
from randfeat.eval.models.training import TrainConfig
from randfeat.eval.models.training import train as fit


@pytest.fixture
def child():
    proc = sp.Popen(["true"])
    yield proc
    proc.wait()


@pytest.fixture
def through_fashion(fashion_model):
    return fashion_model


def _helper():
    return _deeper()


def _deeper():
    return sh(["true"])


class _Server:
    def start(self):
        return sp.Popen(["true"])


def test_fast_plain():
    assert 1 + 1 == 2


def test_fast_uses_an_attribute_named_subprocess():
    class Options:
        subprocess = False

    assert not Options().subprocess


def test_fast_imports_a_module_by_name_at_run_time():
    assert importlib.import_module("json")


def test_fast_uses_digits(digits):
    assert digits


def test_fast_uses_another_name_of_the_training_module():
    assert TrainConfig and training.augment


def test_slow_trains():
    assert callable(fit)


def test_slow_trains_through_the_module():
    assert callable(training.train)


def test_slow_process_fixture(child):
    pass


def test_slow_subprocess_module():
    sp.run(["true"])


def test_slow_imported_function():
    sh(["true"])


def test_slow_helper_of_a_helper():
    _helper()


def test_slow_method_of_a_test_class():
    _Server().start()


def test_slow_lambda():
    assert callable(lambda: sp.run(["true"]))


def test_slow_fixture_through_a_fixture(through_fashion):
    pass


@pytest.mark.slow
def test_slow_by_hand():
    pass
"""


@pytest.fixture
def conftest(pytestconfig: pytest.Config) -> ModuleType:
    """This session's `tests/conftest.py`, as pytest loaded it."""
    [module] = [
        plugin
        for plugin in pytestconfig.pluginmanager.get_plugins()
        if getattr(plugin, "__file__", None) == str(CONFTEST)
    ]
    assert isinstance(module, ModuleType)
    return module


@pytest.fixture
def suite(pytester: pytest.Pytester, conftest: ModuleType) -> pytest.Pytester:
    """A directory with `tests/conftest.py`, the project's markers, `SUITE` and, for each fixture of
    `SLOW_FIXTURES`, a test `test_slow_fixture_<name>` that uses it."""
    _project_markers(pytester)
    pytester.makeconftest(CONFTEST_TEXT)
    per_fixture = "".join(
        f"\n\ndef test_slow_fixture_{name}({name}):\n    pass\n" for name in conftest.SLOW_FIXTURES
    )
    pytester.makepyfile(test_tier_sample_marks=SUITE + per_fixture)  # a basename no test has
    return pytester


def _project_markers(pytester: pytest.Pytester) -> None:
    """Register the markers of pyproject.toml in the tiny suite, `slow` among them."""
    block = re.search(r"^markers = \[\n(.*?)^\]", PYPROJECT, re.M | re.S)
    assert block is not None, "pyproject.toml: no `markers = [` block in [tool.pytest.ini_options]"
    lines = re.findall(r'^\s*"(.*)",?$', block.group(1), re.M)
    assert any(line.startswith("slow:") for line in lines), lines
    pytester.makeini("[pytest]\nmarkers =" + "".join(f"\n    {line}" for line in lines) + "\n")


def _marks(pytester: pytest.Pytester, *args: str) -> dict[str, str | None]:
    """Test name -> the reason of its `slow` mark ("by hand" without one), or `None` when fast."""
    recorder = pytester.inline_run(*OPTIONS, "--collect-only", *args)
    [finish] = recorder.getcalls("pytest_collection_finish")
    marks: dict[str, str | None] = {}
    for item in finish.session.items:  # the items selected to run
        mark = item.get_closest_marker("slow")
        marks[item.name] = None if mark is None else str(mark.kwargs.get("reason") or "by hand")
    return marks


def test_the_hook_marks_slow_fixtures_and_processes_and_nothing_else(
    suite: pytest.Pytester, conftest: ModuleType
) -> None:
    marks = _marks(suite)
    assert len(marks) == 15 + len(conftest.SLOW_FIXTURES)
    wrong = {
        name: why for name, why in marks.items() if name.startswith("test_fast") != (why is None)
    }
    assert wrong == {}
    assert marks["test_slow_by_hand"] == "by hand"
    assert conftest.SLOW_FIXTURES  # else the loop below proves nothing
    for name, why in conftest.SLOW_FIXTURES.items():
        assert marks[f"test_slow_fixture_{name}"] == why
    assert marks["test_slow_fixture_through_a_fixture"] == marks["test_slow_fixture_fashion_model"]
    assert marks["test_slow_process_fixture"] == "starts a process (`sp` in `child`)"
    assert marks["test_slow_helper_of_a_helper"] == "starts a process (`sh` in `_deeper`)"
    assert marks["test_slow_trains"] == "trains a model (`fit` in `test_slow_trains`)"


def test_fast_deselects_exactly_the_slow_tests(suite: pytest.Pytester) -> None:
    everything = _marks(suite)
    fast = _marks(suite, "--fast")
    assert sorted(fast) == sorted(name for name, why in everything.items() if why is None)
    assert sorted(fast) == [name for name in sorted(everything) if name.startswith("test_fast")]
    # `-m` sees the marks too: the hook runs before pytest deselects by marker
    assert sorted(_marks(suite, "-m", "not slow")) == sorted(fast)


def test_the_summary_names_processes_and_cpu_hungry_tests(
    pytester: pytest.Pytester, conftest: ModuleType
) -> None:
    threshold = f"FAST_TIER_CPU_SECONDS = {conftest.FAST_TIER_CPU_SECONDS!r}\n"
    assert threshold in CONFTEST_TEXT  # the copy below gets a threshold that `test_busy` passes
    _project_markers(pytester)
    pytester.makeconftest(CONFTEST_TEXT.replace(threshold, "FAST_TIER_CPU_SECONDS = 0.05\n"))
    pytester.makepyfile(
        test_tier_sample_summary="""
        import importlib
        import sys
        import time


        def test_starts_python_out_of_sight():  # nothing under tests/ names `subprocess`
            run = importlib.import_module("subprocess").run
            run([sys.executable, "-S", "-c", "pass"], check=True)


        def test_starts_a_quick_tool():
            importlib.import_module("subprocess").run(["true"], check=True)


        def test_busy():
            end = time.process_time() + 0.2
            while time.process_time() < end:
                pass


        def test_idle():
            pass
        """
    )
    result = pytester.runpytest_inprocess(*OPTIONS, "--fast")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            "fast tier: 4 tests; * sum to * s; their calls used * CPU s",
            "*fast tier: tests that belong in the slow tier*",
            "test_tier_sample_summary.py::test_busy: its call used 0.* CPU s",
            "test_tier_sample_summary.py::test_starts_python_out_of_sight: started a process: *python* -S -c pass",
        ]
    )
    assert "test_idle" not in result.stdout.str()
    assert "test_starts_a_quick_tool" not in result.stdout.str()


def test_without_fast_there_is_no_summary_and_nothing_is_left_out(
    suite: pytest.Pytester, conftest: ModuleType
) -> None:
    result = suite.runpytest_inprocess(*OPTIONS, "--collect-only", "-q")
    assert f"{15 + len(conftest.SLOW_FIXTURES)} tests collected" in result.stdout.str()
    assert "fast tier" not in result.stdout.str()
