"""The HTML report of a batch: one static page to review the run, with thumbnails beside it.

`write_html_report(records, Path("run.html"))` writes JPEG thumbnails (long side 320 px) of each
input, output and uncertainty map into `run_files/` beside the page, then the page. The page
opens offline: inline CSS and JS, no network, every link relative to the page (a thumbnail's
click opens the full-size file). Rows sort by clicking a column header; they open with the
largest changes first, and a button puts the least confident calls first.

Thumbnails are made here, at report time, from the files on disk, so the Ray backend's workers
do nothing more than restore; a file that cannot be read simply gets no thumbnail.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html import escape
from pathlib import Path
from urllib.parse import quote

from opir_engine.batch.runner import FileRecord, Summary, uncertainty_path
from opir_engine.image_io import ImageIOError, read_rgb8, write_image

THUMBNAIL_SIDE = 320
_THUMBNAIL_QUALITY = 80
_THUMBNAIL_NAME = re.compile(r"[0-9a-f]{20}\.jpg")  # only names this module makes are deleted


@dataclass(frozen=True)
class Thumbnail:
    path: Path  # the JPEG in the thumbnail folder
    width: int
    height: int


@dataclass(frozen=True)
class RowPictures:
    """The thumbnails of one record; None where the file is missing or unreadable."""

    before: Thumbnail | None
    after: Thumbnail | None
    uncertainty: Thumbnail | None


def thumbnail_folder(page: Path) -> Path:
    """`run.html` -> `run_files/` beside it."""
    return page.with_name(f"{page.stem}_files")


def write_html_report(
    records: Sequence[FileRecord], path: Path, summary: Summary | None = None
) -> None:
    """Write the thumbnails, then the page, atomically (a reader never sees half a page)."""
    pictures = make_thumbnails(records, thumbnail_folder(path))
    page = render_page(records, pictures, path.parent, summary)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)


def make_thumbnails(
    records: Sequence[FileRecord], folder: Path, side: int = THUMBNAIL_SIDE
) -> list[RowPictures]:
    """Thumbnails of each record's input, output (not for a failed file: an output there is an
    older run's) and uncertainty map, long side at most `side`, one `RowPictures` per record.

    A thumbnail is named by its source's path, size and mtime, so a report written again over
    the same files reuses it; thumbnails in `folder` that no record uses any more are deleted.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sources: list[Path | None] = []
    for r in records:
        ok = r.status != "failed"
        out = Path(r.output)
        sources += [Path(r.input), out if ok else None, uncertainty_path(out) if ok else None]
    # Decoding and encoding run in Pillow without the GIL: threads overlap them.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        thumbs = list(pool.map(lambda s: _thumbnail(s, folder, side), sources))
    used = {t.path.name for t in thumbs if t is not None}
    for entry in folder.iterdir():
        if _THUMBNAIL_NAME.fullmatch(entry.name) and entry.name not in used:
            with contextlib.suppress(OSError):
                entry.unlink()
    return [RowPictures(*thumbs[i : i + 3]) for i in range(0, len(thumbs), 3)]


def _thumbnail(source: Path | None, folder: Path, side: int) -> Thumbnail | None:
    if source is None:
        return None
    try:
        stat = source.stat()
        key = f"{os.path.abspath(source)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{side}"
        path = folder / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.jpg"
        if path.is_file():
            rgb = read_rgb8(path)
        else:
            rgb = read_rgb8(source, side)
            write_image(path, rgb.float() / 255, quality=_THUMBNAIL_QUALITY)
    except (ImageIOError, OSError, ValueError, MemoryError):
        return None  # a missing or unreadable file: the row shows no picture
    return Thumbnail(path, rgb.shape[2], rgb.shape[1])


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


