"""The `opir train` command line that makes a run again from what its card records (recipe,
data, init, the changes made on resume): the training library records those as data, and only
the CLI knows its flags."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence
from typing import Any

from opir_engine.model import TASKS
from opir_engine.training.recipe import SHARES, DataSpec, Recipe

# Recipe fields with an `opir train` option of the same name (`--synth-ratio` for synth_ratio)
_RECIPE_OPTIONS = (*SHARES, "ema", "precision", "steps", "batch", "patch", "lr", "seed",
                   "max_side", "val_every")  # fmt: skip


def train_command(
    recipe: Recipe, data: DataSpec, init: str | None = None, out: str = "RUN",
    data_alias: str = "DATA", changes: Sequence[dict[str, Any]] = (),
) -> str:  # fmt: skip
    """The `opir train` command line that makes a run in `out` with this recipe and data (the
    data root written as `data_alias`), from `init` weights if given; options left at their
    defaults are left out. With the run's `recipe_changes`, the run is started with the recipe
    as it was, stopped at each change and resumed with it: the commands joined by `&&`."""
    root = data.data_root

    def path(p: str) -> str:
        return shlex.quote(data_alias + p[len(root) :] if root and p.startswith(root) else p)

    first = recipe
    for change in reversed(changes):
        first = dataclasses.replace(first, **_as_fields(change["was"]))
    defaults = Recipe()
    args = [f"opir train --out {shlex.quote(out)}", f"--config {first.config}"]
    args += [f"--data {task}={path(f)}" for task, folders in data.paired.items() for f in folders]
    args += [f"--clean {path(f)}" for f in data.clean]
    args += [f"--rain-layers {path(f)}" for f in data.rain_layers]
    if data.split:
        args.append(f"--split {path(data.split)}")
        if root:
            args.append(f"--data-root {data_alias}")
    args += _options(first, {n: getattr(defaults, n) for n in (*_RECIPE_OPTIONS, "task_weights")})
    if init:
        args.append(f"--init {shlex.quote(init)}")
    commands = [args]
    for change in changes:
        commands[-1].append(f"--stop-at {change['step']}")
        now = _as_fields({k: v for k, v in change.items() if k not in ("step", "was")})
        was = _as_fields(change["was"])
        commands.append([f"opir train --out {shlex.quote(out)} --resume", *_options(now, was)])
    return " && ".join(" ".join(c) for c in commands)


def _as_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Recipe fields as a card's JSON holds them, lists back to tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _options(values: Recipe | dict[str, Any], against: dict[str, Any]) -> list[str]:
    """The `opir train` options setting the fields of `values` (a recipe, or some of its fields)
    that differ from `against`."""
    fields = dataclasses.asdict(values) if isinstance(values, Recipe) else values
    args = []
    for name in _RECIPE_OPTIONS:
        if name in fields and fields[name] != against.get(name):
            args.append(f"--{name.replace('_', '-')} {fields[name]!r}")
    weights = fields.get("task_weights")
    if weights is not None and tuple(weights) != tuple(against.get("task_weights", ())):
        # --task-weight sets the weights it does not name to 1 (on a resume too); all equal to
        # 1 is named in full, or a resume would not see the change
        named = [(t, w) for t, w in zip(TASKS, weights, strict=True) if w != 1.0]
        args += [f"--task-weight {t}={w!r}" for t, w in named or zip(TASKS, weights, strict=True)]
    return args
