"""``python -m bench.study STUDY.yml``: the paper's Figure 1 on your data — several real training runs, compared.

A study file names a base recipe, overrides every arm shares, and the arms (each a name, optional recipe, overrides
and seeds). Every arm × seed is one real ``python -m train`` run (under ``torchrun`` with ``processes: N``), all in
one study folder and one W&B group, followed by a ``python -m train.validate`` sweep of its final checkpoints over
``sweep_resolutions`` (the FixRes curve). The study is resumable: an arm whose record says it succeeded is skipped,
an interrupted one continues with ``--resume auto``, a failing one is recorded (and retried next time) and the
others still run. After every arm ``results.jsonl``, ``results.csv``, ``results.md`` and the two plots are written
again from the records (docs/results.md).

    python -m bench.study configs/studies/cpu-imagenette-b0.yml            # runs (or continues) the study
    python -m bench.study configs/studies/cpu-imagenette-b0.yml --list     # the commands, nothing run
    python -m bench.study configs/studies/cpu-imagenette-b0.yml --report   # tables and plots from the records
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from train.checkpoint import final_checkpoint_name
from train.cli import run_guarded
from train.config import ConfigError, load_config, parse_yaml
from train.errors import EXIT_INTERRUPTED, Interrupted
from train.phases import native_resolution, run_phases
from train.trainer import run_dirs_named

#: The keys of a study file and of one arm (docs/results.md, "Study files").
STUDY_KEYS = ("name", "config", "set", "seeds", "processes", "launcher", "test_resolution", "sweep_resolutions",
              "arms")
ARM_KEYS = ("name", "config", "set", "seeds", "finetune_from")


@dataclass(frozen=True)
class Arm:
    """One training run of the study: an arm of the study file at one seed."""

    name: str  # "<arm>" or "<arm>-s<seed>" when the arm has several seeds
    arm: str
    seed: int
    config: Path
    overrides: Tuple[str, ...]
    source: Optional["Arm"] = None  # finetune_from: only the fine-tune phase, from this run's train-final.pt


@dataclass
class Study:
    name: str
    folder: Path
    processes: int
    launcher: List[str]  # words before "python -m train" (poprun and its options for IPU arms)
    test_resolution: int
    sweep_resolutions: List[int]
    arms: List[Arm] = field(default_factory=list)

    @property
    def runs_dir(self) -> Path:
        return self.folder / "runs"

    def record_path(self, arm: Arm) -> Path:
        return self.folder / "arms" / f"{arm.name}.json"

    def log_path(self, arm: Arm) -> Path:
        return self.folder / "logs" / f"{arm.name}.log"


# ------------------------------------------------------------------------------------------------ study file
def _set_items(raw: Any, where: str) -> List[str]:
    """``{section.key: value}`` → ``--set`` items (values as JSON, which the config loader reads as YAML)."""
    if raw is None:
        return []
    if not isinstance(raw, dict) or not all(isinstance(k, str) and "." in k for k in raw):
        raise ConfigError(f"{where}: {raw!r} is not a mapping of section.key: value (e.g. model.norm: layer)")
    return [f"{key}={json.dumps(value)}" for key, value in raw.items()]


def _int_list(raw: Any, where: str) -> List[int]:
    if not isinstance(raw, list) or not raw or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                       for v in raw):
        raise ConfigError(f"{where}: {raw!r} is not a non-empty list of integers >= 0 (e.g. [0, 1])")
    return raw


def _check_keys(raw: Any, allowed: Sequence[str], where: str) -> Dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(allowed)}, got {raw!r}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid keys: {', '.join(allowed)})")
    return raw


def _recipe(raw: Any, study_file: Path, where: str) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}.config: {raw!r} is not a recipe file name (relative to the study file)")
    path = (study_file.parent / raw).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}.config: {path} does not exist")
    return path


#: The overrides every run ends with (its seed, name, folder and W&B names), in this order.
IDENTITY_KEYS = ("train.seed", "name", "logging.run_dir", "logging.group", "logging.name")


def _source(study: Study, source: Any, seed: int, where: str) -> Arm:
    """The earlier run at ``seed`` of the arm named by ``finetune_from``."""
    for arm in study.arms:
        if arm.arm == source and arm.seed == seed and arm.source is None:
            return arm
    raise ConfigError(f"{where}.finetune_from: {source!r} is not an earlier training arm with seed {seed} (arms so "
                      f"far: {', '.join(dict.fromkeys(a.arm for a in study.arms)) or 'none'})")


def load_study(path: Path, out: Optional[Path] = None) -> Study:
    """The study file, every arm's config loaded and checked (so a typo stops the study before any run)."""
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    raw = _check_keys(parse_yaml(path.read_text(), str(path)) or {}, STUDY_KEYS, str(path))
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: name: {name!r} is not a folder name")
    processes = raw.get("processes", 1)
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ConfigError(f"{path}: processes: {processes!r} is not an integer >= 1")
    launcher = raw.get("launcher", [])
    if not isinstance(launcher, list) or not all(isinstance(w, str) and w for w in launcher):
        raise ConfigError(f"{path}: launcher: {launcher!r} is not a list of words (e.g. [poprun, --num-instances=4])")
    if launcher and processes > 1:
        raise ConfigError(f"{path}: launcher and processes: {processes} both launch the runs; keep one")
    base = _recipe(raw.get("config"), path, str(path))
    shared = _set_items(raw.get("set"), f"{path}: set")
    seeds = _int_list(raw.get("seeds", [0]), f"{path}: seeds")
    sweep = _int_list(raw.get("sweep_resolutions", []), f"{path}: sweep_resolutions") if raw.get(
        "sweep_resolutions") is not None else []
    if not isinstance(raw.get("arms"), list) or not raw["arms"]:
        raise ConfigError(f"{path}: arms: a study needs a list of arms (each with a name and set:)")
    study = Study(name=name, folder=(out or Path("studies") / name).resolve(), processes=processes,
                  launcher=launcher, test_resolution=0,
                  sweep_resolutions=sweep)
    for index, entry in enumerate(raw["arms"]):
        where = f"{path}: arms[{index}]"
        entry = _check_keys(entry, ARM_KEYS, where)
        arm_name = entry.get("name")
        if not isinstance(arm_name, str) or not arm_name or "/" in arm_name:
            raise ConfigError(f"{where}.name: {arm_name!r} is not a plain name")
        if any(a.arm == arm_name for a in study.arms):
            raise ConfigError(f"{where}.name: {arm_name!r} is used twice")
        arm_seeds = _int_list(entry["seeds"], f"{where}.seeds") if "seeds" in entry else seeds
        for seed in arm_seeds:
            source = _source(study, entry.get("finetune_from"), seed, where) if "finetune_from" in entry else None
            recipe = source.config if source else (_recipe(entry["config"], path, where) if "config" in entry
                                                   else base)
            run = f"{arm_name}-s{seed}" if len(arm_seeds) > 1 else arm_name
            inherited = list(source.overrides[:-len(IDENTITY_KEYS)]) if source else shared
            overrides = tuple(inherited + _set_items(entry.get("set"), f"{where}.set") + [
                f"train.seed={seed}", f"name={run}", f"logging.run_dir={json.dumps(str(study.runs_dir))}",
                f"logging.group={json.dumps(name)}", f"logging.name={json.dumps(f'{name}/{run}')}"])
            arm = Arm(run, arm_name, seed, recipe, overrides, source)
            try:  # every key and value checked now, with its arm named
                cfg = load_config(str(recipe), list(overrides))
                run_phases(cfg)  # the phases' own checks (resolution rule, split points)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            if cfg.train.backend != "torch" and processes > 1:
                raise ConfigError(f"{where}: processes: {processes} runs torchrun, which is for train.backend: torch; "
                                  "IPU arms replicate with ipu.replicas (and poprun)")
            if source and not cfg.finetune.enabled:
                raise ConfigError(f"{where}: finetune_from runs only the fine-tune phase; set finetune.enabled: true")
            study.arms.append(arm)
    first = load_config(str(study.arms[0].config), list(study.arms[0].overrides))
    study.test_resolution = raw.get("test_resolution") or native_resolution(first.model.name)
    if not isinstance(study.test_resolution, int) or isinstance(study.test_resolution, bool) or \
            study.test_resolution < 8:
        raise ConfigError(f"{path}: test_resolution: {study.test_resolution!r} is not an integer >= 8")
    return study


