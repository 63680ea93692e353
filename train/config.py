"""YAML recipes → one typed, validated :class:`Config`.

Each section is a dataclass that lives next to the code that reads it (``models/config.py`` for ``model``,
``data/config.py`` for ``data``, ``ipu_options/config.py`` for ``ipu``, the rest below). The loader is general:
it checks any dataclass against its type hints and ``field(metadata={"min", "max", "help"})``, so a section gains
a key by gaining a field.

Recipes may inherit: ``base: other.yml`` (or a list) is loaded first, relative to the file, and deep-merged
under it. ``--set section.key=value`` overrides come last; values are parsed as YAML (``--set train.epochs=3``).
Every user mistake raises :class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar, Union, cast

import yaml

from data.config import DataConfig
from ipu_options.config import IpuConfig
from models.config import ModelConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value the user must fix; printed without a traceback."""


# --------------------------------------------------------------------------------------------------- sections
@dataclass
class ProgressiveConfig:
    """EfficientNetV2-style progressive learning inside the training phase (docs/paper.md, "EfficientNetV2")."""

    stages: int = field(default=4, metadata={"min": 2, "help": "equal slices of the epochs"})
    start_resolution: int = field(default=128, metadata={
        "min": 8, "help": "first stage; the last uses train.resolution"})
    mixup_alpha: Tuple[float, float] = field(default=(0.0, 0.0), metadata={"help": "first and last stage"})
    dropout: Tuple[float, float] = field(default=(0.1, 0.3), metadata={"help": "first and last stage"})
    randaugment: Optional[Tuple[float, float]] = field(
        default=None, metadata={"help": "RandAugment magnitude, first and last stage; null = data.randaugment"})

    def validate(self) -> None:
        if min(self.mixup_alpha) < 0 or not all(0 <= d <= 1 for d in self.dropout):
            raise ValueError(f"train.progressive: mixup_alpha {list(self.mixup_alpha)} must be >= 0 and dropout "
                             f"{list(self.dropout)} within [0, 1]")


@dataclass
class TrainConfig:
    backend: Literal["torch", "ipu"] = field(default="torch", metadata={"help": "torch (CPU/CUDA) or ipu (PopTorch)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "torch backend device"})
    epochs: int = field(default=10, metadata={"min": 0, "help": "epochs of the training phase"})
    max_steps: Optional[int] = field(default=None, metadata={"min": 1, "help": "stop after this many optimizer steps"})
    resolution: Union[int, Literal["half"], None] = field(
        default=None, metadata={"min": 8, "help": "training resolution: int, half, or null for the native one"})
    micro_batch_size: int = field(default=32, metadata={"min": 1, "help": "samples per forward pass"})
    gradient_accumulation: int = field(default=1, metadata={
        "min": 1, "help": "micro-batches per optimizer step (global batch = micro x accumulation x processes)"})
    seed: int = field(default=0, metadata={
        "min": 0, "help": "initial weights, data order, augmentation and mixing all follow it"})
    label_smoothing: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0, "help": "share of the target "
                                                                               "spread over all classes"})
    mixup_alpha: float = field(default=0.0, metadata={"min": 0.0, "help": "Beta(a, a) mixup; 0 = off"})
    cutmix_lambda: Optional[float] = field(
        default=None, metadata={"min": 0.0, "max": 1.0, "help": "fixed-lambda CutMix of the paper; null = off"})
    weight_avg_decay: Optional[float] = field(
        default=0.97, metadata={"min": 0.0, "max": 1.0, "help": "exponential average of per-epoch weights; null = off"})
    ema_decay: Optional[float] = field(
        default=None, metadata={"min": 0.0, "max": 1.0, "help": "per-step EMA of the weights; null = off"})
    validate_every: int = field(default=1, metadata={"min": 1, "help": "epochs between validations"})
    val_resolutions: List[int] = field(
        default_factory=list, metadata={"help": "validation resolutions; empty = the training resolution"})
    val_batch_size: int = field(default=64, metadata={"min": 1, "help": "images per validation batch and process"})
    channels_last: bool = field(default=False, metadata={"help": "torch backend: NHWC memory format"})
    compile: bool = field(default=False, metadata={"help": "torch backend: torch.compile the model"})
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = field(
        default="default", metadata={"help": "torch.compile mode; reduce-overhead replays the step as CUDA graphs"})
    progressive: Optional[ProgressiveConfig] = field(
        default=None, metadata={"help": "ramp resolution and regularisation over stages; null = off"})
    nonfinite: Literal["stop", "skip"] = field(default="stop", metadata={
        "help": "a step whose loss or gradients are NaN/inf is never applied; stop: end the run (exit 3) naming the "
                "last checkpoint whose weights still trained; skip: drop the step, count and log it, and stop only "
                "after train.max_nonfinite_skips in a row (torch backend)"})
    max_nonfinite_skips: int = field(default=10, metadata={
        "min": 1, "help": "with nonfinite: skip, stop after this many consecutive non-finite steps"})

    def validate(self) -> None:
        if self.backend == "ipu" and self.device != "auto":
            raise ValueError(f"train.device: {self.device!r} applies to the torch backend only; "
                             "leave it at 'auto' with train.backend: ipu")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"train.compile_mode: {self.compile_mode!r} takes effect only with train.compile: true")


