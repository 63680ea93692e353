"""IPU side of a recipe, as plain data first and PopTorch calls last.

- ``config``: the ``ipu`` config section (and its ``ipu.finetune`` overrides).
- ``plan``: per-phase validation and the ordered PopTorch option calls (no PopTorch needed).
- ``apply``: replays those calls on a fresh ``poptorch.Options`` (or ``popdist.poptorch.Options``).
- ``pipeline``: ``poptorch.BeginBlock`` stages, recomputation checkpoints and IPU precision on a network.
- ``distributed``: poprun/PopDist detection and Horovod host collectives.
- ``python -m ipu_options --config X --describe | --compile-only``.

Nothing is imported here: ``train.config`` imports ``ipu_options.config``, which must stay light.
"""
