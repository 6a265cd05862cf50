"""Tests for the HTML report of `opir restore` (`batch/html_report.py`).

The renderer is tested on real sample photos and records written here; the end-to-end test runs
the real `opir restore` on the samples plus a broken file, then opens the page in a real headless
Chromium: every picture loads, header clicks sort the rows, and the screenshot is not blank.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from opir_engine.batch.html_report import THUMBNAIL_SIDE, thumbnail_folder
from opir_engine.batch.runner import (
    FileRecord,
    UsageError,
    change_psnr,
    check_report_path,
    uncertainty_path,
    write_report,
)
from opir_engine.image_io import read_image, write_image

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
OPIR_SCRIPT = Path(sys.executable).with_name("opir")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)"
)
NASTY = '<img src=x onerror="alert(1)">&.jpg'  # a legal file name on Linux


class _Tags(HTMLParser):
    """Every start tag of a page as (tag, attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: Path, name: str) -> list[dict[str, str | None]]:
    parser = _Tags()
    parser.feed(page.read_text(encoding="utf-8"))
    return [attrs for tag, attrs in parser.tags if tag == name]


def _restored(src: Path, dst: Path) -> None:
    """A stand-in output: the photo darkened, written as the engine's outputs are."""
    write_image(dst, read_image(src).rgb * 0.8)