@dataclass
class OptimizerConfig:
    name: Literal["rmsprop_tf", "sgd", "adamw"] = field(default="rmsprop_tf", metadata={
        "help": "rmsprop_tf: TensorFlow's RMSProp, the paper's; sgd; adamw"})
    lr: float = field(default=0.046875, metadata={"min": 0.0, "help": "at reference_batch; scaled by global batch"})
    reference_batch: int = field(default=768, metadata={"min": 1, "help": "lr = lr * global batch / reference_batch"})
    weight_decay: float = field(default=1e-5, metadata={
        "min": 0.0, "help": "L2 (rmsprop_tf, sgd) or decoupled (adamw) weight decay; not on norms and biases"})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0, "help": "rmsprop_tf and sgd"})
    rmsprop_decay: Optional[float] = field(
        default=None, metadata={"min": 0.0, "max": 1.0, "help": "null = the paper's 1 - 2^-14 * global batch"})
    eps: float = field(default=1e-3, metadata={"min": 0.0, "help": "rmsprop_tf (inside the square root) and adamw"})
    nesterov: bool = field(default=False, metadata={"help": "sgd: Nesterov momentum"})
    betas: Tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "adamw"})
    clip_grad_norm: Optional[float] = field(default=None, metadata={
        "min": 0.0, "help": "clip the global L2 norm of the gradients to this value before each step; null = off"})

    def validate(self) -> None:
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"optimizer.clip_grad_norm: {self.clip_grad_norm} must be above 0 (null turns it off)")


@dataclass
class ScheduleConfig:
    name: Literal["exponential", "cosine", "constant"] = field(default="exponential", metadata={
        "help": "after the warm-up: exponential decay (the paper's), cosine to 0, or constant"})
    warmup_epochs: float = field(default=5.0, metadata={"min": 0.0, "help": "linear warm-up from 0 to the peak lr"})
    decay_rate: float = field(default=0.97, metadata={"min": 0.0, "max": 1.0, "help": "exponential: factor per decay"})
    decay_epochs: float = field(default=2.4, metadata={"min": 0.0, "help": "exponential: epochs between decays"})


def overrides_of(section: Type[Any], defaults: Dict[str, Any], prefix: str) -> Type[Any]:
    """A section of the same keys as ``section``, each null unless given: what a phase sets differently.

    The one rule for phase-specific settings (``finetune.optimizer``, ``finetune.schedule``, and ``ipu.finetune``
    in the ``ipu`` section): a key given there replaces the main section's value, a null one keeps it. ``defaults``
    are the phase's own defaults (the paper's fine-tune uses SGD, not the training phase's RMSProp).
    """
    hints = typing.get_type_hints(section)
    entries = []
    for f in dataclasses.fields(section):
        meta = dict(f.metadata)
        meta["help"] = (meta.get("help", "") + f"; null = {prefix}.{f.name}").lstrip("; ")
        entries.append((f.name, Optional[hints[f.name]], field(default=defaults.get(f.name), metadata=meta)))
    return dataclasses.make_dataclass(f"{section.__name__}Override", entries)


