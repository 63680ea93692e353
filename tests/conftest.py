"""Shared pytest helpers and fixtures.

Shared data
-----------
Some tests need the CIFAR-10 JPEG tarball that lives *outside* the repository, in
the ``shared/`` folder next to the clone::

    <parent>/main/                          <- this repository
    <parent>/shared/datasets/cifar10-jpg.tar.gz

Use the ``shared_cifar_tarball`` fixture (or call :func:`find_shared_cifar_tarball`)
to get its path. If it is missing the test is *skipped*, unless the environment
variable ``EFFNET_REQUIRE_SHARED=1`` is set (``.ci/run`` sets it), in which case the
test *fails*: on CI a missing data set must never pass silently as a skip.

``EFFNET_SHARED_DIR`` overrides the location of the ``shared/`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Debian's dataset-fashion-mnist (the ``make train`` default); tests on it skip where it is not installed.
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION_MNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")

#: ``--set`` items for a tiny B0-G16-LN+PN (width and depth 0.25, 10 classes): a CPU step takes well under a second.
TINY_MODEL = ["model.name=efficientnet-b0", "model.group_dim=16", "model.expand_ratio=4", "model.norm=layer",
              "model.proxy_norm=true", "model.num_classes=10", "model.width_mult=0.25", "model.depth_mult=0.25"]

#: Environment variable overriding the ``shared/`` folder (default: ``<repo>/../shared``).
SHARED_DIR_ENV = "EFFNET_SHARED_DIR"
#: Environment variable that turns "shared data missing" skips into failures.
REQUIRE_SHARED_ENV = "EFFNET_REQUIRE_SHARED"
#: Location of the CIFAR-10 JPEG tarball, relative to the ``shared/`` folder.
CIFAR_TARBALL_RELPATH = Path("datasets") / "cifar10-jpg.tar.gz"
#: Imagenette2 at 224 px (10 ImageNet classes, real photos), relative to the ``shared/`` folder.
IMAGENETTE_TARBALL_RELPATH = Path("datasets") / "imagenette2-224.tar.gz"

_TRUE = {"1", "true", "yes", "on"}


def shared_dir() -> Path:
    """The ``shared/`` folder: ``$EFFNET_SHARED_DIR`` or ``<repo>/../shared``."""
    override = os.environ.get(SHARED_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser().resolve()
    return (REPO_ROOT.parent / "shared").resolve()


def require_shared() -> bool:
    """True when missing shared data must fail the test instead of skipping it."""
    return os.environ.get(REQUIRE_SHARED_ENV, "").strip().lower() in _TRUE


def skip_or_fail(reason: str, require_env: str = REQUIRE_SHARED_ENV) -> None:
    """``pytest.skip(reason)``, or ``pytest.fail`` when ``require_env`` (default ``EFFNET_REQUIRE_SHARED``) is 1.

    Never returns. Use it for any test precondition on shared data (or, with its own variable, on the machine).
    """
    if os.environ.get(require_env, "").strip().lower() in _TRUE:
        pytest.fail(f"{reason} [{require_env}=1 makes this a failure, not a skip]", pytrace=False)
    pytest.skip(reason)


#: Environment variable that turns "a C helper of the data path cannot be built here, fails its load check or (the
#: resize) is not checked on this machine type" skips into failures.
REQUIRE_NATIVE_ENV = "EFFNET_REQUIRE_NATIVE"


def needs_jpeg_region() -> None:
    """Skip (or, with ``EFFNET_REQUIRE_NATIVE=1`` as ``.ci/run`` sets it, fail) where ``data.jpeg_region``
    cannot be built: no C compiler or no libjpeg headers."""
    from data import jpeg_region

    reason = jpeg_region.unavailable_reason()
    if reason:
        skip_or_fail(f"the JPEG region decoder is not available here: {reason}", REQUIRE_NATIVE_ENV)


def needs_c_resize() -> None:
    """Skip (or, with ``EFFNET_REQUIRE_NATIVE=1``, fail) where ``data.resample``'s C resize cannot be built or
    does not give this Pillow's pixels."""
    from data import resample

    reason = resample.unavailable_reason()
    if reason:
        skip_or_fail(f"the C resize is not available here: {reason}", REQUIRE_NATIVE_ENV)


