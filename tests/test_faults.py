"""Fault injection on real runs: real processes, real signals, real files, a real full disk where the machine allows.

Each case ends within a bound with the documented exit code (2 user error, 3 non-finite, 130 interrupted) and,
where a checkpoint was promised, resumes to exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from conftest import TINY_MODEL, needs_fashion
from train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: Longest a stopped job may take to exit: one step plus a checkpoint, with a loaded CI machine's margin.
STOP_BOUND_S = 90
#: 256 images at 16 px: 16 steps per epoch alone, 8 per rank pair; 48 steps in all, a few seconds.
FAST = TINY_MODEL + [
    "data.dataset=fashion-mnist", "data.train_subset=256", "data.val_subset=64", "train.resolution=16",
    "train.micro_batch_size=16", "train.val_batch_size=64", "train.epochs=40", "train.max_steps=48",
    "optimizer.name=adamw", "optimizer.lr=0.002", "optimizer.reference_batch=16", "schedule.name=cosine",
    "schedule.warmup_epochs=0", "logging.wandb=disabled", "logging.log_every=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
#: What each stopped process prints (several processes share stderr, so it may follow a progress bar's text):
#: (what stopped it, step, phase, checkpoint). A rank that got more than one signal (torchrun forwards the SIGTERM
#: it got itself) says so after the signal's name.
STOPPED = re.compile(r"stopped by (SIG\w+|a signal on another process)(?: \(\d+ signals; the first one counts\))? "
                     r"at step (\d+) of phase '(\w+)'; checkpoint (\S+)\. Resume with")

pytestmark = needs_fashion


def sets(items: List[str]) -> List[str]:
    return [a for item in items for a in ("--set", item)]


def train_cmd(run_dir: Path, *extra: str, nproc: int = 1) -> List[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return launcher + ["-m", "train"] + sets(FAST + [f"logging.run_dir={run_dir}", *extra])


def logged_steps(run_root: Path) -> int:
    files = list(run_root.glob("*/metrics.jsonl"))
    return sum(1 for line in files[0].read_text().splitlines() if '"train/loss"' in line) if files else 0


def start_and_wait(cmd: List[str], run_root: Path, steps: int = 4, **popen) -> subprocess.Popen:
    """Start ``cmd`` and return once it has logged ``steps`` training steps."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)
    deadline = time.time() + 180
    while logged_steps(run_root) < steps:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before it was signalled (code {proc.returncode}): {err[-3000:]}")
        assert time.time() < deadline, "the run never logged"
        time.sleep(0.1)
    return proc


