"""Tests of the build skeleton itself: the shared-data skip->fail switch and the
consistency of the requirement / lock files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import conftest as cf

REPO = cf.REPO_ROOT


# --------------------------------------------------------------------------------------
# The shared-data helper, in process
# --------------------------------------------------------------------------------------

def test_default_shared_dir_is_beside_the_repo(monkeypatch):
    monkeypatch.delenv(cf.SHARED_DIR_ENV, raising=False)
    assert cf.shared_dir() == (REPO.parent / "shared").resolve()


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("", False), ("0", False), ("false", False), ("no", False),
])
def test_require_shared_parsing(monkeypatch, value, expected):
    monkeypatch.setenv(cf.REQUIRE_SHARED_ENV, value)
    assert cf.require_shared() is expected


def test_helper_skips_or_fails_in_process(monkeypatch, tmp_path):
    monkeypatch.setenv(cf.SHARED_DIR_ENV, str(tmp_path / "nowhere"))
    monkeypatch.delenv(cf.REQUIRE_SHARED_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="cifar10-jpg.tar.gz"):
        cf.find_shared_cifar_tarball()
    monkeypatch.setenv(cf.REQUIRE_SHARED_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="EFFNET_REQUIRE_SHARED=1"):
        cf.find_shared_cifar_tarball()


def test_helper_returns_existing_tarball(monkeypatch, tmp_path):
    tarball = tmp_path / "datasets" / "cifar10-jpg.tar.gz"
    tarball.parent.mkdir()
    tarball.write_bytes(b"not really a tarball")
    monkeypatch.setenv(cf.SHARED_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(cf.REQUIRE_SHARED_ENV, "1")
    assert cf.find_shared_cifar_tarball() == tarball.resolve()


# --------------------------------------------------------------------------------------
# The same switch, proven end to end with a real pytest subprocess
# --------------------------------------------------------------------------------------

_PROBE_TEST = textwrap.dedent("""
    import os
    from pathlib import Path

    def test_uses_shared_tarball(shared_cifar_tarball):
        assert shared_cifar_tarball.is_file()
        assert shared_cifar_tarball == Path(os.environ["EXPECTED_TARBALL"]).resolve()
""")


def _run_probe(tmp_path: Path, shared: Path, require: str | None) -> subprocess.CompletedProcess:
    work = tmp_path / "probe"
    work.mkdir(exist_ok=True)
    (work / "test_probe.py").write_text(_PROBE_TEST)
    env = {k: v for k, v in os.environ.items()
           if k not in (cf.REQUIRE_SHARED_ENV, "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env[cf.SHARED_DIR_ENV] = str(shared)
    env["EXPECTED_TARBALL"] = str(shared / cf.CIFAR_TARBALL_RELPATH)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if require is not None:
        env[cf.REQUIRE_SHARED_ENV] = require
    # `-p conftest` loads this repo's tests/conftest.py as a plugin, so the probe test
    # gets exactly the fixture the real suite uses; --rootdir keeps the repo's ini away.
    cmd = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
           "--rootdir", str(work), "-rA", str(work / "test_probe.py")]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)


def _summary(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


@pytest.mark.slow
def test_subprocess_missing_tarball_skips_by_default(tmp_path):
    proc = _run_probe(tmp_path, tmp_path / "empty-shared", require=None)
    assert proc.returncode == 0, _summary(proc)
    assert re.search(r"\b1 skipped\b", proc.stdout), _summary(proc)
    assert "shared data set missing" in proc.stdout, _summary(proc)


@pytest.mark.slow
def test_subprocess_missing_tarball_fails_when_required(tmp_path):
    proc = _run_probe(tmp_path, tmp_path / "empty-shared", require="1")
    assert proc.returncode == 1, _summary(proc)
    # pytest.fail() inside a fixture is reported as an error of the test's setup.
    assert re.search(r"\b1 (error|failed)\b", proc.stdout), _summary(proc)
    assert "skipped" not in proc.stdout.splitlines()[-1], _summary(proc)
    assert "EFFNET_REQUIRE_SHARED=1" in proc.stdout, _summary(proc)


@pytest.mark.slow
def test_subprocess_present_tarball_passes_when_required(tmp_path):
    shared = tmp_path / "shared"
    (shared / "datasets").mkdir(parents=True)
    (shared / cf.CIFAR_TARBALL_RELPATH).write_bytes(b"placeholder")
    proc = _run_probe(tmp_path, shared, require="1")
    assert proc.returncode == 0, _summary(proc)
    assert re.search(r"\b1 passed\b", proc.stdout), _summary(proc)


# --------------------------------------------------------------------------------------
# Requirement ranges vs. lock files
# --------------------------------------------------------------------------------------

def _requirements(path: Path) -> list:
    from packaging.requirements import Requirement

    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            reqs.append(Requirement(line))
    return reqs


def _pins(path: Path) -> dict:
    from packaging.utils import canonicalize_name

    pins = {}
    for req in _requirements(path):
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {req} is not an exact pin"
        pins[canonicalize_name(req.name)] = spec.version
    return pins


@pytest.mark.parametrize("req_files, lock", [
    (["requirements.txt", "requirements-bench.txt", "requirements-dev.txt"], "constraints.txt"),
    (["requirements.txt"], "constraints-sdk34.txt"),
])
def test_locks_pin_every_requirement_within_its_range(req_files, lock):
    from packaging.utils import canonicalize_name

    pins = _pins(REPO / lock)
    for name in req_files:
        for req in _requirements(REPO / name):
            key = canonicalize_name(req.name)
            assert key in pins, f"{lock} does not pin {req.name} (from {name})"
            assert req.specifier.contains(pins[key], prereleases=True), (
                f"{lock} pins {req.name}=={pins[key]}, outside {name}'s range '{req}'")


def test_lock_versions_of_the_two_environments():
    sdk = _pins(REPO / "constraints-sdk34.txt")
    assert (sdk["torch"], sdk["torchvision"]) == ("2.0.1", "0.15.2")
    assert int(sdk["numpy"].split(".")[0]) < 2, "torch 2.0.1 needs NumPy 1.x"
