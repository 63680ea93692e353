"""The run logger against a real offline W&B run.

What reaches W&B is checked at its public API: the ``wandb_calls`` fixture (tests/conftest.py) records every
``wandb.init``, ``Run.log``, ``Run.finish`` and ``Run.log_artifact`` call on the real runs and passes it on, and the
run's own public attributes (id, project, name, tags, config, summary) are read back. W&B's private file format is
not decoded; that the offline run folders exist is the part of it ``wandb sync`` documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from conftest import WandbCalls, offline_run_folders

pytest.importorskip("wandb")

from train.config import ConfigError, LoggingConfig, load_config  # noqa: E402
from train.logger import RunLogger, resolve_wandb_mode  # noqa: E402

CONFIG = {"model": {"name": "efficientnet-b0", "group_dim": 16}, "train": {"epochs": 2}}


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, no key, and nothing written outside ``tmp_path``."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def jsonl(run_dir: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------------------------------------- tests
def test_offline_run_logs_to_jsonl_and_wandb(tmp_path: Path, wandb_calls: WandbCalls) -> None:
    run_dir = tmp_path / "b0-demo"
    cfg = LoggingConfig(wandb="offline", tags=["test", "g16"], group="study-x")
    with RunLogger(run_dir, CONFIG, cfg) as logger:
        for step in range(3):
            logger.log({"train/loss": 2.0 - step / 2, "train/acc": 0.25 * step, "phase": "train"}, step=step * 10)
        logger.summary({"val/top1": 0.625, "epochs": 2})
        run_id = logger.wandb_id
    assert run_id

    lines = jsonl(run_dir)
    assert [line["step"] for line in lines[:3]] == [0, 10, 20]
    assert [line["train/loss"] for line in lines[:3]] == [2.0, 1.5, 1.0]
    assert all(line["time"] > 1e9 and line["phase"] == "train" for line in lines[:3])
    assert lines[3]["kind"] == "summary" and lines[3]["val/top1"] == 0.625 and len(lines) == 4

    (run,) = wandb_calls.runs
    assert (run.id, run.project, run.name, list(run.tags)) == (run_id, "efficientnet-ipu", "b0-demo", ["test", "g16"])
    assert run.group == "study-x"  # bench.study puts every arm of a study in one W&B group
    assert dict(run.config)["model"] == CONFIG["model"]
    assert wandb_calls.inits[0]["mode"] == "offline" and wandb_calls.inits[0]["dir"] == str(run_dir)
    assert [(step, m["train/loss"], m["train/acc"], m["phase"]) for _, step, m in wandb_calls.logs] == [
        (0, 2.0, 0.0, "train"), (10, 1.5, 0.25, "train"), (20, 1.0, 0.5, "train")]
    ((_, summary),) = wandb_calls.summaries
    assert summary["val/top1"] == 0.625 and summary["epochs"] == 2
    assert wandb_calls.finishes == [(run_id, 0)]
    assert len(offline_run_folders(run_dir, run_id)) == 1


def test_resume_continues_the_same_wandb_run(tmp_path: Path, wandb_calls: WandbCalls) -> None:
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(wandb="offline")
    with RunLogger(run_dir, CONFIG, cfg) as first:
        first.log({"loss": 3.0}, step=0)
        first.log({"loss": 2.0}, step=1)
        run_id = first.wandb_id
    with RunLogger(run_dir, CONFIG, cfg, resume_id=run_id) as second:
        assert second.wandb_id == run_id
        second.log({"loss": 1.0}, step=2)

    assert [line["step"] for line in jsonl(run_dir)] == [0, 1, 2]  # appended, not overwritten
    assert [(kw.get("id"), kw.get("resume")) for kw in wandb_calls.inits] == [(None, None), (run_id, "allow")]
    assert [run.id for run in wandb_calls.runs] == [run_id, run_id]
    assert wandb_calls.steps(run_id) == [0, 1, 2]  # one global step across the parts
    assert len(offline_run_folders(run_dir, run_id)) == 2, "an offline resume writes a second local part"


def test_auto_mode_goes_online_only_with_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_wandb_mode("auto") == "offline"  # from $WANDB_MODE (the fixture)
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode("auto") == "offline"  # no key anywhere
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"  # explicit settings win


@pytest.mark.parametrize("breakage", ["invalid WANDB_MODE", "wandb folder is a file"])
def test_broken_wandb_warns_and_training_logs_continue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       breakage: str) -> None:
    run_dir = tmp_path / "run"
    if breakage == "invalid WANDB_MODE":
        monkeypatch.setenv("WANDB_MODE", "not-a-mode")
    else:
        run_dir.mkdir()
        (run_dir / "wandb").write_text("in the way")
    with pytest.warns(RuntimeWarning, match="W&B could not start"):
        logger = RunLogger(run_dir, CONFIG, LoggingConfig(wandb="auto"))
    logger.log({"loss": 1.0}, step=0)
    logger.summary({"top1": 0.5})
    logger.close()
    assert logger.wandb_id is None
    assert [line.get("loss", line.get("top1")) for line in jsonl(run_dir)] == [1.0, 0.5]


def test_wandb_log_failure_warns_once_and_drops_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       wandb_calls: WandbCalls) -> None:
    logger = RunLogger(tmp_path / "run", CONFIG, LoggingConfig(wandb="offline"))

    def broken_log(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(logger._run, "log", broken_log)  # the failure path only; the run itself is real
    with pytest.warns(RuntimeWarning, match="W&B log failed .*disk full") as caught:
        logger.log({"loss": 1.0}, step=0)
        logger.log({"loss": 0.5}, step=1)
    assert len(caught) == 1
    logger.close()
    assert [line["loss"] for line in jsonl(tmp_path / "run")] == [1.0, 0.5]
    assert wandb_calls.finishes == [(logger.wandb_id, 1)]  # marked failed, and only once


def test_exception_marks_the_wandb_run_failed(tmp_path: Path, wandb_calls: WandbCalls) -> None:
    with pytest.raises(KeyboardInterrupt):
        with RunLogger(tmp_path / "run", CONFIG, LoggingConfig(wandb="offline")) as logger:
            logger.log({"loss": 1.0}, step=0)
            raise KeyboardInterrupt
    assert wandb_calls.finishes == [(logger.wandb_id, 1)]


def test_disabled_logger_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "rank1"
    logger = RunLogger(run_dir, CONFIG, LoggingConfig(wandb="offline"), enabled=False, resume_id="abc123")
    bar = logger.progress(range(5), total=5, desc="train")
    for _ in bar:
        bar.set_postfix(loss=1.0)
    logger.log({"loss": 1.0}, step=0)
    logger.summary({"top1": 0.5})
    logger.close()
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "")
    assert logger.wandb_id == "abc123"  # kept for the checkpoint of whoever saves it


def test_progress_bar_shows_postfix_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logger = RunLogger(tmp_path / "run", CONFIG, LoggingConfig(wandb="disabled"))
    bar = logger.progress(iter(range(3)), total=3, desc="epoch 1")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=0.5, lr=0.046875, img_s=1234.5)
    logger.close()
    assert seen == [0, 1, 2]
    out, err = capsys.readouterr()
    assert out == "" and "3/3" in err and "loss=0.5" in err and "lr=0.0469" in err
    assert err.count("epoch 1") == 2, "not a TTY: drawn when it starts and when it ends, not on every set_postfix"
    assert not (tmp_path / "run" / "wandb").exists()


def test_bad_metrics_are_clear_errors(tmp_path: Path) -> None:
    with RunLogger(tmp_path / "run", CONFIG, LoggingConfig(wandb="disabled")) as logger:
        with pytest.raises(TypeError, match="metric 'loss' is a Tensor.*item"):
            logger.log({"loss": torch.tensor(1.0)}, step=0)
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log({"step": 3}, step=3)
    with pytest.raises(RuntimeError, match="after close"):
        logger.log({"loss": 1.0}, step=1)


def test_logging_config_keys(tmp_path: Path) -> None:
    cfg = load_config(None, ["logging.tags=[a, b]", "logging.log_every=10", "logging.entity=team"]).logging
    assert (cfg.wandb, cfg.tags, cfg.log_every, cfg.entity, cfg.name) == ("auto", ["a", "b"], 10, "team", None)
    with pytest.raises(ConfigError, match="logging.wandb"):
        load_config(None, ["logging.wandb=maybe"])
    with pytest.raises(ConfigError, match="logging.log_every"):
        load_config(None, ["logging.log_every=0"])