def render_page(
    records: Sequence[FileRecord],
    pictures: Sequence[RowPictures],
    page_dir: Path,
    summary: Summary | None = None,
) -> str:
    """The whole HTML page; `page_dir` is the folder it will be written to (links start there)."""
    names = _display_names([r.input for r in records])
    rows = [
        _row(i, r, p, name, page_dir)
        for i, (r, p, name) in enumerate(zip(records, pictures, names, strict=True))
    ]
    failed = [
        (i, r, n)
        for i, (r, n) in enumerate(zip(records, names, strict=True))
        if r.status == "failed"
    ]
    failures = "".join(
        f'<li><a href="#row-{i}">{escape(n)}</a>: {escape(r.error)}</li>' for i, r, n in failed
    )
    failures = f"<section class=failed><h2>Failed ({len(failed)})</h2><ul>{failures}</ul></section>"
    return _PAGE.format(
        title=f"opir restore report: {len(records)} file{'s' * (len(records) != 1)}",
        summary=_summary_line(records, summary),
        written=time.strftime("%Y-%m-%d %H:%M"),
        filter_options=_filter_options(records),
        failures=failures if failed else "",
        rows="\n".join(rows),
        css=_CSS,
        js=_JS,
    )


def _display_names(inputs: Sequence[str]) -> list[str]:
    """Inputs relative to the folder that holds them all (a folder run: the input folder)."""
    absolute = [os.path.abspath(p) for p in inputs]
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    except ValueError:  # several drives (Windows): no common folder
        return list(inputs)
    return [os.path.relpath(p, root) for p in absolute]


def _href(target: str | Path, page_dir: Path) -> str:
    """A link from the page to `target`: relative, percent-encoded, HTML-escaped."""
    absolute = os.path.abspath(target)
    try:
        relative = Path(os.path.relpath(absolute, os.path.abspath(page_dir))).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return escape(Path(absolute).as_uri())
    return escape(quote(relative))


