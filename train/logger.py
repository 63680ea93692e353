"""Run logging: ``metrics.jsonl`` in the run folder, Weights & Biases when it works, and a tqdm progress bar.

The JSON-lines file is the record of truth: it needs nothing but the disk, and every plot or test can read it.
W&B is a dashboard on top, never a dependency of training: a failure to import, start or log warns once and the
run goes on without it. At the end of a run each phase's final (and, with ``checkpoint.keep_best``, best)
checkpoint is logged as a ``model`` artifact. The default mode, ``auto``, only goes online when an API key is
configured, so a fresh checkout never waits on the network; offline runs live in ``<run folder>/wandb/`` and upload
later with ``wandb sync``. A resumed run reuses the W&B id saved in its checkpoint, so its history continues in
the same run.

Only one process per job logs (rank 0, IPU instance 0); the others build a logger with ``enabled=False``, which
writes nothing and shows no bar, so the training loop needs no ``if rank == 0`` of its own.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Type, Union
from urllib.parse import urlparse

from tqdm import tqdm

from .config import LoggingConfig

Metric = Union[float, int, str]


class ProgressBar(tqdm):
    """tqdm whose ``set_postfix`` shows at the next timed redraw instead of redrawing at once: the loop sets it
    every step, and a redraw per step would flood a log file and slow a fast loop."""

    def set_postfix(self, ordered_dict: Optional[Mapping[str, Any]] = None, refresh: bool = False,
                    **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


#: What W&B refuses in an artifact name (it allows letters, digits, '-', '_' and '.').
ARTIFACT_NAME = re.compile(r"[^A-Za-z0-9._-]")
#: Keys every metrics line owns; a metric with one of these names would silently overwrite it.
RESERVED_KEYS = ("step", "time", "kind")


def has_wandb_api_key() -> bool:
    """True when W&B could authenticate without a prompt: ``$WANDB_API_KEY``, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(setting: str) -> str:
    """The W&B mode for ``logging.wandb``: explicit values as they are; ``auto`` defers to ``$WANDB_MODE``, then
    goes online only with an API key, because an online run without one would prompt or fail."""
    if setting != "auto":
        return setting
    env = os.environ.get("WANDB_MODE", "").strip()
    if env:
        return env
    return "online" if has_wandb_api_key() else "offline"


def _checked(metrics: Mapping[str, Any]) -> Dict[str, Metric]:
    """``metrics`` as plain JSON values, or an error naming the bad key (a tensor here would break the file)."""
    for key, value in metrics.items():
        if key in RESERVED_KEYS:
            raise ValueError(f"metric name {key!r} is reserved by the metrics file "
                             f"(reserved: {', '.join(RESERVED_KEYS)})")
        if not isinstance(value, (int, float, str)):
            raise TypeError(f"metric {key!r} is a {type(value).__name__}; log a float, int or str "
                            "(for a tensor, call .item() where the loop can afford the device sync)")
    return dict(metrics)