def find_shared_cifar_tarball() -> Path:
    """Path of ``shared/datasets/cifar10-jpg.tar.gz``; skips (or fails) if it is missing."""
    path = shared_dir() / CIFAR_TARBALL_RELPATH
    if not path.is_file():
        skip_or_fail(f"shared data set missing: {path} "
                     f"(set {SHARED_DIR_ENV} to the folder holding datasets/)")
    return path


@pytest.fixture(scope="session")
def shared_imagenette_tarball() -> Path:
    """Path of the shared Imagenette2 (224 px) tarball; skips (or, with ``EFFNET_REQUIRE_SHARED=1``, fails)."""
    path = shared_dir() / IMAGENETTE_TARBALL_RELPATH
    if not path.is_file():
        skip_or_fail(f"shared data set missing: {path} (set {SHARED_DIR_ENV} to the folder holding datasets/)")
    return path


@pytest.fixture(scope="session")
def shared_cifar_tarball() -> Path:
    """Path of the shared CIFAR-10 JPEG tarball (see :func:`find_shared_cifar_tarball`)."""
    return find_shared_cifar_tarball()


def assert_trains_at(model, resolutions=(32, 48), num_classes=10) -> None:
    """Forward and backward at each resolution give the right shape and finite gradients everywhere."""
    import torch

    for res in resolutions:
        out = model(torch.randn(2, 3, res, res))
        assert out.shape == (2, num_classes)
        out.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()


def assert_split_points_run_in_order(model, resolution=64) -> list:
    """``split_points(model)`` names modules that run in that order (pipeline stages rely on it); returns them."""
    import torch

    from models import split_points

    names = split_points(model)
    modules = dict(model.named_modules())
    assert names[0] == "stem" and names[-2:] == ["head", "classifier"]
    order = []
    hooks = [modules[n].register_forward_pre_hook(lambda m, i, n=n: order.append(n)) for n in names]
    model.eval()(torch.zeros(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    assert order == names
    return names


class WandbCalls:
    """What the code under test asked of W&B through its public API, recorded on the real runs as it happened."""

    def __init__(self) -> None:
        self.inits: list = []  # wandb.init keyword arguments, one per run part
        self.runs: list = []  # the real Run objects
        self.logs: list = []  # (run id, step, metrics)
        self.summaries: list = []  # (run id, summary as it stood when the run finished)
        self.finishes: list = []  # (run id, exit code)
        self.artifacts: list = []  # (run id, wandb.Artifact, aliases)

    def steps(self, run_id: str) -> list:
        return [step for rid, step, _ in self.logs if rid == run_id]


@pytest.fixture
def wandb_calls(monkeypatch: pytest.MonkeyPatch) -> WandbCalls:
    """Wrap ``wandb.init`` and the methods of the runs it returns so that every call is recorded and then passed
    on: W&B itself still runs (offline) and writes its files. No reading of W&B's file format is needed."""
    wandb = pytest.importorskip("wandb")
    calls = WandbCalls()
    real_init = wandb.init

    def init(**kwargs):
        run = real_init(**kwargs)
        calls.inits.append(kwargs)
        calls.runs.append(run)
        real_log, real_finish, real_log_artifact = run.log, run.finish, run.log_artifact

        def log(data, step=None, **rest):
            calls.logs.append((run.id, step, dict(data)))
            return real_log(data, step=step, **rest)

        def finish(exit_code=None, **rest):
            calls.summaries.append((run.id, {key: run.summary[key] for key in run.summary.keys()}))
            calls.finishes.append((run.id, exit_code))
            return real_finish(exit_code=exit_code, **rest)

        def log_artifact(artifact, aliases=None, **rest):
            calls.artifacts.append((run.id, artifact, list(aliases or [])))
            return real_log_artifact(artifact, aliases=aliases, **rest)

        monkeypatch.setattr(run, "log", log)
        monkeypatch.setattr(run, "finish", finish)
        monkeypatch.setattr(run, "log_artifact", log_artifact)
        return run

    monkeypatch.setattr(wandb, "init", init)
    return calls


def offline_run_folders(run_dir: Path, run_id: str) -> list:
    """The local parts W&B wrote for one offline run (``wandb sync`` takes these folders), oldest first."""
    return sorted(p for p in run_dir.glob(f"wandb/offline-run-*-{run_id}*") if p.is_dir())
