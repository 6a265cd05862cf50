"""A plain (non-editable) install ships `kernels/` as `opir_kernels` (its C source included, built
there at first use) and the weights package."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)],
        check=True, cwd=out,
    )  # fmt: skip
    (built,) = out.glob("opir-*.whl")
    return built


def test_wheel_holds_opir_kernels_not_kernels(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "opir_kernels/inverse_operator.py" in names
    assert "opir_kernels/inverse_operator_cpu.c" in names  # built at first use
    # every module of the source tree is in the wheel (a subpackage left out of pyproject's
    # package list would be missing here)
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "opir_engine").rglob("*.py")}
    assert sources and sources <= set(names), sorted(sources - set(names))
    assert "opir_weights/opir-small-allinone.safetensors" in names
    assert "opir_weights/opir-small-allinone.json" in names
    assert not any(n.startswith("kernels/") for n in names)  # PyPI's `kernels` owns that name


def test_plain_install_imports_the_kernels(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True,
    )  # fmt: skip
    code = (
        "import opir_kernels.inverse_operator as k, opir_engine, torch;"
        "from opir_engine.weights import list_shipped;"
        "print(k.__file__); print(opir_engine.__file__);"
        "print(hasattr(torch.ops.opir, 'inverse_operator'));"
        "print([n for n, _ in list_shipped()]);"
        "from opir_kernels import native; print(native.available(), native.SOURCE)"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "OPIR_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
        check=True,
    )  # fmt: skip
    kernels_file, engine_file, registered, shipped, built = result.stdout.strip().splitlines()
    assert Path(kernels_file).is_relative_to(target)  # the installed copy, not the checkout
    assert Path(engine_file).is_relative_to(target)
    assert registered == "True"
    assert "opir-small-allinone" in shipped
    available, source = built.split(" ", 1)
    assert available == "True" and Path(source).is_relative_to(target)  # built from the wheel