class RunLogger:
    """Metric lines, final summary and progress bars of one training run (see the module docstring)."""

    def __init__(self, run_dir: Path, config: Dict[str, Any], cfg: LoggingConfig, *, enabled: bool = True,
                 resume_id: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.mode = resolve_wandb_mode(cfg.wandb) if enabled else "disabled"
        self._wandb_id = resume_id
        self._run: Any = None
        self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if self.mode != "disabled":
            self._run = self._start_wandb(config, cfg, resume_id)

    def _start_wandb(self, config: Dict[str, Any], cfg: LoggingConfig, resume_id: Optional[str]) -> Any:
        try:
            import wandb

            run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or self.run_dir.name, tags=list(cfg.tags),
                group=cfg.group,
                config=config, dir=str(self.run_dir),
                mode=self.mode,  # type: ignore[arg-type]  # also $WANDB_MODE's values W&B accepts (dryrun, run)
                # "allow", not "must": "must" fails online when the first part ran offline and is not synced yet,
                # and offline both behave the same (a new local part with this id; `wandb sync` joins the parts).
                id=resume_id, resume="allow" if resume_id else None,
                settings=wandb.Settings(console="off", save_code=False, silent=True, disable_job_creation=True,
                                        init_timeout=60.0),
            )
        except Exception as err:  # noqa: BLE001 -- any W&B failure must leave training running
            self._warn(f"W&B could not start ({type(err).__name__}: {err})")
            return None
        self._wandb_id = run.id
        if self.mode == "online":
            print(f"W&B: {run.url}", file=sys.stderr)
        return run

    def _warn(self, what: str) -> None:
        warnings.warn(f"{what}; continuing without W&B (metrics still go to {self.run_dir / 'metrics.jsonl'})",
                      RuntimeWarning, stacklevel=3)

    def _drop_wandb(self, what: str, err: Exception) -> None:
        self._warn(f"W&B {what} failed ({type(err).__name__}: {err})")
        self._finish_wandb(exit_code=1)

    def _finish_wandb(self, exit_code: int) -> Optional[Exception]:
        """End the run and wait for W&B to write it out; the error, if that failed.

        ``run.finish()`` alone returns before wandb-core has flushed the run's ``.wandb`` file (wandb 0.31), so
        this also tears the W&B service down: when :meth:`close` returns, the run folder is complete and can be
        copied or synced. The next ``wandb.init`` in this process starts a fresh service.
        """
        run, self._run = self._run, None
        try:
            import wandb

            run.finish(exit_code=exit_code)
            wandb.teardown()
        except Exception as err:  # noqa: BLE001
            return err
        return None

    def _write(self, line: Dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError(f"RunLogger for {self.run_dir} used after close()")
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()  # a crashed run keeps every line it logged

    @property
    def wandb_id(self) -> Optional[str]:
        """The W&B run id to save in checkpoints and pass back as ``resume_id`` (None without W&B)."""
        return self._wandb_id

    def log(self, metrics: Mapping[str, Metric], step: int) -> None:
        """One line ``{"step", "time", **metrics}`` in ``metrics.jsonl``, and the same values in W&B at ``step``."""
        if not self.enabled:
            return
        values = _checked(metrics)
        self._write({"step": step, "time": round(time.time(), 3), **values})
        if self._run is not None:
            try:
                self._run.log(values, step=step)
            except Exception as err:  # noqa: BLE001
                self._drop_wandb("log", err)

    def summary(self, metrics: Mapping[str, Metric]) -> None:
        """Final figures of the run: a ``"kind": "summary"`` line, and the W&B run summary."""
        if not self.enabled:
            return
        values = _checked(metrics)
        self._write({"kind": "summary", "time": round(time.time(), 3), **values})
        if self._run is not None:
            try:
                self._run.summary.update(values)
            except Exception as err:  # noqa: BLE001
                self._drop_wandb("summary", err)

    def log_artifact(self, path: Path, name: str, kind: str, aliases: Sequence[str],
                     metadata: Mapping[str, Metric]) -> None:
        """``path`` as a version of the W&B artifact ``name`` (``kind``: e.g. ``model``) with ``aliases``. Offline, the
        artifact is recorded in the run's local files with a staged copy of ``path``; ``wandb sync`` uploads it."""
        if self._run is None:
            return
        try:
            import wandb

            artifact = wandb.Artifact(ARTIFACT_NAME.sub("-", name), type=kind, metadata=dict(metadata))
            artifact.add_file(str(path))
            self._run.log_artifact(artifact, aliases=list(aliases))
        except Exception as err:  # noqa: BLE001
            self._drop_wandb("artifact", err)

    def progress(self, iterable: Iterable, total: int, desc: str) -> ProgressBar:
        """A bar on stderr; redrawn at most twice a second on a terminal, twice a minute in a log file."""
        return ProgressBar(iterable, total=total, desc=desc, disable=not self.enabled, file=sys.stderr, unit="step",
                    mininterval=0.5 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)

    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run (``exit_code`` != 0 marks it failed) and close the file; safe to call twice."""
        if self._run is not None:
            local = Path(self._run.dir).parent
            err = self._finish_wandb(exit_code)
            if err is not None:
                self._warn(f"W&B finish failed ({type(err).__name__}: {err})")
            elif self.mode in ("offline", "dryrun"):
                print(f"W&B: offline run saved in {local}; upload it with: "
                      f"wandb sync {local.parent}/offline-run-*-{self._wandb_id}*", file=sys.stderr)
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