# ------------------------------------------------------------------------------------------------ running
def train_command(study: Study, arm: Arm) -> List[str]:
    """The command a user would type for this arm (``torchrun`` when the study has several processes, after the
    study's ``launcher`` words when it has them):
    ``python -m train ... --resume auto``, or ``python -m train.finetune --checkpoint <source's train-final.pt>``."""
    module = "train.finetune" if arm.source else "train"
    launcher = study.launcher + [sys.executable, "-m", module] if study.processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={study.processes}",
        "-m", module]
    settings = ["--config", str(arm.config)] + [a for o in arm.overrides for a in ("--set", o)]
    if arm.source:
        return launcher + ["--checkpoint", str(source_checkpoint(study, arm.source))] + settings
    return launcher + settings + ["--resume", "auto"]


def source_checkpoint(study: Study, source: Arm) -> Path:
    """The training phase's final checkpoint of ``source``'s run (what a finetune_from arm starts from)."""
    runs = run_dirs(study, source)
    return (runs[-1] if runs else study.runs_dir / f"{source.name}-<time>") / "checkpoints" / \
        final_checkpoint_name("train")


def sweep_command(study: Study, checkpoints: Sequence[Path], out: Path) -> List[str]:
    return [sys.executable, "-m", "train.validate", *[a for c in checkpoints for a in ("--checkpoint", str(c))],
            "--resolutions", ",".join(map(str, study.sweep_resolutions)), "--results-file", str(out)]


