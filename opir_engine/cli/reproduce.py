"""The `opir train` command line that makes a run again from what its card records (recipe,
data, init): the training library records those as data, and only the CLI knows its flags."""

from __future__ import annotations

import shlex

from opir_engine.model import TASKS
from opir_engine.training.recipe import DataSpec, Recipe

# Recipe fields with an `opir train` option of the same name (`--synth-ratio` for synth_ratio)
_RECIPE_OPTIONS = ("synth_ratio", "clean_ratio", "steps", "batch", "patch", "lr", "seed",
                   "max_side", "val_every")  # fmt: skip


def train_command(
    recipe: Recipe, data: DataSpec, init: str | None = None, out: str = "RUN",
    data_alias: str = "DATA",
) -> str:  # fmt: skip
    """The `opir train` command line that makes a run in `out` with this recipe and data (the
    data root written as `data_alias`), from `init` weights if given; options left at their
    defaults are left out."""
    root = data.data_root

    def path(p: str) -> str:
        return shlex.quote(data_alias + p[len(root) :] if root and p.startswith(root) else p)

    defaults = Recipe()
    args = [f"opir train --out {shlex.quote(out)}", f"--config {recipe.config}"]
    args += [f"--data {task}={path(f)}" for task, folders in data.paired.items() for f in folders]
    args += [f"--clean {path(f)}" for f in data.clean]
    if data.split:
        args.append(f"--split {path(data.split)}")
        if root:
            args.append(f"--data-root {data_alias}")
    for name in _RECIPE_OPTIONS:
        value = getattr(recipe, name)
        if value != getattr(defaults, name):
            args.append(f"--{name.replace('_', '-')} {value!r}")
    for task, weight in zip(TASKS, recipe.task_weights, strict=True):
        if weight != 1.0:  # the default weight
            args.append(f"--task-weight {task}={weight!r}")
    if init:
        args.append(f"--init {shlex.quote(init)}")
    return " ".join(args)