def _batch(tmp_path: Path) -> list[FileRecord]:
    """in/ with three samples (one under a name full of HTML) and a truncated file, out/ with
    two outputs and one uncertainty map, and the records a run would have made of them."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    shutil.copy(SAMPLES / "rocket_haze.jpg", src / "rocket haze#1.jpg")
    shutil.copy(SAMPLES / "chelsea_rain.jpg", src / NASTY)
    shutil.copy(SAMPLES / "coffee_clean.jpg", src / "coffee.jpg")
    (src / "broken.jpg").write_bytes((SAMPLES / "astronaut_snow.jpg").read_bytes()[:2000])
    _restored(src / "rocket haze#1.jpg", out / "rocket haze#1.png")
    _restored(src / NASTY, out / NASTY)
    write_image(uncertainty_path(out / NASTY), torch.rand(3, 300, 451), channels="gray")
    shutil.copy(src / "coffee.jpg", out / "coffee.jpg")  # an earlier run's output: skipped
    return [
        FileRecord(str(src / "rocket haze#1.jpg"), str(out / "rocket haze#1.png"), "done",
                   "haze", 0.61, 640, 427, 900.0, 1, "640x427", 12.5),
        FileRecord(str(src / NASTY), str(out / NASTY), "done", "rain", 0.97, 451, 300, 400.0, 1,
                   "451x300", 24.9),
        FileRecord(str(src / "coffee.jpg"), str(out / "coffee.jpg"), "skipped"),
        FileRecord(str(src / "broken.jpg"), str(out / "broken.jpg"), "failed",
                   error="truncated file <EOF>"),
    ]  # fmt: skip


def test_page_escapes_names_links_relatively_and_lists_failures(tmp_path: Path) -> None:
    records = _batch(tmp_path)
    page = tmp_path / "reports" / "run.html"
    page.parent.mkdir()
    write_report(records, page)
    text = page.read_text(encoding="utf-8")
    assert not list(page.parent.glob(".*.part"))  # the temporary page was renamed into place

    # The name with HTML in it is text, never markup; so is the error.
    assert '<img src=x onerror="alert(1)">' not in text and "<EOF>" not in text
    assert html.escape(NASTY) in text and "truncated file &lt;EOF&gt;" in text
    assert "Failed (1)" in text

    # Links: relative to the page, percent-encoded, and they reach the real files.
    links = [a["href"] for a in _tags(page, "a") if not a["href"].startswith("#")]
    assert "../in/rocket%20haze%231.jpg" in links and "../out/rocket%20haze%231.png" in links
    for href in links:
        assert not href.startswith(("/", "file:", "http")), href
        assert (page.parent / _unquote(href)).is_file(), href

    # Pictures: lazy thumbnails in run_files/, long side 320; the broken file has none, the
    # failed file shows no output and the uncertainty map is shown where it was written.
    images = _tags(page, "img")
    assert all(img["loading"] == "lazy" for img in images)
    thumbs = [page.parent / _unquote(img["src"]) for img in images]
    assert {t.parent for t in thumbs} == {thumbnail_folder(page)}
    for thumb in thumbs:
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and max(im.size) <= THUMBNAIL_SIDE
    # before + after (rocket), before + after + uncertainty (nasty), before + after (skipped)
    assert len(images) == 7
    assert sorted(img["alt"] for img in images).count("uncertainty map") == 1
    with Image.open(thumbs[0]) as im:
        assert max(im.size) == THUMBNAIL_SIDE  # the 640x427 rocket
    assert "no preview" in text

    # Rows carry what the page sorts on.
    rows = {r["data-name"]: r for r in _tags(page, "tr") if "data-i" in r}
    assert set(rows) == {"rocket haze#1.jpg", NASTY, "coffee.jpg", "broken.jpg"}
    assert rows[NASTY]["data-psnr"] == "24.9" and rows[NASTY]["data-conf"] == "0.97"
    assert rows["rocket haze#1.jpg"]["data-task"] == "haze"
    assert rows["broken.jpg"]["data-status"] == "failed" and "data-psnr" not in rows["broken.jpg"]
    headers = [th.get("data-sort") for th in _tags(page, "th")]
    assert {"name", "task", "conf", "psnr", "ms"} <= set(headers)
    assert "http://" not in text and "https://" not in text  # nothing from the network


def _unquote(href: str) -> str:
    from urllib.parse import unquote

    return unquote(href)


def test_thumbnails_are_reused_and_stale_ones_removed(tmp_path: Path) -> None:
    records = _batch(tmp_path)
    page = tmp_path / "run.html"
    write_report(records, page)
    folder = thumbnail_folder(page)
    (folder / "notes.txt").write_text("mine")  # not a thumbnail: never deleted
    made = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.jpg")}
    assert len(made) == 7

    write_report(records, page)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.jpg")} == made

    # An output replaced since (an --overwrite run) gets a new thumbnail; the old one goes.
    _restored(Path(records[0].input), Path(records[0].output).with_suffix(".tmp.png"))
    os.replace(Path(records[0].output).with_suffix(".tmp.png"), records[0].output)
    write_report(records[1:], page)
    left = {p.name for p in folder.glob("*.jpg")}
    assert len(left) == 5 and left < set(made)
    assert (folder / "notes.txt").read_text() == "mine"


def test_report_suffixes_and_psnr_vs_input(tmp_path: Path) -> None:
    check_report_path(tmp_path / "run.html")
    check_report_path(tmp_path / "run.HTML")
    with pytest.raises(UsageError, match=r"\.json, \.csv or \.html"):
        check_report_path(tmp_path / "run.htm")

    photo = read_image(SAMPLES / "chelsea_rain.jpg").rgb
    assert change_psnr(photo, photo) == math.inf
    darker = photo * 0.9
    mse = float(((photo.double() - darker.double()) ** 2).mean())
    assert change_psnr(darker, photo) == pytest.approx(10 * math.log10(1 / mse), abs=0.01)
    assert change_psnr(photo[:, :10], photo) is None

    # An unchanged photo (inf) is null in JSON, which has no infinity, and inf in CSV.
    records = [FileRecord("a.jpg", "b.jpg", "done", "clean", 0.9, psnr_vs_input=math.inf)]
    write_report(records, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["files"][0]["psnr_vs_input"] is None
    write_report(records, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["psnr_vs_input"]) == math.inf


# ----------------------------------------------------------------------------------------------
# end to end, in a real browser

# Loads every picture (lazy ones included), then clicks like a user and writes what it saw
# into the DOM, which --dump-dom prints.
_PROBE = """<script>
addEventListener('load', async () => {
  const images = [...document.images];
  for (const img of images) img.loading = 'eager';
  await Promise.all(images.map((img) => img.complete ? null : new Promise((done) => {
    img.addEventListener('load', done);
    img.addEventListener('error', done);
  })));
  const rows = () => [...document.querySelectorAll('#files tbody tr:not([hidden])')];
  const column = (key) => rows().map((r) => r.dataset[key] ?? null);
  const seen = {images: images.length,
                broken: images.filter((i) => !(i.naturalWidth > 0)).map((i) => i.src),
                initial: column('psnr')};
  document.querySelector('th[data-sort=name]').click();
  seen.byName = column('name');
  document.querySelector('th[data-sort=name]').click();
  seen.byNameReversed = column('name');
  document.querySelector('button[data-sort=conf]').click();
  seen.byConfidence = column('conf');
  const filter = document.getElementById('filter');
  filter.value = 'status:failed';
  filter.dispatchEvent(new Event('change'));
  seen.failedOnly = column('name');
  const slider = document.querySelector('.ba input');
  slider.value = 20;
  slider.dispatchEvent(new Event('input', {bubbles: true}));
  seen.cut = slider.parentElement.style.getPropertyValue('--cut');
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify(seen);
  document.body.append(out);
});
</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--virtual-time-budget=10000", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)  # type: ignore[arg-type]


