"""The ``ipu`` config section: replication, device iterations, the pipeline plan and PopTorch settings.

Read by ``ipu_options`` (option plans, pipeline annotation) and the IPU backend. The main training phase uses
``ipu:`` itself; the fine-tune phase uses ``ipu:`` with the keys set in ``ipu.finetune:`` replacing it (a null or
missing key keeps the main phase's value; a ``pipeline`` given there replaces the whole list). That is the one
override rule of every phase section, so ``ipu.finetune`` is generated where the rule lives
(``train.config.overrides_of``, from :data:`PHASE_FIELDS`) and merged by ``train/ipu_plan.py``. Micro batch and
gradient accumulation are not here: they are ``train.micro_batch_size``/``train.gradient_accumulation`` and
``finetune.micro_batch_size``/``finetune.gradient_accumulation``, the same keys every backend reads.

Example (the paper's B0 G16-LN+PN half-resolution recipe on a POD16, fine-tuned on 16 single-IPU replicas)::

    ipu:
      replicas: 8              # in the whole job; poprun --num-replicas
      instances: 4             # poprun --num-instances (host processes)
      pipeline:
        - {start: stem, ipu: 0, available_memory_proportion: 0.15, recompute: true}
        - {start: blocks.3.1, ipu: 1, available_memory_proportion: 0.2}
      finetune:
        replicas: 16
        pipeline: [{start: stem, ipu: 0}]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

Recomputation = Literal["auto", "none", "standard", "norm_only", "pipeline", "recompute_all"]


@dataclass
class PipelineStage:
    start: str = field(default="stem", metadata={
        "help": "split point the stage starts at: stem, blocks.<stage>.<index>, head or classifier (0-based, in "
                "execution order); the first stage starts at stem"})
    ipu: int = field(default=0, metadata={"min": 0, "help": "IPU of the replica the stage runs on (0, 1, ...)"})
    available_memory_proportion: Optional[float] = field(default=None, metadata={
        "min": 0.0, "max": 1.0,
        "help": "share of the IPU's tile memory convolutions/matmuls may use for temporaries, in (0, 1]; applies "
                "to the whole IPU, so stages sharing an IPU must agree; null = ipu.available_memory_proportion"})
    recompute: bool = field(default=False, metadata={
        "help": "checkpoint the output of every block of the stage (poptorch.recomputationCheckpoint): the "
                "backward pass then recomputes one block at a time from stored block outputs"})


@dataclass
class IpuConfig:
    # --- geometry (per phase: ipu.finetune may set them differently, see PHASE_FIELDS) ---------------------------
    replicas: int = field(default=1, metadata={
        "min": 1, "help": "data-parallel replicas in the whole job (poprun --num-replicas); each runs the pipeline"})
    instances: int = field(default=1, metadata={
        "min": 1, "help": "host processes the recipe is meant for (poprun --num-instances); replicas are split "
                          "evenly between them. Under poprun the launch decides and must agree with replicas"})
    device_iterations: int = field(default=1, metadata={
        "min": 1, "help": "optimizer steps per host call (one call moves micro x accumulation x local replicas x "
                          "device iterations samples)"})
    pipeline: List[PipelineStage] = field(default_factory=list, metadata={
        "help": "pipeline stages in execution order; empty = the whole model on one IPU"})
    available_memory_proportion: Union[float, List[float], None] = field(default=None, metadata={
        "help": "default for stages that do not set one: one value for every stage, or a list with one per "
                "stage; null = PopTorch's default (0.6)"})
    auto_round_num_ipus: bool = field(default=False, metadata={
        "help": "allow a process to use a number of IPUs (IPUs per replica x its replicas) that is not a power of "
                "two: PopTorch rounds the allocation up"})
    recomputation: Recomputation = field(default="auto", metadata={
        "help": "PopART autoRecomputation. auto: PopTorch's default (pipeline recomputation when pipelined) and, "
                "on one IPU with a recompute stage, explicit recomputation between the checkpoints"})
    eval_device_iterations: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "validation device iterations; null = max(device_iterations, pipeline IPUs)"})
    eval_micro_batch_size: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "validation micro batch; null = the phase's micro batch"})
    # --- numerics ----------------------------------------------------------------------------------------------
    partials_type: Literal["auto", "half", "float"] = field(default="auto", metadata={
        "help": "conv/matmul partials; auto = half with 16.x precision, float with fp32"})
    stochastic_rounding: bool = field(default=False, metadata={
        "help": "stochastic rounding of half-precision results (off in the paper's recipes)"})
    stable_norm: bool = field(default=True, metadata={"help": "PopART's slower, more accurate norm statistics"})
    norm_precision: Literal["float", "half"] = field(default="float", metadata={
        "help": "16.16: run GroupNorm/LayerNorm in float (cast in and out) or in half like the rest; 16.32 always "
                "uses float. Proxy-norm statistics are float either way"})
    fast_group_norm: bool = field(default=False, metadata={
        "help": "PopART groupNormStridedChannelGrouping: faster, but groups channels with a stride, so the "
                "weights differ in meaning from CPU/GPU GroupNorm (checkpoints stop being portable)"})
    automatic_loss_scaling: bool = field(default=False, metadata={
        "help": "PopTorch's automatic loss scaling (preview); otherwise precision.loss_scale is static"})
    accum_type: Literal["float", "half"] = field(default="float", metadata={
        "help": "optimizer accumulator and momentum dtype"})
    conv_dithering: bool = field(default=False, metadata={
        "help": "Poplar convolution dithering (enableConvDithering), which spreads convolution work over more "
                "tiles; training graph only"})
    # --- memory and communication ------------------------------------------------------------------------------
    offload_optimizer: bool = field(default=False, metadata={"help": "optimizer state in streaming memory"})
    replicated_tensor_sharding: bool = field(default=False, metadata={
        "help": "shard optimizer state across replicas"})
    exchange_target: Literal["cycles", "balanced", "memory"] = field(default="balanced", metadata={
        "help": "Poplar opt.internalExchangeOptimisationTarget"})
    deterministic_workers: bool = field(default=True, metadata={
        "help": "Poplar target.deterministicWorkers=portable (keeps replicas' weights identical)"})
    outer_fragment_schedule: Literal["scheduler", "serial", "overlap_cycles", "overlap_memory"] = field(
        default="overlap_memory", metadata={
            "help": "PopART accumulateOuterFragmentSettings.schedule (set with replicas > 1). PopART refuses serial "
                    "with merged all-reduces and with gradient clipping on a pipeline"})
    merge_collectives: Optional[bool] = field(default=None, metadata={
        "help": "merge the all-reduces of replicas > 1 (PopART prepareScheduleForMergingCollectives and "
                "mergeAllReduceCollectives); null = on, except with outer_fragment_schedule: serial, which PopART "
                "cannot combine with it"})
    # --- host side ---------------------------------------------------------------------------------------------
    dataloader_mode: Literal["sync", "async", "async_rebatched"] = field(default="async_rebatched", metadata={
        "help": "poptorch.DataLoaderMode: async_rebatched loads on worker processes in small batches and rebatches "
                "them for the device (Graphcore's default for image recipes)"})
    rebatched_worker_size: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "AsyncRebatched: samples per worker batch (<= one host call); null = PopTorch's"})
    executable_cache: Optional[str] = field(default=None, metadata={
        "help": "folder for compiled executables (reused when nothing changed); null = $POPTORCH_CACHE_DIR (read "
                "by PopTorch itself), else <logging.run_dir>/executable-cache when ipu.instances > 1 (every poprun "
                "instance would otherwise compile the same graphs), else none. With several instances it must be "
                "one folder that every instance of the job sees (on several hosts: a shared file system), because "
                "PopTorch's compile lock in it counts the whole job's instances"})
    offline_ipu_version: int = field(default=2, metadata={"min": 1, "help": "IPU generation for --compile-only"})
    synthetic_data: bool = field(default=False, metadata={
        "help": "no host-to-IPU input copies (random data on the device): throughput tests only"})
    profile_dir: Optional[str] = field(default=None, metadata={"help": "write a PopVision profile here"})


#: The keys of ``ipu`` a phase may set differently (``ipu.finetune``, generated by the override rule in
#: ``train/config.py``); the others hold for the whole job.
PHASE_FIELDS = ("replicas", "device_iterations", "pipeline", "available_memory_proportion", "auto_round_num_ipus",
                "recomputation", "eval_device_iterations", "eval_micro_batch_size", "stochastic_rounding",
                "offload_optimizer", "replicated_tensor_sharding", "rebatched_worker_size")