def merged(base: T, override: Any) -> T:
    """``base`` with every non-null field of ``override`` (see :func:`overrides_of`), checked again."""
    out = dataclasses.replace(cast(Any, base), **{f.name: getattr(override, f.name)
                                                  for f in dataclasses.fields(override)
                                                  if getattr(override, f.name) is not None})
    validate = getattr(out, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return cast(T, out)


#: The paper's fine-tune (docs/paper.md, "Fine-tuning at the test resolution"): SGD without momentum,
#: lr 2^-11 x 512 = 0.25 at batch 512, cosine.
FinetuneOptimizer = overrides_of(OptimizerConfig, {"name": "sgd", "lr": 0.25, "reference_batch": 512,
                                                   "momentum": 0.0, "weight_decay": 0.0, "nesterov": False},
                                 "optimizer")
FinetuneSchedule = overrides_of(ScheduleConfig, {"name": "cosine", "warmup_epochs": 0.0}, "schedule")


@dataclass
class FinetuneConfig:
    """The cheap high-resolution phase after reduced-resolution training (docs/paper.md, "Fine-tuning at the test
    resolution")."""

    enabled: bool = field(default=False, metadata={"help": "run the fine-tune phase after training"})
    resolution: Optional[int] = field(default=None, metadata={"min": 8, "help": "null = the model's native size"})
    epochs: int = field(default=2, metadata={"min": 0, "help": "epochs of the fine-tune phase"})
    max_steps: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "stop the phase after this many optimizer steps; null = its epochs"})
    # (generated sections: mypy cannot see their fields, the config loader and key docs can)
    optimizer: FinetuneOptimizer = field(  # type: ignore[valid-type]
        default_factory=FinetuneOptimizer,
        metadata={"help": "optimizer keys that differ in this phase; null keys keep the optimizer section's"})
    schedule: FinetuneSchedule = field(  # type: ignore[valid-type]
        default_factory=FinetuneSchedule,
        metadata={"help": "schedule keys that differ in this phase; null keys keep the schedule section's"})
    first_trainable: str = field(default="head", metadata={"help": "split point; every layer before it is frozen"})
    preprocessing: Literal["eval", "train"] = field(
        default="eval", metadata={"help": "eval: resize + centre crop, no random crop or flip (the paper's)"})
    strict_resolution: bool = field(
        default=False, metadata={"help": "error (not warn) unless train % 32 == fine-tune resolution % 32"})
    micro_batch_size: Optional[int] = field(default=None, metadata={"min": 1, "help": "null = train's"})
    gradient_accumulation: Optional[int] = field(default=None, metadata={"min": 1, "help": "null = train's"})


@dataclass
class PrecisionConfig:
    compute: Literal["fp32", "bf16", "fp16", "16.16", "16.32"] = field(
        default="fp32", metadata={"help": "torch: fp32/bf16/fp16 autocast; ipu: 16.16 or 16.32 (compute.weights)"})
    loss_scale: float = field(default=128.0, metadata={
        "min": 1.0, "help": "fp16: initial (torch) or static (IPU) scale"})


@dataclass
class LoggingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = field(default="auto", metadata={
        "help": "auto: $WANDB_MODE if set, else online with an API key ($WANDB_API_KEY or ~/.netrc), else offline "
                "(local files under <run folder>/wandb/, upload later with `wandb sync`)"})
    project: str = field(default="efficientnet-ipu", metadata={"help": "W&B project"})
    entity: Optional[str] = field(default=None, metadata={"help": "W&B user or team; null = the API key's default"})
    name: Optional[str] = field(default=None, metadata={"help": "W&B run name; null = the run folder's name"})
    tags: List[str] = field(default_factory=list, metadata={"help": "W&B run tags"})
    group: Optional[str] = field(default=None, metadata={
        "help": "W&B group: runs that belong together (bench.study puts every arm of a study in one)"})
    run_dir: str = field(default="runs", metadata={"help": "run folders go in <run_dir>/<config>-<time>/"})
    log_every: int = field(default=50, metadata={"min": 1, "help": "optimizer steps between metric lines"})


@dataclass
class CheckpointConfig:
    every_epochs: int = field(default=1, metadata={"min": 1, "help": "save at the end of every N epochs"})
    every_steps: Optional[int] = field(default=None, metadata={"min": 1, "help": "also save every N optimizer steps"})
    keep: int = field(default=2, metadata={"min": 1, "help": "newest step checkpoints kept (phase ends are kept)"})
    keep_best: bool = field(default=False, metadata={
        "help": "after each validation, copy the checkpoint it scored to checkpoints/<phase>-best.pt when its top-1 "
                "(trained weights, the phase's first validation resolution) is the phase's best so far"})
    optimizer_state: bool = field(default=True, metadata={
        "help": "IPU: checkpoints must hold the device's optimizer state, so --resume continues it exactly; false "
                "lets the IPU backend drop PopART's optimizer-state streams in phases that do not validate before "
                "their end (Graphcore's setting, for speed; not measured here): their checkpoints then hold weights "
                "only and a resume restarts the optimizer state (docs/ipu.md). The torch backend always saves it"})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    ipu: IpuConfig = field(default_factory=IpuConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    name: str = field(default="run", metadata={
        "help": "recipe name; the file's stem unless set; run folders are <logging.run_dir>/<name>-<time>, so it "
                "must be one plain folder name (letters, digits, '.', '_', '-', '+')"})

    def validate(self) -> None:
        if not RUN_NAME.fullmatch(self.name):
            raise ValueError(f"name: {self.name!r} is not a plain folder name; use letters, digits, '.', '_', '-' "
                             "and '+', not starting with '.' (run folders are <logging.run_dir>/<name>-<time>)")


#: What ``name`` may be: one path component that cannot climb out of ``logging.run_dir`` or hide itself.
RUN_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")


# ------------------------------------------------------------------------------------------------ checking
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} values"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