def _run(command: List[str], log: Path) -> Tuple[int, float, float, bool]:
    """Run ``command`` with its output appended to ``log``; its exit code, wall seconds, peak RSS (MiB, the
    largest process of its tree, from ``wait4``) and whether the study passed it a stop signal.

    SIGINT and SIGTERM reaching the study are passed on to the run, which stops at its next step boundary with a
    checkpoint (a signal to the whole process group reaches it twice; the trainer counts the first)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        stopped: List[int] = []

        def forward(signum: int, _frame: Any) -> None:
            stopped.append(signum)
            proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # retried after a handled signal (PEP 475)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - started, usage.ru_maxrss / 1024, bool(stopped)


def run_dirs(study: Study, arm: Arm) -> List[Path]:
    return run_dirs_named(study.runs_dir, arm.name)


def read_summary(run_dir: Path) -> Dict[str, Any]:
    """The run's final ``"kind": "summary"`` line of ``metrics.jsonl`` (every phase's cost and last validation)."""
    summary: Dict[str, Any] = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if '"kind": "summary"' in line:
                summary = json.loads(line)
    return summary


def arm_record(study: Study, arm: Arm, code: int, seconds: float, peak_mib: float,
               sweep: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What the study keeps of one arm (docs/results.md, "What a record holds")."""
    runs = run_dirs(study, arm)
    cfg = load_config(str(arm.config), list(arm.overrides))
    phases = run_phases(cfg)
    summary = read_summary(runs[-1]) if runs else {}
    m = cfg.model
    variant = (f"G{m.group_dim}-" + {"batch": "BN", "group": "GN", "layer": "LN"}[m.norm] + ("+PN" if m.proxy_norm
                                                                                                else ""))
    record: Dict[str, Any] = {
        "arm": arm.arm, "run": arm.name, "seed": arm.seed, "status": "ok" if code == 0 else "failed",
        "exit_code": code, "run_dir": str(runs[-1]) if runs else None, "variant": variant,
        "train_resolution": phases[0].stages[-1].resolution,
        "finetune_resolution": phases[1].stages[0].resolution if len(phases) > 1 else None,
        "finetune_first_trainable": phases[1].first_trainable if len(phases) > 1 else None,
        "micro_batch_size": cfg.train.micro_batch_size, "epochs": cfg.train.epochs,
        "finetune_epochs": cfg.finetune.epochs if cfg.finetune.enabled else 0,
        "wall_seconds": round(seconds, 1), "peak_rss_mib": round(peak_mib),
    }
    for phase in phases:
        p = phase.name
        if f"{p}/seconds" in summary:
            record[f"{p}_seconds"] = summary[f"{p}/seconds"]
            record[f"{p}_images"] = summary[f"{p}/images"]
            record[f"{p}_forward_gmacs"] = round(summary[f"{p}/forward_macs"] / 1e9, 2)
    record["train_images_per_s"] = (round(record["train_images"] / record["train_seconds"], 1)
                                    if record.get("train_seconds") else None)
    # Every validation the run ended its phases with: <phase>/val/[<average>_avg/]<metric>@<resolution>.
    record["val"] = {k.replace("/val/", "/"): v for k, v in summary.items()
                     if "/val/" in k and "/loss@" not in k and "/best/" not in k}
    if arm.source:  # the training phase is the source run's: its cost and its validation count here too
        trained = json.loads(study.record_path(arm.source).read_text())
        record.update({k: trained[k] for k in ("train_seconds", "train_images", "train_forward_gmacs",
                                               "train_images_per_s") if k in trained})
        record["val"].update({k: v for k, v in trained["val"].items() if k.startswith("train/")})
        record["finetune_from"] = arm.source.name
    record["training_seconds"] = round(sum(record.get(f"{p.name}_seconds", 0.0) for p in phases), 1)
    record["training_gmacs"] = round(sum(record.get(f"{p.name}_forward_gmacs", 0.0) for p in phases), 2)
    record["images_seen"] = sum(record.get(f"{p.name}_images", 0) for p in phases)
    record["sweep"] = sweep
    record["top1"] = headline(record, study.test_resolution)
    return record


