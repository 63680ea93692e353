"""A pytest plugin that writes each test's outcome as a JSON line the moment it is known: ``-p bench.pytest_jsonl``.

``bench/gpu_check.sh`` loads it for its CUDA-test step, so a run cut short keeps every outcome it reached. Lines go
to the file named by ``$EFFNET_TESTS_JSONL`` (appended; nothing is written without it):

- ``{"what": "test", "nodeid", "outcome", "duration_s", "message"}`` per test, ``outcome`` one of ``passed``,
  ``failed``, ``skipped``, ``error`` (setup or teardown failed), ``xfailed``, ``xpassed``; ``message`` is the skip
  reason or the end of the failure report (``null`` for a pass);
- ``{"what": "unmarked_cuda_test", "nodeid", "reason"}`` per collected test that is skipped here for want of CUDA
  (a ``skipif`` whose condition is true and whose reason names CUDA or a GPU) but lacks the ``cuda`` marker, so
  ``-m cuda`` would leave it out on a GPU; looked for before ``-m`` deselects anything;
- at the end one ``{"what": "tests_summary", "passed", "failed", "skipped", "errors", "xfailed", "xpassed",
  "deselected", "total", "unmarked_cuda_tests", "exitstatus", "seconds", "summary"}``, ``summary`` in pytest's
  words (``"1 failed, 40 passed, 2 skipped, 12 deselected in 61.20s"``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import pytest

ENV_VAR = "EFFNET_TESTS_JSONL"
_COUNTS = ("failed", "passed", "skipped", "errors", "xfailed", "xpassed", "deselected")


class _State:
    path: Optional[str] = None
    start = 0.0
    counts: Dict[str, int] = {}
    unmarked = 0


def _write(line: Dict[str, Any]) -> None:
    if _State.path:
        with open(_State.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def _cuda_skip_reason(item: pytest.Item) -> Optional[str]:
    for mark in item.iter_markers("skipif"):
        condition = mark.args[0] if mark.args else mark.kwargs.get("condition")
        reason = str(mark.kwargs.get("reason", ""))
        if isinstance(condition, bool) and condition and any(w in reason.lower() for w in ("cuda", "gpu")):
            return reason
    return None


def _message(report: pytest.TestReport) -> Optional[str]:
    if report.passed:
        return None
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = str(report.longrepr)
    return "\n".join(text.splitlines()[-30:])[-4000:]


def pytest_configure() -> None:
    _State.path = os.environ.get(ENV_VAR) or None
    _State.start = time.time()
    _State.counts = dict.fromkeys(_COUNTS, 0)
    _State.unmarked = 0


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    for item in items:
        reason = _cuda_skip_reason(item)
        if reason is not None and item.get_closest_marker("cuda") is None:
            _State.unmarked += 1
            _write({"what": "unmarked_cuda_test", "nodeid": item.nodeid, "reason": reason})


def pytest_deselected(items: List[pytest.Item]) -> None:
    _State.counts["deselected"] += len(items)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    xfail = hasattr(report, "wasxfail")
    outcome: str
    if report.when == "call":
        outcome = ("xfailed" if report.skipped else "xpassed") if xfail else report.outcome
    elif report.when == "setup" and report.skipped:
        outcome = "xfailed" if xfail else "skipped"
    elif report.failed:  # setup or teardown
        outcome = "error"
    else:
        return
    _State.counts["errors" if outcome == "error" else outcome] += 1
    _write({"what": "test", "nodeid": report.nodeid, "outcome": outcome, "duration_s": round(report.duration, 3),
            "message": _message(report)})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    seconds = time.time() - _State.start
    counts = _State.counts
    words = [f"{counts[k]} {'error' if k == 'errors' and counts[k] == 1 else k}" for k in _COUNTS if counts[k]]
    total = sum(counts[k] for k in _COUNTS if k != "deselected")
    _write({"what": "tests_summary", **counts, "total": total, "unmarked_cuda_tests": _State.unmarked,
            "exitstatus": int(exitstatus), "seconds": round(seconds, 2),
            "summary": f"{', '.join(words) or 'no tests ran'} in {seconds:.2f}s"})