def finish(proc: subprocess.Popen) -> str:
    """Wait (at most the stop bound) for ``proc`` to exit; its stderr."""
    try:
        _, err = proc.communicate(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # every test process starts its own session
        _, err = proc.communicate()
        pytest.fail(f"the job did not stop within {STOP_BOUND_S} s: {err[-3000:]}")
    return err


def no_traceback_from_the_ranks(err: str) -> bool:
    """torchrun ends a failed job with a traceback of its own (ChildFailedError); the ranks must print none."""
    return str(ROOT / "train") not in err and "DataLoader worker" not in err and err.count("Traceback") <= 1


def child_pids(parent: int) -> List[int]:
    """The live child processes of ``parent``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def rank_pids(launcher_pid: int) -> Dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children with a RANK in their environment)."""
    found: Dict[int, int] = {}
    for pid in child_pids(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [v[5:] for v in env if v.startswith(b"RANK=")]
        if ranks:
            found[int(ranks[0])] = pid
    return found


def final_weights(run_root: Path) -> Dict[str, torch.Tensor]:
    (run_dir,) = run_root.iterdir()
    return load_checkpoint(run_dir / "checkpoints" / "train-final.pt")["model"]


def assert_same_weights(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_to_end(cmd: List[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Dict[int, Dict[str, torch.Tensor]]:
    """Final weights of uninterrupted runs, alone and as two DDP processes (fresh processes, like the others)."""
    root = tmp_path_factory.mktemp("straight")
    out = {}
    for nproc in (1, 2):
        run_to_end(train_cmd(root / str(nproc), nproc=nproc))
        out[nproc] = final_weights(root / str(nproc))
    return out


# ------------------------------------------------------------------------------------------------------ signals
@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_to_one_ddp_rank_stops_every_rank_and_resumes_exactly(tmp_path, straight, rank):
    runs = tmp_path / "runs"
    proc = start_and_wait(train_cmd(runs, "data.workers=2", nproc=2), runs, start_new_session=True)
    pids = rank_pids(proc.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[rank], signal.SIGTERM)
    err = finish(proc)
    assert proc.returncode != 0  # torchrun reports its workers' non-zero exits
    stops = STOPPED.findall(err)
    assert sorted(s[0] for s in stops) == ["SIGTERM", "a signal on another process"], err[-3000:]
    assert len({s[1:] for s in stops}) == 1  # the same step and the same checkpoint on both ranks
    assert "--resume None" not in err and no_traceback_from_the_ranks(err), err[-3000:]
    exits = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s+exitcode\s*: (\d+)", err))
    assert exits == {"0": "130", "1": "130"}, err[-3000:]  # torchrun's report of each rank's exit code
    (run_dir,) = runs.iterdir()
    run_to_end(train_cmd(runs, "data.workers=2", nproc=2) + ["--resume", "auto"])
    assert_same_weights(final_weights(runs), straight[2])
    assert [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")] == []


def test_after_a_stop_the_stop_signals_are_ignored_until_exit():
    """torchrun's follow-up SIGTERM can arrive while Python shuts down, after it has put the default action back
    for signals with a Python handler: only SIG_IGN survives that. Without a stop (or on another error), the
    handlers are restored."""
    from train.errors import Interrupted
    from train.stop import STOP_SIGNALS, StopSignals

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        with StopSignals():
            pass
        assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM" and stop.count == 2
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: this test process lives on
        for sig, handler in before.items():
            signal.signal(sig, handler)
        # A rank that got no signal stops because another did: it leaves as Interrupted, and is just as exposed
        # to torchrun's follow-up SIGTERM (seen in CI as rank 1 dying -15 after its stop line).
        with pytest.raises(Interrupted):
            with StopSignals() as stop:
                raise Interrupted("stopped by a signal on another process")
        assert not stop.requested and all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
        for sig, handler in before.items():
            signal.signal(sig, handler)
        with pytest.raises(ValueError):
            with StopSignals():
                raise ValueError("another error")
        assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_sigterm_to_the_process_group_of_a_torchrun_job_with_workers(tmp_path, straight):
    """What Slurm and ``timeout`` do: every process, torchrun and the loader workers included, gets SIGTERM."""
    runs = tmp_path / "runs"
    proc = start_and_wait(train_cmd(runs, "data.workers=2", nproc=2), runs, start_new_session=True)
    os.killpg(proc.pid, signal.SIGTERM)
    err = finish(proc)
    assert no_traceback_from_the_ranks(err), err[-3000:]
    stops = STOPPED.findall(err)
    assert [s[0] for s in stops] == ["SIGTERM", "SIGTERM"], err[-3000:]
    assert len({s[1:] for s in stops}) == 1, err[-3000:]  # the same step and checkpoint on both ranks
    run_to_end(train_cmd(runs, "data.workers=2", nproc=2) + ["--resume", "auto"])
    assert_same_weights(final_weights(runs), straight[2])


@pytest.mark.slow
@pytest.mark.parametrize("repeat", range(2))
def test_sigterm_to_the_process_group_with_loader_workers(tmp_path, straight, repeat):
    runs = tmp_path / "runs"
    proc = start_and_wait(train_cmd(runs, "data.workers=2"), runs, steps=3 + 5 * repeat, start_new_session=True)
    os.killpg(proc.pid, signal.SIGTERM)
    err = finish(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "DataLoader worker" not in err and "Traceback" not in err
    run_to_end(train_cmd(runs, "data.workers=2") + ["--resume", "auto"])
    assert_same_weights(final_weights(runs), straight[1])


@pytest.mark.slow
def test_sigterm_to_a_loader_worker_alone_is_ignored(tmp_path, straight):
    """A worker is not the job: a signal that reaches only a worker must not crash its rank."""
    runs = tmp_path / "runs"
    proc = start_and_wait(train_cmd(runs, "data.workers=2"), runs, start_new_session=True)
    workers = child_pids(proc.pid)
    assert workers, "no loader worker found"
    os.kill(workers[0], signal.SIGTERM)
    err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert_same_weights(final_weights(runs), straight[1])


@pytest.mark.slow
def test_sigint_twice_still_writes_one_checkpoint_and_resumes_exactly(tmp_path, straight):
    runs = tmp_path / "runs"
    proc = start_and_wait(train_cmd(runs), runs, start_new_session=True)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = finish(proc)
    assert proc.returncode == 130, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("stopped by SIGINT")]  # one stop, one checkpoint
    assert "Traceback" not in err  # (whether the second signal lands before the message is a race; it may)
    checkpoint = Path(line.split("Resume with --resume ")[1].split()[0])
    assert checkpoint.is_file()
    run_to_end(train_cmd(runs) + ["--resume", str(checkpoint)])
    assert_same_weights(final_weights(runs), straight[1])


@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_job_promptly(tmp_path):
    runs = tmp_path / "runs"
    proc = start_and_wait(train_cmd(runs, "checkpoint.every_steps=2", nproc=2), runs, start_new_session=True)
    os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
    finish(proc)
    assert proc.returncode != 0
    (run_dir,) = runs.iterdir()
    saved = sorted((run_dir / "checkpoints").glob("train-step*.pt"))
    assert saved and all(load_checkpoint(p)["position"]["step"] % 2 == 0 for p in saved)


# ------------------------------------------------------------------------------------------------------- storage
def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MB tmpfs: room for a few tiny checkpoints (3 MB each), then full. Skips where the machine does not allow
    mounts (the injected-ENOSPC test below covers the same code path there)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "10m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights); see the injected-ENOSPC test")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_full_disk_is_one_line_and_earlier_checkpoints_stay_loadable(small_disk):
    done = subprocess.run(train_cmd(small_disk / "runs", "checkpoint.every_steps=1", "checkpoint.keep=1000"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert "cannot write checkpoint" in line and "no space left" in line and "MB free" in line
    assert "Traceback" not in done.stderr
    (run_dir,) = (small_disk / "runs").iterdir()
    saved = sorted((run_dir / "checkpoints").iterdir())
    assert len(saved) >= 2 and all(p.suffix == ".pt" for p in saved)  # no partial temporary file left
    for path in saved:
        load_checkpoint(path)


def test_a_write_that_fails_midway_removes_its_partial_file(tmp_path, monkeypatch):
    import errno

    from train import checkpoint
    from train.errors import StorageError

    good = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, good)
    real_write = checkpoint._RecordingWriter.write

    def full_after_a_little(self, data):
        real_write(self, data[:16])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint._RecordingWriter, "write", full_after_a_little)
    with pytest.raises(StorageError, match=r"cannot write checkpoint .*ckpt\.pt: no space left"):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(1000)}, "config": {}}, good)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert torch.equal(load_checkpoint(good)["model"]["w"], torch.ones(3))


@pytest.mark.slow
def test_stale_temporaries_are_removed_at_the_next_start(tmp_path):
    runs = tmp_path / "runs"
    run_to_end(train_cmd(runs, "train.max_steps=4"))
    (run_dir,) = runs.iterdir()
    stale = run_dir / "checkpoints" / ".train-step00000003.pt.k2j4h5.tmp"
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    done = run_to_end(train_cmd(runs, "train.max_steps=4") + ["--resume", "auto"])
    assert not stale.exists() and str(stale) in done.stderr


@pytest.mark.slow
def test_unwritable_run_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = subprocess.run(train_cmd(blocker / "runs"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: cannot write the run folder {blocker}")
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------------- non-finite
@pytest.mark.slow
def test_nan_stop_names_a_checkpoint_that_resumes_and_trains(tmp_path):
    runs = tmp_path / "runs"
    done = subprocess.run(train_cmd(runs, "optimizer.lr=1e6", "checkpoint.every_steps=1"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert "was not finite" in line and "it was not applied" in line
    good = Path(line.split("Last checkpoint that trains: ")[1].split()[0].rstrip(";."))
    state = load_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    (run_dir,) = runs.iterdir()
    assert all(load_checkpoint(p)["position"]["step"] <= state["position"]["step"]
               for p in (run_dir / "checkpoints").glob("*.pt"))  # the newer ones were set aside
    assert list((run_dir / "checkpoints").glob("*.pt.nonfinite"))
    more = state["position"]["step"] + 3
    resumed = run_to_end(train_cmd(runs, "optimizer.lr=1e-3", f"train.max_steps={more}") +
                         ["--resume", str(good), "--resume-force"])
    assert "--resume-force: continuing" in resumed.stderr and "optimizer.lr" in resumed.stderr
    final = load_checkpoint(run_dir / "checkpoints" / "train-final.pt")
    assert final["position"]["step"] == more and final["position"]["nonfinite_steps"] == 0


@pytest.mark.slow
def test_skip_drops_a_nan_step_and_counts_it(tmp_path, monkeypatch, capsys):
    """One poisoned step (an injected NaN loss) is dropped; training goes on and the weights stay finite."""
    from train.cli import main
    from train.task import ClassificationTask

    real_forward = ClassificationTask.forward
    calls = {"n": 0}

    def poisoned(self, images, labels, mix=None):
        loss, top1, top5 = real_forward(self, images, labels, mix)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                loss = loss * float("nan")
        return loss, top1, top5

    monkeypatch.setattr(ClassificationTask, "forward", poisoned)
    args = sets(FAST + [f"logging.run_dir={tmp_path}", "data.workers=0", "train.max_steps=10",
                        "train.nonfinite=skip"])
    assert main(args) == 0
    assert "step 5 of phase 'train' was not finite" in capsys.readouterr().err
    (run_dir,) = tmp_path.iterdir()
    final = load_checkpoint(run_dir / "checkpoints" / "train-final.pt")
    assert final["position"]["nonfinite_steps"] == 1 and final["position"]["step"] == 10
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["train/nonfinite_steps"] for x in lines if "phase_step" in x and "lr" in x][-1] == 1
    monkeypatch.setattr(ClassificationTask, "forward", lambda self, *a: (lambda r: (r[0] * float("nan"),) + r[1:])(
        real_forward(self, *a)))
    assert main(args + ["--set", "train.max_nonfinite_skips=3", "--set", "logging.run_dir=" + str(tmp_path / "b")]) == 3
    assert "3 steps in a row" in capsys.readouterr().err


def test_gradient_clipping_bounds_the_update():
    """SGD with lr 1 and no momentum moves the weights by exactly the clipped gradient."""
    from models import build_model
    from train.backends import make_backend
    from train.config import load_config
    from train.phases import training_phase

    cfg = load_config(None, ["model.num_classes=10", "model.width_mult=0.25", "model.depth_mult=0.25",
                             "model.dropout=0", "model.survival_prob=1", "optimizer.name=sgd", "optimizer.lr=1",
                             "optimizer.reference_batch=8", "optimizer.momentum=0", "optimizer.weight_decay=0",
                             "optimizer.clip_grad_norm=1e-3", "train.micro_batch_size=8", "train.device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    backend = make_backend(cfg, training_phase(cfg), model)
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    stats = backend.train_call(images, torch.arange(8) % 10, None)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert stats.applied and stats.grad_norm > 1e-3
    assert torch.linalg.vector_norm(moved).item() == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.slow
def test_a_resume_inside_the_finetune_phase_keeps_one_step_counter(tmp_path):
    """W&B rejects steps that go backwards: the global step keeps increasing over the phase boundary and the
    resume, and the summary keeps the training phase's figures."""
    runs = tmp_path / "runs"
    cmd = train_cmd(runs, "train.max_steps=16", "finetune.enabled=true", "finetune.resolution=16",
                    "finetune.epochs=3", "finetune.optimizer.lr=0.01", "finetune.optimizer.reference_batch=16")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    while not any('"phase": "finetune"' in line and '"train/loss"' in line
                  for f in runs.glob("*/metrics.jsonl") for line in f.read_text().splitlines()[-5:]):
        assert proc.poll() is None and time.time() < deadline, "the fine-tune phase never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = finish(proc)
    assert proc.returncode == 130 and "of phase 'finetune'" in err, err[-3000:]
    run_to_end(cmd + ["--resume", "auto"])
    (run_dir,) = runs.iterdir()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "step" in x]
    assert steps == sorted(steps) and max(steps) == 16 + 3 * 16
    assert {x["phase"] for x in lines if "phase" in x} == {"train", "finetune"}
    summary = [x for x in lines if x.get("kind") == "summary"][-1]
    assert summary["train/steps"] == 16 and summary["finetune/steps"] == 48 and "train/val/top1@16" in summary