def headline(record: Dict[str, Any], resolution: int) -> Optional[float]:
    """Top-1 at the test resolution of the weights the run hands on: the training phase's per-epoch average when it
    has one (the fine-tune starts from it and an export takes it), the fine-tune's trained weights after it. From
    the run's own last validation, or else from its sweep (which takes the same weights)."""
    last = "finetune" if record["finetune_resolution"] else "train"
    val = record["val"]
    for key in (f"{last}/epoch_avg/top1@{resolution}", f"{last}/top1@{resolution}"):
        if key in val:
            return val[key]
    return next((s["top1"] for s in record["sweep"] if s["phase"] == last and s["resolution"] == resolution), None)


def run_arm(study: Study, arm: Arm) -> Dict[str, Any]:
    log = study.log_path(arm)
    code, seconds, peak, stopped = _run(train_command(study, arm), log)
    if stopped or code == EXIT_INTERRUPTED:  # a run stopped before its first step dies of the signal itself
        raise Interrupted(f"study {study.name!r} interrupted in arm {arm.name!r} (its checkpoint is kept); run the "
                          "same command again to continue")
    sweep: List[Dict[str, Any]] = []
    runs = run_dirs(study, arm)
    if code == 0 and study.sweep_resolutions and runs:
        phases = run_phases(load_config(str(arm.config), list(arm.overrides)))
        checkpoints = [runs[-1] / "checkpoints" / final_checkpoint_name(p.name) for p in phases
                       if not (arm.source and p.name == "train")]  # a source's training phase has its own sweep
        out = study.folder / "sweeps" / f"{arm.name}.json"
        sweep_code, _, _, stopped = _run(sweep_command(study, checkpoints, out), log)
        if stopped or sweep_code == EXIT_INTERRUPTED:
            raise Interrupted(f"study {study.name!r} interrupted in the sweep of arm {arm.name!r}; run the same "
                              "command again to continue")
        if sweep_code != 0:
            code = sweep_code
        else:
            sweep = [{k: r[k] for k in ("phase", "weights", "resolution", "top1", "top5")}
                     for r in json.loads(out.read_text())]
    record = arm_record(study, arm, code, seconds, peak, sweep)
    _write_json(study.record_path(arm), record)
    return record


