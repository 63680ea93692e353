"""IPU backend: PopTorch training and inference models, pipelined and replicated, over poprun pods.

What one phase does (see ``docs/ipu.md`` for the launch side):

- Each phase arrives with its IPU plan (``Phase.ipu``), resolved and checked against the config and the poprun
  launch before the first step (:mod:`train.ipu_plan`); the backend checks nothing again.
- The backend works on its own copy of the task (:func:`copy.deepcopy`): precision changes (half weights for
  16.16, half compute for 16.32), ``poptorch.BeginBlock`` pipeline annotations, recomputation checkpoints and
  PopTorch's wrapping stay off the trainer's host model, which keeps fp32 weights that checkpoints, weight
  averages and CPU/GPU runs can use. :meth:`IPUBackend.host_model` copies the device weights into it on demand.
- Training: ``poptorch.trainingModel`` with the loss computed in ``forward`` and marked by
  ``poptorch.identity_loss(loss, reduction="none")`` (the task already reduces it to the micro-batch mean, so
  no further reduction; accumulation and replicas are averaged by ``accumulationAndReplicationReductionType
  (Mean)``, which makes one optimizer step equal the torch backend's mean over the global batch).
- Validation: a separate ``poptorch.inferenceModel`` per resolution with its own options (accumulation 1, every
  output); the training model is detached while it runs. It returns per-sample loss and hits, so the padding
  of the last host batch (``labels == -1``) is dropped on the host and every sample counts exactly once.
- Optimizer state: checkpoints hold the device's optimizer state, read through PopART's optimizer-state streams;
  ``checkpoint.optimizer_state: false`` lets a phase that never re-attaches its training model drop them and
  save weights only (see :meth:`IPUBackend._use` and ``docs/ipu.md``).
- Data: ``poptorch.DataLoader`` (``AsyncRebatched`` by default) over this instance's shard of the seeded,
  resumable order of :mod:`data.loader`; one host call is micro x device iterations x accumulation x local
  replicas samples and performs ``device_iterations`` optimizer steps.
- Pods: under ``poprun`` (``popdist.isPopdistEnvSet()``), options come from ``popdist.poptorch.Options``, the
  seed and initial weights are broadcast from instance 0 with Horovod, metrics are summed with Horovod, and
  ``rank``/``world_size`` are the instance index/count (the trainer logs and checkpoints on instance 0).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from data import ImageDataset, ShardedBatchSampler
from data.base import SampleKey
from data.loader import seed_worker
from ipu_options import distributed
from ipu_options.apply import build_options
from ipu_options.pipeline import annotate_pipeline, prepare_precision
from ipu_options.plan import IpuPhasePlan

from ..config import Config
from ..optim import hyperparameters
from ..phases import Phase
from ..task import ClassificationTask
from .base import Backend, EvalStats, OptimizerFactory, StepStats
from .torch_backend import BackendError

DATALOADER_MODES = {"sync": "Sync", "async": "Async", "async_rebatched": "AsyncRebatched"}
#: ``optimizer.name`` -> PopTorch class, its accumulator-type arguments, and fixed extras (weight decay is per group).
IPU_OPTIMIZERS: Dict[str, Tuple[str, Tuple[str, ...], Dict[str, Any]]] = {
    "rmsprop_tf": ("RMSprop", ("accum_type", "first_order_momentum_accum_type", "second_order_momentum_accum_type"),
                   {"use_tf_variant": True}),
    "sgd": ("SGD", ("accum_type", "velocity_accum_type"), {}),
    "adamw": ("AdamW", ("accum_type", "first_order_momentum_accum_type", "second_order_momentum_accum_type"), {}),
}


def import_poptorch():
    """The ``poptorch`` module, or a :class:`BackendError` that says how to get it."""
    try:
        return importlib.import_module("poptorch")
    except (ImportError, AssertionError) as err:  # AssertionError: poptorch built for another torch version
        raise BackendError(
            "train.backend: 'ipu' needs PopTorch, which ships only with the Poplar SDK (not on PyPI): enable the "
            "SDK and pip install its poptorch wheel (see docs/ipu.md); import failed with: "
            f"{type(err).__name__}: {err}") from None


# --------------------------------------------------------------------------------------------- data views
class _KeyedView(Dataset):
    """Samples ``indices`` of ``dataset`` in order, keyed by (seed, epoch) for reproducible augmentation."""

    def __init__(self, dataset: ImageDataset, indices: np.ndarray, seed: int, epoch: int):
        self.dataset, self.indices, self.seed, self.epoch = dataset, indices, seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[SampleKey(int(self.indices[i]), self.seed, self.epoch)]


class _PaddedView(Dataset):
    """``indices`` of ``dataset`` then copies of a sample with label -1 up to ``length`` (masked later)."""

    def __init__(self, dataset: ImageDataset, indices: np.ndarray, length: int):
        self.dataset, self.indices, self.length = dataset, indices, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if i < len(self.indices):
            return self.dataset[int(self.indices[i])]
        image, _ = self.dataset[int(self.indices[0]) if len(self.indices) else 0]
        return image, -1


class _OneEpoch:
    """Iterates a ``poptorch.DataLoader`` once and then stops its worker (asynchronous loaders would otherwise
    keep prefetching the data set again, taking host CPU from validation or the next phase)."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        try:
            yield from self.loader
        finally:
            self.loader.terminate()


