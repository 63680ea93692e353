"""The ``ipu`` config section: replication, device iterations and the pipeline plan (read by ``ipu_options``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class PipelineStage:
    start: str = field(default="stem", metadata={"help": "split-point name the stage starts at"})
    ipu: int = field(default=0, metadata={"min": 0})
    available_memory_proportion: Optional[float] = field(default=None, metadata={"min": 0.0, "max": 1.0})
    recompute: bool = False


@dataclass
class IpuConfig:
    replicas: int = field(default=1, metadata={"min": 1, "help": "replicas per instance"})
    device_iterations: int = field(default=1, metadata={"min": 1})
    pipeline: List[PipelineStage] = field(default_factory=list)
