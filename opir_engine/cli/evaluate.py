"""Terminal side of `opir eval`: tables of PSNR/SSIM."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opir_engine.evaluation.scoring import (
    EvaluationError,
    evaluate_clean_under_weather,
    evaluate_engine,
    evaluate_folders,
    evaluate_head,
    finite_mean,
    paired_items,
    photo_items,
    rows_to_card,
    validation_items,
    write_scores_csv,
)


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def eval_folders(
    restored: Path, target: Path, degraded: Path | None, y: bool, csv_path: Path | None
) -> int:
    err = Console(stderr=True, highlight=False)
    try:
        scores = evaluate_folders(restored, target, degraded, y)
    except (EvaluationError, OSError) as e:
        err.print(f"error: {e}")
        return 2
    table = Table(title=f"{restored} vs {target} ({'Y' if y else 'RGB'})")
    for col in (
        "image",
        "PSNR",
        "SSIM",
        *(("input PSNR", "input SSIM", "gain") if degraded else ()),
    ):
        table.add_column(col, justify="right")
    for s in scores:
        extra = ()
        if degraded:
            extra = (_f(s.input_psnr), _f(s.input_ssim, 4), _f(s.psnr - s.input_psnr))
        table.add_row(s.name, _f(s.psnr), _f(s.ssim, 4), *extra)
    mean_p = finite_mean(s.psnr for s in scores)
    mean_s = finite_mean(s.ssim for s in scores)
    extra = ()
    if degraded:
        mean_ip = finite_mean(s.input_psnr for s in scores)
        gain = None if mean_p is None or mean_ip is None else mean_p - mean_ip
        extra = (_f(mean_ip), _f(finite_mean(s.input_ssim for s in scores), 4), _f(gain))
    table.add_row("mean", _f(mean_p), _f(mean_s, 4), *extra, style="bold")
    Console().print(table)
    if csv_path:
        write_scores_csv(scores, csv_path)
    return 0


SPLIT_NEEDS_ROOT = "error: --split needs --data-root (the folder its paths are relative to)"
NOTHING_TO_EVALUATE = "error: nothing to evaluate: give --split/--data-root or --data task=DIR"


def held_out_items(
    split: Path | str | None, data_root: Path | str | None, tagged: dict[str, list[str]]
) -> tuple[list, list]:
    """(items, photos) to score: the split's items and the tagged folders' pairs, and the
    split's photos without ground truth."""
    if split is None:
        return paired_items(tagged), []
    split, root = Path(split), Path(data_root)
    return validation_items(split, root) + paired_items(tagged), photo_items(split, root)


def eval_engine(
    weights: str,
    split: Path | None,
    data_root: Path | None,
    tagged: dict[str, list[str]],
    y: bool,
    device: str,
    json_path: Path | None,
    per_set: bool = False,
    precision: str = "auto",
) -> int:
    from opir_engine.inference.engine import EngineError, OPIREngine, describe

    err = Console(stderr=True, highlight=False)
    if split is not None and data_root is None:
        err.print(SPLIT_NEEDS_ROOT)
        return 2
    items, photos = held_out_items(split, data_root, tagged)
    if not items:
        err.print(NOTHING_TO_EVALUATE)
        return 2
    try:
        engine = OPIREngine.from_pretrained(
            weights, device=device, precision=precision, compile=False
        )
    except EngineError as e:
        err.print(f"error: {e}")
        return 2
    rows = evaluate_engine(engine, items, y_channel=y, per_set=per_set)
    rows += evaluate_clean_under_weather(engine, items)
    if split is not None:
        rows += evaluate_head(engine, photos)
    precision = describe(engine)["precision"]
    table = Table(title=f"{engine.name} ({'Y' if y else 'RGB'}, task auto, {precision})")
    for col in ("task", "n", "input PSNR/SSIM", "OPIR PSNR/SSIM", "gain", "set PSNR",
                "lowest PSNR", "weather left", "baseline", "baseline PSNR/SSIM",
                "head acc."):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.task, str(r.n), f"{_f(r.input_psnr)} / {_f(r.input_ssim, 4)}",
                      f"{_f(r.psnr)} / {_f(r.ssim, 4)}", _f(r.gain), _f(r.set_psnr),
                      _f(r.min_psnr), _pct(r.weather_left), r.baseline,
                      f"{_f(r.baseline_psnr)} / {_f(r.baseline_ssim, 4)}",
                      _pct(r.head_accuracy, 1))  # fmt: skip
    Console().print(table)
    if json_path:
        json_path.write_text(json.dumps(rows_to_card(rows, y), indent=1) + "\n")
    return 0


