"""The evaluation grid behind `randfeat eval`: settings, presets, the plan, units, the runner.

- [randfeat.eval.grid.config][]: every setting of a run, validated against the registries.
- [randfeat.eval.grid.presets][]: the paper's grids by name.
- [randfeat.eval.grid.plan][]: rank 0's preparation: model, images, ν, the header.
- [randfeat.eval.grid.units][]: a unit of work and its rows.
- [randfeat.eval.grid.runner][]: `run_eval`, which runs or resumes a grid, alone or sharded.
- [randfeat.eval.grid.distributed][], [randfeat.eval.grid.progress][]: ranks and progress.
"""