def _img(thumb: Thumbnail, page_dir: Path, alt: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return (
        f'<img{klass} src="{_href(thumb.path, page_dir)}" width="{thumb.width}" '
        f'height="{thumb.height}" loading="lazy" decoding="async" alt="{alt}">'
    )


def _row(i: int, r: FileRecord, pics: RowPictures, name: str, page_dir: Path) -> str:
    psnr = r.psnr_vs_input
    px = r.width * r.height if r.width and r.height else None
    data = {
        "i": i,
        "name": name,
        "status": r.status,
        "task": r.task,
        "conf": r.confidence,
        "psnr": "Infinity" if psnr == math.inf else psnr,  # what JS's parseFloat reads
        "ms": r.ms,
        "px": px,
    }
    attrs = " ".join(f'data-{k}="{escape(str(v))}"' for k, v in data.items() if v not in (None, ""))
    in_href, out_href = _href(r.input, page_dir), _href(r.output, page_dir)
    before, after = pics.before, pics.after
    if before and after:
        picture = (
            f'<div class=ba><a class=frame href="{out_href}">'
            f"{_img(before, page_dir, 'before')}{_img(after, page_dir, 'after', 'after')}"
            "<span class=line></span><span class='tag l'>before</span>"
            "<span class='tag r'>after</span></a>"
            '<input type=range min=0 max=100 value=50 aria-label="before / after"></div>'
        )
    elif before or after:
        only, href, label = (before, in_href, "before") if before else (after, out_href, "after")
        picture = f'<a class=frame href="{href}">{_img(only, page_dir, label)}</a>'  # type: ignore[arg-type]
    else:
        picture = "<div class=nopic>no preview</div>"
    output = ""
    if r.status != "failed":
        output = (
            f'<div class=out>&rarr; <a href="{out_href}">{escape(Path(r.output).name)}</a></div>'
        )
    error = f"<div class=err>{escape(r.error)}</div>" if r.error else ""
    um = ""
    if pics.uncertainty:
        um_href = _href(uncertainty_path(Path(r.output)), page_dir)
        um = f'<a href="{um_href}">{_img(pics.uncertainty, page_dir, "uncertainty map")}</a>'
    cells = [
        f"<td class=pic>{picture}</td>",
        f'<td class=name><a href="{in_href}">{escape(name)}</a>{output}{error}</td>',
        f"<td><span class='badge {r.status}'>{r.status}</span></td>",
        f"<td><span class='task {escape(r.task)}'>{escape(r.task) or '&ndash;'}</span></td>",
        f"<td class=num>{_number(r.confidence, '{:.2f}')}</td>",
        f"<td class=num>{_change(r)}</td>",
        f"<td class=num>{_number(r.ms and r.ms / 1000, '{:.2f} s')}</td>",
        f"<td class=num>{f'{r.width}&times;{r.height}' if px else '&ndash;'}</td>",
        f"<td class=um>{um}</td>",
    ]
    return f'<tr id="row-{i}" {attrs}>{"".join(cells)}</tr>'


def _number(value: float | None, fmt: str) -> str:
    return "&ndash;" if value is None else fmt.format(value)


def _change(r: FileRecord) -> str:
    if r.psnr_vs_input == math.inf:
        return "unchanged"
    return _number(r.psnr_vs_input, "{:.1f} dB")


def _summary_line(records: Sequence[FileRecord], summary: Summary | None) -> str:
    counts = Counter(r.status for r in records)
    parts = [f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"]
    tasks = Counter(r.task for r in records if r.status == "done")
    if tasks:
        parts.append(", ".join(f"{t} {n}" for t, n in sorted(tasks.items())))
    if summary is not None:
        parts.append(f"wall time {summary.wall_s:.1f} s")
        if summary.ms_p50 is not None:
            parts.append(f"per image p50 {summary.ms_p50:g} ms, p95 {summary.ms_p95:g} ms")
    return " &middot; ".join(escape(p) for p in parts)


def _filter_options(records: Sequence[FileRecord]) -> str:
    options = [f'<option value="">all ({len(records)})</option>']
    tasks = Counter(r.task for r in records if r.task)
    for task, n in sorted(tasks.items()):
        options.append(f'<option value="task:{escape(task)}">{escape(task)} ({n})</option>')
    statuses = Counter(r.status for r in records)
    for status in ("failed", "skipped"):
        if statuses[status]:
            options.append(
                f'<option value="status:{status}">{status} ({statuses[status]})</option>'
            )
    return "".join(options)


_CSS = """
:root { font: 14px/1.4 system-ui, sans-serif; color: #1d1d1f; background: #f4f4f6; }
body { margin: 0; }
header { padding: 14px 20px 10px; background: #fff; border-bottom: 1px solid #ddd; }
h1 { font-size: 19px; margin: 0 0 2px; }
h2 { font-size: 15px; margin: 10px 0 4px; }
.meta, .hint { color: #555; margin: 2px 0; }
.toolbar { margin-top: 8px; display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
.toolbar button, .toolbar select { font: inherit; padding: 3px 10px; border: 1px solid #bbb;
  border-radius: 4px; background: #fff; cursor: pointer; }
.toolbar button:hover { background: #eef; }
.failed ul { margin: 0; padding-left: 20px; color: #8a1010; max-height: 12em; overflow: auto; }
.failed a { color: inherit; }
table { border-collapse: collapse; width: 100%; background: #fff; }
thead th { position: sticky; top: 0; z-index: 2; background: #e9e9ee; text-align: left;
  padding: 6px 8px; border-bottom: 1px solid #c8c8cc; white-space: nowrap; }
th[data-sort] { cursor: pointer; }
th[data-sort]:hover { background: #dcdce6; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td { padding: 6px 8px; border-bottom: 1px solid #eee; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:target { outline: 2px solid #c33; }
.frame { position: relative; display: inline-block; line-height: 0; }
.frame img { max-width: 320px; height: auto; background: #ddd; }
.frame img.after { position: absolute; left: 0; top: 0; width: 100%; height: 100%;
  clip-path: inset(0 0 0 var(--cut, 50%)); }
.line { position: absolute; top: 0; bottom: 0; left: var(--cut, 50%); width: 2px;
  margin-left: -1px; background: #fff; box-shadow: 0 0 3px #0008; }
.tag { position: absolute; top: 4px; font-size: 11px; line-height: 1.3; padding: 0 4px;
  background: #000a; color: #fff; border-radius: 3px; }
.tag.l { left: 4px; } .tag.r { right: 4px; }
.ba { display: inline-block; }
.ba input { display: block; width: 100%; margin: 4px 0 0; }
.nopic { width: 160px; height: 60px; display: grid; place-items: center; color: #888;
  background: repeating-linear-gradient(45deg, #f3f3f3 0 8px, #e8e8e8 8px 16px); }
.name { word-break: break-all; max-width: 28em; }
.name a { color: #1a4fb0; text-decoration: none; }
.out { color: #666; font-size: 12px; }
.err { color: #8a1010; margin-top: 4px; }
.badge { padding: 1px 6px; border-radius: 3px; font-size: 12px; background: #e6f4e6;
  color: #1d5e1d; }
.badge.failed { background: #fde3e3; color: #8a1010; }
.badge.skipped { background: #eee; color: #555; }
.task { font-weight: 600; }
.task.rain { color: #1f5fbf; } .task.snow { color: #5a6f8a; } .task.haze { color: #a06a10; }
.task.clean { color: #2d7d2d; }
.um img { max-width: 120px; height: auto; }
"""

# Sorting moves the existing rows (no re-rendering), ties and missing values kept in run order
# and missing values last in both directions.
_JS = """
(() => {
  const body = document.querySelector('#files tbody');
  const rows = Array.from(body.rows);
  const numeric = new Set(['i', 'conf', 'psnr', 'ms', 'px']);
  let current = {key: null, dir: 1};
  const value = (row, key) => {
    const v = row.dataset[key];
    if (v === undefined) return null;
    if (!numeric.has(key)) return v.toLowerCase();
    const x = parseFloat(v);
    return Number.isNaN(x) ? null : x;
  };
  const sortBy = (key, dir) => {
    const sorted = rows.slice().sort((a, b) => {
      const x = value(a, key), y = value(b, key);
      if (x === null || y === null) {
        if (x !== y) return x === null ? 1 : -1;
      } else if (x !== y) {
        return x < y ? -dir : dir;
      }
      return a.dataset.i - b.dataset.i;
    });
    const fragment = document.createDocumentFragment();
    for (const row of sorted) fragment.appendChild(row);
    body.appendChild(fragment);
    current = {key, dir};
    for (const th of document.querySelectorAll('th[data-sort]')) {
      const on = th.dataset.sort === key;
      th.setAttribute('aria-sort', on ? (dir > 0 ? 'ascending' : 'descending') : 'none');
    }
  };
  document.addEventListener('click', (event) => {
    const th = event.target.closest('th[data-sort]');
    if (th) {
      const key = th.dataset.sort;
      sortBy(key, current.key === key ? -current.dir : 1);
      return;
    }
    const button = event.target.closest('button[data-sort]');
    if (button) sortBy(button.dataset.sort, button.dataset.dir === 'desc' ? -1 : 1);
  });
  document.addEventListener('input', (event) => {
    if (event.target.matches('.ba input')) {
      event.target.parentElement.style.setProperty('--cut', event.target.value + '%');
    }
  });
  document.getElementById('filter').addEventListener('change', (event) => {
    const [key, wanted] = event.target.value.split(':');
    for (const row of rows) row.hidden = Boolean(key) && row.dataset[key] !== wanted;
  });
  sortBy('psnr', 1);
})();
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p class=meta>{summary} &middot; written {written}</p>
<p class=hint>Change is the PSNR of the output against the input: the lower, the more the photo
changed. Drag a picture's slider to compare before and after; click it for the full-size output.
</p>
<div class=toolbar>
<span>Check first:</span>
<button type=button data-sort=psnr data-dir=asc>Largest changes</button>
<button type=button data-sort=conf data-dir=asc>Lowest confidence</button>
<button type=button data-sort=i data-dir=asc>Run order</button>
<label>Show <select id=filter>{filter_options}</select></label>
</div>
{failures}
</header>
<table id=files>
<thead><tr>
<th>Before | after</th>
<th data-sort=name>Name</th>
<th data-sort=status>Status</th>
<th data-sort=task>Task</th>
<th data-sort=conf>Confidence</th>
<th data-sort=psnr>Change (PSNR)</th>
<th data-sort=ms>Time</th>
<th data-sort=px>Size</th>
<th>Uncertainty</th>
</tr></thead>
<tbody>
{rows}
</tbody>
</table>
<script>{js}</script>
</body>
</html>
"""