#: The YAML values each plain field type takes: a bool is not a number here, an int is a float.
_ACCEPTS: Dict[Any, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    type(None): lambda v: v is None,
}


class _Mismatch(Exception):
    pass


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to ``tp`` or :class:`_Mismatch` (the caller words the error). Items of lists and
    sections are checked (and their errors worded) under their own keys."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        for option in args:
            try:
                return _check_value(value, option, key)
            except _Mismatch:
                continue
    elif origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        if isinstance(value, float) and str(value) in args:
            return str(value)  # a bare 16.32 in YAML is a number; the choice is the string "16.32"
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return check_section(cast(type, tp), value, key)
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)) and (origin is list or len(value) == len(args)):
            items = [_check_item(v, args[0] if origin is list else args[i], f"{key}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
    elif tp not in _ACCEPTS:
        raise TypeError(f"config field {key} has an unsupported type {tp!r}")
    elif _ACCEPTS[tp](value):
        if tp is float and not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return float(value) if tp is float else value
    raise _Mismatch


def _check_item(value: Any, tp: Any, key: str) -> Any:
    try:
        return _check_value(value, tp, key)
    except _Mismatch:
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}") from None


def _check_range(value: Any, meta: typing.Mapping, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key}: {value!r} is above the maximum {meta['max']}")


def check_section(cls: Type[T], raw: Dict[str, Any], prefix: str) -> T:
    """Build dataclass ``cls`` from a mapping, with an error naming ``prefix.key`` for anything wrong."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: {raw!r} is not {_type_name(cls)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cast(Any, cls))}
    values = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {full!r}{hint} (valid keys: {', '.join(known)})")
        values[key] = _check_item(value, hints[key], full)
        _check_range(values[key], known[key].metadata, full)
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return instance


# ----------------------------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: ``1e-5`` (no dot) is a float, and only true/false are booleans.

    PyYAML follows YAML 1.1, where ``1e-5`` is a string and ``on``/``off``/``yes``/``no`` are booleans, which
    breaks recipes (``lr: 1e-5``, ``fused_norm: on``).
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
    """A mapping that refuses a key given twice (PyYAML silently keeps the last one)."""
    seen: Dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            first = seen[key]
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (first on line {first.line + 1}); keep one",
                key_node.start_mark)
        seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(err: yaml.YAMLError, source: str) -> str:
    """One line: ``<source>:<line>:<column>: not valid YAML: <problem>`` (PyYAML's spans several lines)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{source}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {err.problem}"
    return f"{source}: not valid YAML: {' '.join(str(err).split())}"


def parse_yaml(text: str, source: str = "<text>") -> Any:
    """YAML 1.2-style scalars, no duplicate keys; a syntax error is a one-line :class:`ConfigError`."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(err, source)) from None


def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _base_files(bases: Any, path: Path) -> List[str]:
    """The ``base:`` entry as a list of file names, or an error saying what it may be."""
    if isinstance(bases, str) and bases:
        return [bases]
    if isinstance(bases, list) and bases and all(isinstance(b, str) and b for b in bases):
        return bases
    raise ConfigError(f"{path}: base: {bases!r} is not a file name or a list of file names (relative to the file)")


def read_recipe(path: Path, _seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """A YAML file with its ``base:`` chain merged in (bases first)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"config file {path} is empty; a recipe needs at least one section (e.g. model:) "
                          "or a base: to inherit from")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    merged: Dict[str, Any] = {}
    if "base" in raw:
        for base in _base_files(raw.pop("base"), path):
            merged = _deep_merge(merged, read_recipe(path.parent / base, _seen + (path,)))
    return _deep_merge(merged, raw)


def apply_override(raw: Dict[str, Any], override: str) -> Dict[str, Any]:
    """``a.b.c=value`` (value parsed as YAML) merged into ``raw``."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    try:
        value = parse_yaml(text, f"--set {override}")
    except ConfigError:
        value = text  # not YAML (e.g. an unquoted path with a colon): the string as typed
    nested: Any = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return _deep_merge(raw, nested)


def load_config(path: Optional[str], overrides: Sequence[str] = (), base: Optional[Dict[str, Any]] = None) -> Config:
    """The recipe at ``path`` (or the plain-data config ``base``, e.g. a checkpoint's, or the defaults), then
    the ``--set`` overrides."""
    raw: Dict[str, Any] = read_recipe(Path(path)) if path else dict(base or {})
    if path and "name" not in raw:
        raw["name"] = Path(path).stem
    for override in overrides:
        raw = apply_override(raw, override)
    return check_section(Config, raw, "")


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain data (tuples as lists) for YAML/JSON dumps, W&B and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def config_from_dict(raw: Dict[str, Any]) -> Config:
    return check_section(Config, raw, "")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
