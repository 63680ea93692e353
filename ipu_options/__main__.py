"""``python -m ipu_options --config X --describe`` and ``--compile-only``.

``--describe`` prints one JSON document covering every phase of the recipe: the pipeline stages (IPU, first
layer, memory proportion, recompute), replicas, accumulation, device iterations, micro and global batch,
precision, and the ordered PopTorch option calls for the training and the validation model. It needs neither
PopTorch nor IPUs, and it validates the recipe exactly as a run would (a mistake exits with code 2 and a message
naming the key).

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
from train.run_plan import RunPlan, plan_run

from .plan import describe


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
        plan = plan_run(cfg)  # the same checks as python -m train, before describing or compiling anything
        if args.describe:
            print(compact_json(describe(cfg, plan.phases, args.config)))
            return
        if cfg.train.backend != "ipu":
            raise ConfigError(f"train.backend: {cfg.train.backend!r}: --compile-only compiles IPU executables; set "
                              "train.backend: ipu")
        compile_only(plan, log=lambda entry: print(json.dumps(entry), flush=True))

    return run_guarded(job)


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