def _write_json(path: Path, value: Any) -> None:
    """Atomically: a record exists only once it is complete (its presence means the arm is done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def finished(study: Study, arm: Arm) -> bool:
    """An arm is done once its record says it succeeded; a failed one is run again (``--resume auto``)."""
    path = study.record_path(arm)
    return path.is_file() and json.loads(path.read_text())["status"] == "ok"


def records(study: Study) -> Iterator[Dict[str, Any]]:
    for arm in study.arms:
        path = study.record_path(arm)
        if path.is_file():
            record = json.loads(path.read_text())
            record["top1"] = headline(record, study.test_resolution)  # as this version of the tool reads it
            add_steady_time(study, record)
            yield record


def add_steady_time(study: Study, record: Dict[str, Any]) -> None:
    """``<phase>_images_per_s_median`` (the median of the run's logged step-window rates, ``images_per_s`` in
    ``metrics.jsonl``) and ``training_seconds_steady`` (each phase's images at that rate): the training time with
    the windows in which other work slowed the machine left out (docs/results.md, "Time on a shared machine")."""
    dirs = {"train": record["run_dir"], "finetune": record["run_dir"]}
    if record.get("finetune_from"):
        dirs["train"] = json.loads((study.folder / "arms" / f"{record['finetune_from']}.json").read_text())["run_dir"]
    total = 0.0
    for phase, run_dir in dirs.items():
        images = record.get(f"{phase}_images")
        metrics = Path(run_dir) / "metrics.jsonl" if run_dir else None
        if not images or metrics is None or not metrics.is_file():
            continue
        rates = [line["images_per_s"] for line in map(json.loads, metrics.read_text().splitlines())
                 if line.get("phase") == phase and "images_per_s" in line]
        if rates:
            record[f"{phase}_images_per_s_median"] = round(statistics.median(rates), 1)
            total += images / statistics.median(rates)
    record["training_seconds_steady"] = round(total, 1) if total else None


# ------------------------------------------------------------------------------------------------ reports
CSV_COLUMNS = ("arm", "run", "seed", "status", "variant", "train_resolution", "finetune_resolution",
               "finetune_first_trainable", "micro_batch_size", "epochs", "finetune_epochs", "top1",
               "training_seconds", "training_seconds_steady", "train_seconds", "finetune_seconds",
               "train_images_per_s", "train_images_per_s_median", "finetune_images_per_s_median", "training_gmacs",
               "images_seen", "peak_rss_mib", "wall_seconds", "run_dir")


def write_results(study: Study, rows: List[Dict[str, Any]]) -> None:
    """``results.jsonl`` (whole records) and ``results.csv`` (one line per run, every validation as a column)."""
    with open(study.folder / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    val_keys = sorted({k for r in rows for k in r["val"]}, key=_val_order)
    with open(study.folder / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(CSV_COLUMNS) + [f"val/{k}" for k in val_keys])
        for r in rows:
            writer.writerow([r.get(c) for c in CSV_COLUMNS] + [r["val"].get(k) for k in val_keys])


def _val_order(key: str) -> Tuple[int, str, int]:
    phase, _, rest = key.partition("/")
    name, _, res = rest.rpartition("@")
    return (0 if phase == "train" else 1, name, int(res))


def pareto(points: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by increasing cost."""
    front: List[Tuple[float, float]] = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def plot(study: Study, rows: List[Dict[str, Any]]) -> List[Path]:
    """``figure1.png`` (top-1 against training time and training MACs, Pareto front marked) and ``fixres.png``
    (top-1 against test resolution, each arm before and after its fine-tune)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok" and r["top1"] is not None]
    arms = list(dict.fromkeys(r["arm"] for r in done))
    colours = {a: plt.get_cmap("tab20")(i % 20) for i, a in enumerate(arms)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "training_seconds_steady", "training time at the median step rate (s)"),
                           (axes[1], "training_gmacs", "training forward MACs (G)")):
        for arm in arms:
            mine = [r for r in done if r["arm"] == arm]
            ax.scatter([r[key] for r in mine], [100 * r["top1"] for r in mine], color=colours[arm], label=arm, s=40)
        front = pareto([(r[key], 100 * r["top1"]) for r in done])
        ax.plot([c for c, _ in front], [a for _, a in front], drawstyle="steps-post", color="black", alpha=0.6,
                lw=1, marker="o", ms=11, mfc="none", label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel(f"top-1 at {study.test_resolution} px (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{study.name}: accuracy against training cost (each point one run)")
    fig.tight_layout()
    figure1 = study.folder / "figure1.png"
    fig.savefig(figure1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for r in done:
        for phase in ("train", "finetune"):
            mine = sorted((s["resolution"], 100 * s["top1"]) for s in r["sweep"] if s["phase"] == phase)
            if mine:
                weights = next(s["weights"] for s in r["sweep"] if s["phase"] == phase)
                before = bool(r["finetune_resolution"]) and phase == "train"
                what = "before fine-tune" if before else "final"
                ax.plot(*zip(*mine), "--" if before else "-", marker="o", ms=3, color=colours[r["arm"]],
                        label=f"{r['run']} ({what}, {weights} weights)")
    ax.set_xlabel("test resolution (px)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(f"{study.name}: accuracy against test resolution")
    fig.tight_layout()
    fixres = study.folder / "fixres.png"
    fig.savefig(fixres, dpi=110)
    plt.close(fig)
    return [figure1, fixres]


def report(study: Study) -> List[Dict[str, Any]]:
    rows = list(records(study))
    if rows:
        write_results(study, rows)
        (study.folder / "results.md").write_text(markdown_table(study, rows))
        plot(study, rows)
    return rows


def markdown_table(study: Study, rows: List[Dict[str, Any]]) -> str:
    """Every run as one row of a Markdown table (``results.md``; docs/results.md quotes it)."""
    res = study.test_resolution
    head = ["run", "variant", "px (train → fine-tune)", "micro-batch", "epochs (+ fine-tune)", f"top-1 @{res}",
            f"top-5 @{res}", f"top-1 @{res} before fine-tune", "best of sweep", "training s (wall)",
            "training s (median rate)", "train img/s (wall, median window)", "training G MACs", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok" or r["top1"] is None:
            lines.append(f"| {r['run']} | {r['variant']} | failed (exit {r['exit_code']}) |" + " |" * (len(head) - 3))
            continue
        last = "finetune" if r["finetune_resolution"] else "train"
        top5 = r["val"].get(f"{last}/epoch_avg/top5@{res}", r["val"].get(f"{last}/top5@{res}"))
        before = r["val"].get(f"train/epoch_avg/top1@{res}", r["val"].get(f"train/top1@{res}")) \
            if r["finetune_resolution"] else None
        best = max(r["sweep"], key=lambda s: s["top1"], default=None)
        px = f"{r['train_resolution']} → {r['finetune_resolution']}" if r["finetune_resolution"] else \
            str(r["train_resolution"])
        trainable = f", from {r['finetune_first_trainable']}" if r["finetune_resolution"] else ""
        cells = [r["run"], r["variant"], px + trainable, str(r["micro_batch_size"]),
                 f"{r['epochs']}" + (f" + {r['finetune_epochs']}" if r["finetune_epochs"] else ""),
                 f"{100 * r['top1']:.2f}", f"{100 * top5:.2f}" if top5 is not None else "",
                 f"{100 * before:.2f}" if before is not None else "",
                 f"{100 * best['top1']:.2f} @{best['resolution']} ({best['phase']})" if best else "",
                 f"{r['training_seconds']:.0f}", f"{r['training_seconds_steady'] or 0:.0f}",
                 f"{r['train_images_per_s']}, {r.get('train_images_per_s_median', '')}",
                 f"{r['training_gmacs']:.0f}", str(r["peak_rss_mib"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(rows: List[Dict[str, Any]]) -> List[str]:
    """One line per arm (mean ± half-range over seeds), for the console and docs/results.md."""
    lines = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm and r["status"] == "ok" and r["top1"] is not None]
        if not mine:
            codes = [r["exit_code"] for r in rows if r["arm"] == arm]
            lines.append(f"{arm}: failed (exit {', '.join(map(str, codes))})" if any(codes) else
                         f"{arm}: no top-1 at the test resolution (not validated or swept there)")
            continue
        acc = [100 * r["top1"] for r in mine]
        secs = [r["training_seconds_steady"] or r["training_seconds"] for r in mine]
        spread = f" ± {(max(acc) - min(acc)) / 2:.1f}" if len(acc) > 1 else ""
        lines.append(f"{arm}: top-1 {sum(acc) / len(acc):.1f}{spread} % over {len(acc)} seed(s), training "
                     f"{sum(secs) / len(secs):.0f} s at the median step rate, {mine[0]['training_gmacs']:.0f} G "
                     "forward MACs")
    return lines


# ------------------------------------------------------------------------------------------------ command line
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.study", description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="study file (configs/studies/*.yml)")
    parser.add_argument("--out", type=Path, help="study folder; default studies/<name>")
    parser.add_argument("--arms", help="comma-separated arm (or run) names to run now; default all")
    parser.add_argument("--list", action="store_true", help="print each run's command and state; run nothing")
    parser.add_argument("--report", action="store_true", help="write results and plots from the records; run nothing")
    args = parser.parse_args(argv)
    failed: List[str] = []

    def job() -> None:
        study = load_study(args.study, args.out)
        chosen = study.arms
        if args.arms:
            wanted = set(args.arms.split(","))
            unknown = wanted - {a.name for a in study.arms} - {a.arm for a in study.arms}
            if unknown:
                raise ConfigError(f"--arms: {sorted(unknown)[0]!r} is not an arm of {args.study} (arms: "
                                  f"{', '.join(dict.fromkeys(a.arm for a in study.arms))})")
            chosen = [a for a in study.arms if a.name in wanted or a.arm in wanted]
        if args.list:
            for arm in chosen:
                state = "done" if finished(study, arm) else ("started" if run_dirs(study, arm) else "new")
                print(f"[{state}] {arm.name}: {' '.join(train_command(study, arm))}")
            return
        if not args.report:
            study.folder.mkdir(parents=True, exist_ok=True)
            for arm in chosen:
                if finished(study, arm):
                    print(f"{arm.name}: done, skipped ({study.record_path(arm)})", flush=True)
                    continue
                if arm.source and not finished(study, arm.source):
                    print(f"{arm.name}: not run, it fine-tunes {arm.source.name}, which has not finished", flush=True)
                    failed.append(f"{arm.name} (waits for {arm.source.name})")
                    continue
                print(f"{arm.name}: running, log {study.log_path(arm)}", flush=True)
                record = run_arm(study, arm)
                top1 = f"top-1 {100 * record['top1']:.2f} %" if record["top1"] is not None else "no result"
                print(f"{arm.name}: {record['status']} (exit {record['exit_code']}), {top1}, training "
                      f"{record['training_seconds']} s, wall {record['wall_seconds']} s", flush=True)
                report(study)
        rows = report(study)
        for line in summarise(rows):
            print(line)
        failed.extend(f"{r['run']} (exit {r['exit_code']}, log {study.folder / 'logs' / (r['run'] + '.log')})"
                      for r in rows if r["status"] != "ok")
        if rows:
            print(f"results: {study.folder / 'results.csv'}, plots: {study.folder / 'figure1.png'}, "
                  f"{study.folder / 'fixres.png'}")

    code = run_guarded(job)
    if code == 0 and failed:
        print(f"error: {len(failed)} run(s) failed: {'; '.join(failed)}; fix and rerun (failed runs are retried, "
              "finished ones skipped)", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