# ------------------------------------------------------------------------------------------ model wrappers
class PerSampleEval(nn.Module):
    """Inference forward: per-sample loss (label-smoothed, as in training) and top-1/top-5 hits, for one input
    resolution.

    The resolution is part of the module's ``repr``: PopTorch names the compile lock it keeps in a shared
    executable cache after ``repr(model)`` (docs/ipu.md, "Executable cache"), so each validation executable gets
    its own lock instead of every resolution sharing one."""

    def __init__(self, task: ClassificationTask, resolution: int):
        super().__init__()
        self.task, self.resolution = task, resolution

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}"

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.task
        logits = t.model(t.normalize(images)).float()
        top1, top5 = t.hits(logits, labels)
        return t.per_sample_loss(logits, t.targets(labels)), top1.float(), top5.float()


def _identity_loss(poptorch, loss: torch.Tensor) -> torch.Tensor:
    # The task returns the micro-batch mean already: "none" marks it as the loss without reducing it again.
    return poptorch.identity_loss(loss, reduction="none")


class IPUBackend(Backend):
    def __init__(self, cfg: Config, phase: Phase, task: ClassificationTask, make_optimizer: OptimizerFactory, *,
                 offline: bool = False) -> None:
        built_for = getattr(task.model, "norm_impl", "modules")
        if built_for != "modules":  # PopART differentiates the traced graph itself, never a custom backward
            raise BackendError(f"the IPU runs the norm units as plain modules, but this model's are {built_for}: "
                               "build it for the IPU (train.backends.build_network)")
        self.poptorch = import_poptorch()
        self.cfg, self.phase, self.offline = cfg, phase, offline
        plan = phase.ipu
        assert plan is not None, "phases come from train.run_plan.plan_launch, which checks their IPU plans"
        self.popdist = distributed.popdist_module()
        if self.popdist is not None:
            self.rank = int(self.popdist.getInstanceIndex())
            self.world_size = int(self.popdist.getNumInstances())
            plan = dataclasses.replace(plan, seed=distributed.broadcast_int(plan.seed))
            distributed.broadcast_weights(task.model)
        self.plan: IpuPhasePlan = plan
        self.host_task = task
        self._host = task.model
        self.data = cfg.data

        # The IPU copy: precision, pipeline and PopTorch's wrapping happen here, not on the host model.
        self.ipu_task: ClassificationTask = copy.deepcopy(task)
        self.ipu_task.mark_loss = functools.partial(_identity_loss, self.poptorch)
        self.ipu_task.channels_last = False
        self.ipu_task.dtype = prepare_precision(self.ipu_task.model, plan.precision, plan.settings.norm_precision)
        self.checkpointed = annotate_pipeline(self.ipu_task.model, plan.stages, self.poptorch)

        self.train_opts = build_options(self.poptorch, plan, training=True, popdist=self.popdist, offline=offline)
        self.eval_opts = build_options(self.poptorch, plan, training=False, popdist=self.popdist, offline=offline)
        half = plan.precision != "fp32"
        self.loss_scale: Optional[float] = float(cfg.precision.loss_scale) if half else None
        self.optimizer = self._ipu_optimizer(make_optimizer(self.global_batch))
        self._lr = self.optimizer.param_groups[0]["lr"]
        self.ipu_task.train()
        self.training_model = self.poptorch.trainingModel(self.ipu_task, options=self.train_opts,
                                                          optimizer=self.optimizer)
        self.eval_models: Dict[int, Any] = {}
        self._loaders: List[Any] = []
        self._device_version = 0  # bumped by every train call: the device weights are newer than the host's
        self._host_version = 0

    # ------------------------------------------------------------------------------------------ set-up
    def _ipu_optimizer(self, torch_opt: torch.optim.Optimizer) -> Any:
        """The PopTorch optimizer equivalent to the trainer's, over the IPU copy's parameters: the same
        hyperparameters (:func:`train.optim.hyperparameters`), PopTorch's class, accumulator types and extras."""
        names = {id(p): n for n, p in self.host_task.named_parameters()}
        ipu_params = dict(self.ipu_task.named_parameters())
        groups = [{"params": [ipu_params[names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
                  for g in torch_opt.param_groups if g["params"]]  # (a frozen phase may leave a group empty)
        cfg = self.phase.optimizer
        kwargs = hyperparameters(cfg, self.global_batch)
        if kwargs.pop("nesterov", False):
            kwargs["nesterov"] = True  # passed only when set: an explicit argument becomes a variable (docs/ipu.md)
        class_name, accumulators, extras = IPU_OPTIMIZERS[cfg.name]
        accum = torch.float16 if self.plan.settings.accum_type == "half" else torch.float32
        kwargs.update({name: accum for name in accumulators}, weight_decay=0.0, **extras)
        if self.loss_scale is not None:
            kwargs["loss_scaling"] = self.loss_scale  # static; PopTorch unscales before the update
        if cfg.clip_grad_norm is not None:
            # PopTorch's SGD and AdamW clip the global norm on the device; its RMSprop cannot (refused earlier,
            # train/ipu_plan.py).
            kwargs["max_grad_norm"] = float(cfg.clip_grad_norm)
        return getattr(self.poptorch.optim, class_name)(groups, **kwargs)

    # ----------------------------------------------------------------------------------------- geometry
    def host_model(self) -> nn.Module:
        """The host network with the device's current weights (copied back only when they changed)."""
        if self._host_version != self._device_version:
            if self.training_model.isCompiled():
                self.training_model.copyWeightsToHostIfNeeded()  # a no-op after a detach, which syncs
            self._host.load_state_dict(_plain(self.ipu_task.model.state_dict()))
            self._host_version = self._device_version
        return self._host

    def log_metrics(self) -> Dict[str, float]:
        return {"loss_scale": self.loss_scale} if self.loss_scale is not None else {}

    @property
    def global_batch(self) -> int:
        return self.plan.global_batch

    @property
    def micro_batches_per_call(self) -> int:
        return self.plan.micro_batches_per_call

    @property
    def steps_per_call(self) -> int:
        return self.plan.device_iterations

    def calls_per_epoch(self, dataset: ImageDataset) -> int:
        return len(dataset) // (self.plan.samples_per_call * self.world_size)

    # -------------------------------------------------------------------------------------------- data
    def _dataloader(self, options: Any, view: Dataset, micro: int, seed: int) -> Any:
        poptorch = self.poptorch
        settings = self.plan.settings
        mode = getattr(poptorch.DataLoaderMode, DATALOADER_MODES[settings.dataloader_mode])
        extra: Dict[str, Any] = {}
        if settings.dataloader_mode == "async_rebatched" and settings.rebatched_worker_size is not None:
            extra["rebatched_worker_size"] = int(settings.rebatched_worker_size)
        loader = poptorch.DataLoader(options, view, batch_size=int(micro), shuffle=False,
                                     num_workers=self.data.workers, drop_last=True,
                                     persistent_workers=False, auto_distributed_partitioning=False, mode=mode,
                                     worker_init_fn=functools.partial(seed_worker, seed, self.rank), **extra)
        self._loaders.append(loader)
        return _OneEpoch(loader)

    def _terminate_loaders(self) -> None:
        for loader in self._loaders:
            loader.terminate()
        self._loaders.clear()

    def train_loader(self, dataset: ImageDataset, *, seed: int, epoch: int, start_call: int) -> Iterable:
        """This instance's shard of the epoch's order (see :mod:`data.loader`), one host call per batch."""
        self._terminate_loaders()
        sampler = ShardedBatchSampler(len(dataset), self.plan.samples_per_call, shuffle=True, seed=seed,
                                      rank=self.rank, world_size=self.world_size, drop_last=True)
        if sampler.batches_per_epoch() == 0:
            raise BackendError(f"{dataset} has fewer samples per instance than one host call "
                               f"({self.plan.samples_per_call} = micro x device iterations x accumulation x "
                               "local replicas); use a smaller geometry or more data")
        sampler.set_epoch(epoch, start_call)
        indices = np.fromiter((key.index for batch in sampler for key in batch), dtype=np.int64)
        return self._dataloader(self.train_opts, _KeyedView(dataset, indices, seed, epoch),
                                self.plan.micro_batch_size, seed)

    def eval_loader(self, dataset: ImageDataset) -> Iterable:
        """Every validation sample once over all instances; the last batches are padded with label -1.

        Every instance makes the same number of host calls (the shard of the largest instance, rounded up to a
        call), because the stop protocol agrees across instances before each validation batch (train/stop.py)."""
        per_call = self.plan.eval_samples_per_call
        indices = np.arange(len(dataset), dtype=np.int64)[self.rank::self.world_size]
        largest = -(-len(dataset) // self.world_size)
        length = -(-largest // per_call) * per_call
        return self._dataloader(self.eval_opts, _PaddedView(dataset, indices, length),
                                self.plan.eval_micro_batch_size, self.cfg.train.seed)

    # ------------------------------------------------------------------------------------------- calls
    def _use(self, executor: Any) -> None:
        """Attach ``executor`` (compiled ones only; a first call attaches by itself), detach the others.

        Optimizer state across a detach: with PopART's optimizer-state streams (``plan.keep_optimizer_state``),
        ``detachFromDevice`` copies the weights and the optimizer state to the host and ``attachToDevice`` uploads
        both again, so validating in between loses nothing. Without the streams the state exists only on the
        device, and the IPUs run the inference executable in between: re-attaching could not restore it. The plan
        therefore removes the streams only for phases that do not validate before their end, where the training
        model is never attached again once detached; the check below stops a loop that would do it anyway.
        """
        for other in [self.training_model, *self.eval_models.values()]:
            if other is not executor and other.isCompiled() and other.isAttachedToDevice():
                other.detachFromDevice()
        if executor.isCompiled() and not executor.isAttachedToDevice():
            if executor is self.training_model and not self.plan.keep_optimizer_state:
                raise BackendError(f"phase {self.phase.name!r} runs without PopART's optimizer-state streams "
                                   "(checkpoint.optimizer_state: false), so re-attaching the training model after "
                                   "validation would restart the optimizer state; set checkpoint.optimizer_state: "
                                   "true")
            executor.attachToDevice()

    def train_call(self, images: torch.Tensor, labels: torch.Tensor, mix: Optional[torch.Tensor]) -> StepStats:
        self._use(self.training_model)
        self.ipu_task.train()
        args = (images, labels) if mix is None else (images, labels, mix)
        loss, top1, _ = self.training_model(*args)
        self._device_version += 1
        loss_mean, hits = loss.float().mean(), top1.float().sum()
        if self.world_size > 1:
            # Every instance reports the job-wide mean loss and its share of the job's hits, so the trainer's
            # top1 / samples is the job's accuracy.
            total = distributed.sum_over_instances(torch.stack([loss_mean, hits]).double())
            loss_mean, hits = total[0] / self.world_size, total[1] / self.world_size
        return StepStats(loss=float(loss_mean), top1=float(hits), samples=len(labels),
                         steps=self.plan.device_iterations)

    def _eval_model(self, resolution: int) -> Any:
        if resolution not in self.eval_models:
            wrapper = PerSampleEval(self.ipu_task, resolution)
            self.eval_models[resolution] = self.poptorch.inferenceModel(wrapper, options=self.eval_opts)
        return self.eval_models[resolution]

    @torch.no_grad()
    def eval_call(self, images: torch.Tensor, labels: torch.Tensor) -> EvalStats:
        executor = self._eval_model(int(images.shape[-1]))
        self._use(executor)
        self.ipu_task.eval()
        try:
            loss, top1, top5 = executor(images, labels.clamp(min=0))
        finally:
            self.ipu_task.train()
        valid = (labels >= 0).to(torch.float64)
        return EvalStats(loss_sum=float((loss.double() * valid).sum()), top1=float((top1.double() * valid).sum()),
                         top5=float((top5.double() * valid).sum()), samples=int(valid.sum()))

    # ------------------------------------------------------------------------------------ weights, state
    def set_weights(self, state: Dict[str, torch.Tensor]) -> None:
        self.host_model()  # bring the host copy up to date first, so nothing newer is lost on the device side
        self._host.load_state_dict(state)
        self.ipu_task.model.load_state_dict(state)
        for executor in [self.training_model, *self.eval_models.values()]:
            if executor.isCompiled() and executor.isAttachedToDevice():
                executor.copyWeightsToDevice()

    def set_lr(self, lr: float) -> None:
        """``setOptimizer`` only when the value changes: each call re-sends the optimizer's scalars."""
        if lr == self._lr:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.training_model.setOptimizer(self.optimizer)
        self._lr = lr

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer state as the device holds it (PopTorch reads it back through the optimizer-state
        streams), or ``None`` in a phase without those streams: its checkpoints hold the weights only."""
        optimizer = self.optimizer.state_dict() if self.plan.keep_optimizer_state else None
        return {"kind": "ipu", "optimizer": optimizer, "lr": self._lr}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("kind") != "ipu":
            warnings.warn("the checkpoint's optimizer state was written by another backend and PopTorch's format "
                          "differs; the optimizer starts afresh (the weights are restored)", stacklevel=2)
            return
        saved = state.get("optimizer")
        if saved is not None and self.plan.keep_optimizer_state:
            self.optimizer.load_state_dict(saved)
        else:
            why = ("the checkpoint holds weights only (written with checkpoint.optimizer_state: false)"
                   if saved is None else
                   "this phase runs without PopART's optimizer-state streams (checkpoint.optimizer_state: false), "
                   "so the checkpoint's optimizer state cannot be uploaded")
            warnings.warn(f"{why}: the optimizer's running averages (momentum, RMSProp's mean square) restart from "
                          "their initial values, so the steps after this resume differ from an uninterrupted run; "
                          "set checkpoint.optimizer_state: true to keep them", stacklevel=2)
        self.set_lr(state.get("lr", self._lr))

    def sum_across_processes(self, values: torch.Tensor) -> torch.Tensor:
        return distributed.sum_over_instances(values)

    # --------------------------------------------------------------------------------------- lifetime
    def compile(self) -> None:
        """Compile the training model and one inference model per validation resolution (no run)."""
        plan, cfg = self.plan, self.cfg
        channels = cfg.model.in_channels
        n = plan.samples_per_call
        args = [torch.zeros(n, channels, plan.resolution, plan.resolution, dtype=torch.uint8),
                torch.zeros(n, dtype=torch.int64)]
        if self.phase.cutmix_lambda is not None or any(s.mixup_alpha > 0 for s in self.phase.stages):
            args.append(torch.zeros(n, 5))
        self.training_model.compile(*args)
        m = plan.eval_samples_per_call
        for res in self.phase.val_resolutions:
            executor = self._eval_model(int(res))
            self.ipu_task.eval()
            executor.compile(torch.zeros(m, channels, res, res, dtype=torch.uint8), torch.zeros(m, dtype=torch.int64))
            self.ipu_task.train()

    def close(self) -> None:
        """Copy the final weights to the host model, stop the loaders and free the IPUs."""
        try:
            if not self.offline:
                self.host_model()  # the final weights reach the trainer's model
        finally:
            self._terminate_loaders()
            for executor in [*self.eval_models.values(), self.training_model]:
                if executor.isCompiled():
                    executor.destroy()
            self.eval_models.clear()


def _plain(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Plain tensors (PopTorch wraps parameter classes) for ``load_state_dict`` into the host model."""
    return {k: v.detach().as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