def eval_every_task(
    weights: str | None,
    split: Path | None,
    data_root: Path | None,
    tagged: dict[str, list[str]],
    device: str,
    table_path: Path,
    classifiers: list[str],
    precision: str = "auto",
    against: Path | None = None,
) -> int:
    """With weights: restore every item under every task and write the table to table_path;
    without: read the table there. Then print the rows under the table's own classifier, an
    oracle's (the true task) and each of `classifiers`' (their probabilities, no restoring);
    with `against`, that table's auto rows beside them and the rows of this one that lose
    (`compare_rows`)."""
    from opir_engine.datasets import DataError
    from opir_engine.evaluation.task_table import (
        ORACLE,
        TaskTable,
        classify_items,
        compare_rows,
        score_every_task,
    )
    from opir_engine.image_io import ImageIOError
    from opir_engine.inference.engine import EngineError, OPIREngine

    err = Console(stderr=True, highlight=False)

    def engine(name: str) -> OPIREngine:
        return OPIREngine.from_pretrained(name, device=device, precision=precision, compile=False)

    def read_items(source: dict) -> tuple[list, list]:
        return held_out_items(source.get("split"), source.get("data_root"), source.get("data", {}))

    try:
        if weights is not None:
            if split is not None and data_root is None:
                err.print(SPLIT_NEEDS_ROOT)
                return 2
            source = {
                "split": str(split) if split else None,
                "data_root": str(data_root) if data_root else None,
                "data": tagged,
            }
            if not table_path.parent.is_dir():  # found out now, not after hours of restoring
                err.print(f"error: {table_path.parent}: no such folder for the table")
                return 2
            items, photos = read_items(source)
            if not items:
                err.print(NOTHING_TO_EVALUATE)
                return 2
            table = score_every_task(engine(weights), items, photos, source)
            table.save(table_path)
        else:
            table = TaskTable.load(table_path)
            items, photos = read_items(table.source) if classifiers else ([], [])
            names = [item[1] for item in items] + [photo[1] for photo in photos]
            if classifiers and names != [item.name for item in table.items]:
                err.print(f"error: {table_path}: its items are no longer what {table.source} "
                          "holds; score the table again")  # fmt: skip
                return 2
        reference = None if against is None else TaskTable.load(against)
        if reference and [i.name for i in reference.items] != [i.name for i in table.items]:
            err.print(f"error: {against}: holds other items than {table_path}; score both "
                      "on one split")  # fmt: skip
            return 2
        columns = {f"{table.weights} (auto)": table.rows(), "oracle": table.rows(ORACLE)}
        for k, name in enumerate(classifiers):
            other = engine(name)
            probs = classify_items(other, items, photos)
            decided = table.decisions(probs, other.model.config.clean_threshold)
            label = f"{Path(name).stem if name.endswith('.safetensors') else name}'s calls"
            if label in columns:  # two files of one name in different folders
                label += f" ({k + 1})"
            columns[label] = table.rows(decided)
        verdicts = None
        if reference is not None:
            theirs = reference.rows()
            verdicts = compare_rows(columns[f"{table.weights} (auto)"], theirs)
            label = f"{reference.weights} (auto)"
            if label in columns:  # the same weights' name (a fine-tune keeps it): name the file
                label = f"{against.name}: {label}"  # type: ignore[union-attr]
            columns[label] = theirs
    except (EngineError, EvaluationError, DataError, ImageIOError, OSError) as e:
        err.print(f"error: {e}")
        return 2
    except (ValueError, KeyError, TypeError) as e:  # a JSON file that is not such a table
        err.print(f"error: {table_path}: not a table of every task ({type(e).__name__}: {e})")
        return 2
    title = f"{table.weights} under every task: PSNR, lowest (head accuracy) by decision"
    out = Table(title=title, caption="other decisions than auto's are scored under one-hot tasks")
    out.add_column("task", justify="left")
    out.add_column("n", justify="right")
    out.add_column("input", justify="right")
    for name in columns:
        out.add_column(name, justify="right")
    first = next(iter(columns.values()))
    for k, row in enumerate(first):
        cells = [f"{_f(r.psnr)}, {_f(r.min_psnr)} ({_pct(r.head_accuracy)})"
                 for r in (rows[k] for rows in columns.values())]  # fmt: skip
        out.add_row(row.task, str(row.n), _f(row.input_psnr), *cells)
    Console().print(out)
    if verdicts is not None:
        losing = [v for v in verdicts if v.loses]
        Console(highlight=False).print(
            f"against {reference.weights}: "  # type: ignore[union-attr]
            + ("; ".join(f"{v.task} loses ({v.why})" for v in losing) if losing
               else f"no row loses ({len(verdicts)} rows)")
        )  # fmt: skip
    return 0
