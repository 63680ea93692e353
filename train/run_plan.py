"""Everything about a run that can be checked before its first step, checked in one pass.

:func:`plan_run` needs no files and no devices: it builds every phase of the run (resolution, batch geometry,
optimizer, frozen layers), checks each phase's ``first_trainable`` against the model's split points, and checks
the backend's settings — the torch backend's precision and device, or every phase's IPU plan
(:mod:`train.ipu_plan`). :func:`plan_launch` adds what depends on how this process was started (poprun's
geometry on IPUs). :func:`check_data` then opens both splits, checks that every phase's host call fits the
training set, and decodes the first batch of each split, so a wrong path, an empty folder or an unreadable data
set stops the run before any work, with one line naming the key or file.

Shared by ``python -m train`` (and its ``--print-config``), ``python -m train.finetune`` and
``python -m ipu_options``: one place for the checks that span sections.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import List, Tuple

from data import ImageDataset, SampleKey, build_dataset, build_transform
from models.splits import split_point_names

from .backends.torch_backend import check_torch_settings
from .config import Config, ConfigError
from .ipu_plan import launch_phases, plan_phases
from .phases import Phase, finetune_phase, run_phases


@dataclass(frozen=True)
class RunPlan:
    """A validated config and the phases it runs (on ``train.backend: ipu`` each with its IPU plan)."""

    cfg: Config
    phases: Tuple[Phase, ...]

    def samples_per_call(self, index: int, world_size: int) -> int:
        """Training samples one host call takes over the whole job in phase ``index``."""
        phase = self.phases[index]
        if phase.ipu is not None:  # micro x device iterations x accumulation x replicas
            return phase.ipu.samples_per_call * phase.ipu.instances
        return phase.micro_batch_size * phase.gradient_accumulation * world_size


def _phase_key(phase: Phase, key: str) -> str:
    """Where a phase's batch setting comes from: ``finetune.<key>`` when the fine-tune phase sets its own."""
    return f"finetune.{key}" if phase.name == "finetune" else f"train.{key}"


def plan_run(cfg: Config, only_finetune: bool = False) -> RunPlan:
    """The run's phases as the recipe describes them, with every check that needs neither data nor devices;
    raises ConfigError, BackendError or (IPU settings) PlanError."""
    phases = (finetune_phase(cfg),) if only_finetune else tuple(run_phases(cfg))
    names = split_point_names(cfg.model)
    for phase in phases:
        if phase.first_trainable is not None and phase.first_trainable not in names:
            raise ConfigError(f"finetune.first_trainable: {phase.first_trainable!r} is not a split point of "
                              f"{cfg.model.name}; valid names: {', '.join(names)}")
    if cfg.train.backend == "torch":
        check_torch_settings(cfg.train.device, cfg.precision.compute)
        return RunPlan(cfg, phases)
    return RunPlan(cfg, plan_phases(cfg, phases))


def plan_launch(cfg: Config, only_finetune: bool = False) -> RunPlan:
    """:func:`plan_run` for a run that starts here: on IPUs every phase's plan fitted to this process's launch
    (:func:`train.ipu_plan.launch_phases`), so a launch that does not match the recipe stops before any step."""
    plan = plan_run(cfg, only_finetune)
    if cfg.train.backend != "ipu":
        return plan
    return dataclasses.replace(plan, phases=launch_phases(plan.phases))


def launch_world_size() -> int:
    """Processes of a torchrun launch (``WORLD_SIZE``), known before the process group starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_data(plan: RunPlan, world_size: int) -> Tuple[ImageDataset, ImageDataset]:
    """Both splits, opened and checked: each phase's host call fits the training set, and the first batch of
    each split decodes. Raises DataError (naming the file) or ConfigError (naming the batch keys)."""
    cfg = plan.cfg
    train_set = build_dataset(cfg.data, "train", build_transform("eval", 32, cfg.data))
    val_set = build_dataset(cfg.data, "val", build_transform("eval", 32, cfg.data))
    check_classes(cfg.model.num_classes, train_set)
    for index, phase in enumerate(plan.phases):
        needed = plan.samples_per_call(index, world_size)
        if needed > len(train_set):
            what = ("micro x device iterations x accumulation x replicas" if phase.ipu is not None else
                    f"{_phase_key(phase, 'micro_batch_size')} {phase.micro_batch_size} x "
                    f"{_phase_key(phase, 'gradient_accumulation')} {phase.gradient_accumulation} x "
                    f"{world_size} process(es)")
            raise ConfigError(f"phase {phase.name!r}: one step takes {needed} samples ({what}), more than the "
                              f"{len(train_set)} of {train_set}; the phase would run no step. Use a smaller batch "
                              "or more data")
    first = plan.phases[0]
    stage = first.stage(0)
    _decode(train_set.with_transform(build_transform(first.preprocessing, stage.resolution, cfg.data,
                                                     stage.randaugment)), first.micro_batch_size, cfg.train.seed)
    _decode(val_set.with_transform(build_transform("eval", first.val_resolutions[0], cfg.data)),
            cfg.train.val_batch_size, cfg.train.seed)
    return train_set, val_set


def check_classes(num_classes: int, train_set: ImageDataset) -> None:
    """The classifier has an output for every class of the data: fewer is an error (a label would have no output),
    more a one-line warning (outputs that are never a label: the ImageNet default left on a small data set)."""
    found = train_set.num_classes
    if found > num_classes:
        raise ConfigError(f"model.num_classes {num_classes} is fewer than the {found} classes of {train_set}; set "
                          f"model.num_classes={found}")
    if found < num_classes:
        warnings.warn(f"model.num_classes {num_classes} but {train_set} has {found} classes: {num_classes - found} "
                      f"outputs will never be a label; set model.num_classes={found} unless that is meant",
                      stacklevel=2)


def _decode(dataset: ImageDataset, count: int, seed: int) -> List[object]:
    """Decode and transform the first ``count`` samples (in file order), as the first batch would."""
    return [dataset[SampleKey(i, seed, 0)] for i in range(min(count, len(dataset)))]