def _sample_folder(folder: Path) -> list[str]:
    """The samples at 256 px (a quick run), one under an HTML name, plus a truncated file."""
    folder.mkdir()
    for path in sorted(SAMPLES.glob("*.jpg")):
        with Image.open(path) as im:
            im.thumbnail((256, 256), Image.Resampling.BOX)
            im.save(folder / path.name, quality=95)
    shutil.copy(folder / "chelsea_rain.jpg", folder / NASTY)
    (folder / "broken.jpg").write_bytes((folder / "rocket_haze.jpg").read_bytes()[:1500])
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
@needs_chromium
@pytest.mark.skipif(not OPIR_SCRIPT.is_file(), reason=f"no `opir` script at {OPIR_SCRIPT}")
def test_restore_report_opens_in_chromium(tmp_path: Path) -> None:
    names = _sample_folder(tmp_path / "in")
    page = tmp_path / "report" / "run.html"
    page.parent.mkdir()
    run = subprocess.run(
        [OPIR_SCRIPT, "restore", tmp_path / "in", tmp_path / "out", "--no-compile",
         "--save-uncertainty", "--report", page],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr  # the broken file failed, the rest were restored
    assert "broken.jpg: " in run.stderr and page.is_file()

    # The probe page sits beside the report, so every relative link is the report's own.
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"))
    dump = _chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dump.stdout, re.S)
    assert found, dump.stderr[-2000:]
    seen = json.loads(html.unescape(found.group(1)))

    # 5 photos restored: before and after each, plus the uncertainty maps written (none for a
    # photo passed through as clean); the broken file has no picture.
    maps = len(list((tmp_path / "out").glob("*.uncertainty.png")))
    assert seen["images"] == 2 * 5 + maps and seen["broken"] == []
    # Opens with the largest changes first (lowest PSNR), the failed file (no PSNR) last.
    psnr = [float(v) for v in seen["initial"] if v is not None]
    assert psnr == sorted(psnr) and len(psnr) == 5 and seen["initial"][-1] is None
    assert seen["byName"] == sorted(names, key=str.lower)
    assert seen["byNameReversed"] == sorted(names, key=str.lower, reverse=True)
    confidence = [float(v) for v in seen["byConfidence"][:-1]]
    assert confidence == sorted(confidence) and seen["byConfidence"][-1] is None
    assert seen["failedOnly"] == ["broken.jpg"]
    assert seen["cut"] == "20%"

    # What a user sees first is a rendered page with pictures, not a blank one.
    shot = tmp_path / "shot.png"
    _chromium(f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
              "--window-size=1280,900", page.as_uri())  # fmt: skip
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=float)
    assert pixels.shape == (900, 1280, 3) and pixels.std() > 20
