"""``python -m ipu_options --config X --describe`` and ``--compile-only``.

``--describe`` prints one JSON document covering every phase of the recipe: the pipeline stages (IPU, first
layer, memory proportion, recompute), replicas, accumulation, device iterations, micro and global batch,
precision, and the ordered PopTorch option calls for the training and the validation model. It needs neither
PopTorch nor IPUs, and it validates the recipe exactly as a run would (a mistake exits with code 2 and a message
naming the key); a run and ``--compile-only`` also check every phase against the poprun launch they run under.

``--compile-only`` compiles every phase's training and validation executables against an offline IPU target
(``opts.useOfflineIpuTarget``): no IPU is needed, but PopTorch (the Poplar SDK) is. PopTorch skips its device-size
rules for offline targets; the recipe check that runs first covers them. With an executable cache (see
``ipu.executable_cache``), a later run loads the compiled executables instead of compiling again.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict, List, Optional

from train.backends import IPUBackend, build_network, make_backend
from train.cli import run_guarded
from train.config import ConfigError, load_config
from train.run_plan import RunPlan, plan_launch, plan_run

from .plan import (
    IpuPhasePlan,
    calls_to_json,
    constructor,
    launch_command,
    needs_own_launch,
    training_calls,
    validation_calls,
)


def compact_json(value: Any, indent: int = 0, width: int = 110) -> str:
    """JSON with small objects and lists kept on one line (option calls stay readable)."""
    flat = json.dumps(value)
    if len(flat) + indent <= width or not isinstance(value, (dict, list)) or not value:
        return flat
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {compact_json(v, indent + 2, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    items = [f"{inner}{compact_json(v, indent + 2, width)}" for v in value]
    return "[\n" + ",\n".join(items) + f"\n{pad}]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ipu_options",
                                     description="Describe or compile the IPU side of a training recipe.")
    parser.add_argument("--config", help="YAML recipe (e.g. configs/ipu/pod16-b0-g16-ln-pn-half.yml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax); repeatable")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--describe", action="store_true",
                      help="print the phases' IPU geometry and PopTorch option calls as JSON (no PopTorch needed)")
    mode.add_argument("--compile-only", action="store_true",
                      help="compile every phase for an offline IPU target (needs PopTorch, no IPU)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> None:
        cfg = load_config(args.config, args.overrides)
        if cfg.train.backend != "ipu":
            raise ConfigError(f"train.backend: {cfg.train.backend!r}: --describe and --compile-only plan IPU "
                              "phases; set train.backend: ipu")
        if args.describe:  # the recipe's plan: the same checks as python -m train, before describing anything
            print(compact_json(describe(plan_run(cfg), args.config)))
            return
        compile_only(plan_launch(cfg), log=lambda entry: print(json.dumps(entry), flush=True))

    return run_guarded(job)


def describe(plan: RunPlan, config_path: Optional[str] = None) -> Dict[str, Any]:
    """One JSON-able document for the phases of ``plan``: geometry, stages, launch and the option calls."""
    cfg = plan.cfg
    out: Dict[str, Any] = {"config": cfg.name, "model": cfg.model.name, "backend": cfg.train.backend,
                           "precision": cfg.precision.compute, "loss_scale": cfg.precision.loss_scale,
                           "phases": []}
    ipu_plans: List[IpuPhasePlan] = [phase.ipu for phase in plan.phases if phase.ipu is not None]
    # Under poprun a phase with another geometry than the first needs its own launch (see launch_command).
    separate = [ipu.instances > 1 and needs_own_launch(ipu_plans[0], ipu) for ipu in ipu_plans]
    for index, (phase, ipu) in enumerate(zip(plan.phases, ipu_plans, strict=True)):  # every IPU phase has a plan
        popdist = ipu.instances > 1
        entry = ipu.to_json()
        entry["launch"] = launch_command(ipu, config_path, separate[index], train_only=index == 0 and any(separate))
        entry["optimizer"] = phase.optimizer.name
        entry["training_options"] = {"constructor": constructor(ipu, popdist),
                                     "calls": calls_to_json(training_calls(ipu, popdist=popdist))}
        entry["validation"] = {
            "resolutions": list(phase.val_resolutions), "micro_batch_size": ipu.eval_micro_batch_size,
            "device_iterations": ipu.eval_device_iterations, "samples_per_host_call": ipu.eval_samples_per_call,
            "options": {"constructor": constructor(ipu, popdist),
                        "calls": calls_to_json(validation_calls(ipu, popdist=popdist))},
        }
        out["phases"].append(entry)
    return out


def compile_only(plan: RunPlan, log: Callable[[Dict[str, Any]], None]) -> List[Dict[str, Any]]:
    """Compile every phase's training and validation models for an offline IPU target (needs PopTorch)."""
    cfg = plan.cfg
    results = []
    model = build_network(cfg)
    for phase in plan.phases:
        backend = make_backend(cfg, phase, model, offline=True)
        try:
            assert isinstance(backend, IPUBackend)  # train.backend: ipu, checked above
            backend.compile()
        finally:
            backend.close()
        entry = {"phase": phase.name, "resolution": phase.resolution, "compiled": True,
                 "validation_resolutions": list(phase.val_resolutions)}
        log(entry)
        results.append(entry)
    return results


if __name__ == "__main__":
    sys.exit(main())
