"""Shared pytest setup for opir's tests."""

import os

# Triton reads this when it is first imported: set it before any test module imports opir, so
# kernel tests on CPU run the Triton kernels through its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")


import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test. Small tensors gain nothing from two, and on a busy
    2-core machine OpenMP's spinning second thread makes them 10-20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHARED_DATA = Path(
    os.environ.get("OPIR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
_MISSING = f"shared data folder not found at {SHARED_DATA} (set OPIR_DATA)"
# For a module whose parametrized paths point into the data (`from conftest import ...`, as
# pytest puts tests/ on the path); a test body takes the `shared_data` fixture instead.
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=_MISSING)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder of real photos (`$OPIR_DATA`, else `../shared/data` beside the
    checkout). Skips the test, saying where it looked, when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(_MISSING)
    return SHARED_DATA


@pytest.fixture(scope="session")
def crop_data(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Callable[..., Path]:
    """`crop_data(files, held_out)`: a fresh folder holding a 62x46 crop of each shared-data
    file ((source relative to the shared data, destination) pairs), written as PNG, plus
    `split.json` holding `held_out` aside. Skips the test when the shared data is absent."""
    from PIL import Image

    def write(files: list[tuple[str, str]], held_out: dict[str, list[str]]) -> Path:
        root = tmp_path_factory.mktemp("data")
        for source, dest in files:
            (root / dest).parent.mkdir(parents=True, exist_ok=True)
            with Image.open(shared_data / source) as im:
                im.convert("RGB").crop((40, 30, 40 + 62, 30 + 46)).save(root / dest)
        (root / "split.json").write_text(json.dumps({"validation": held_out}))
        return root

    return write


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny OPIR, every parameter moved by N(0, 0.02) so outputs differ from inputs,
    saved with its card: the checkpoint the engine, restore and Ray tests load."""
    import torch

    from opir_engine.model import OPIR, OPIRConfig
    from opir_engine.weights import save_checkpoint

    path = tmp_path_factory.mktemp("weights") / "test-tiny.safetensors"
    torch.manual_seed(0)
    model = OPIR(OPIRConfig.from_name("tiny"))
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=noise))
    save_checkpoint(path, model, {"name": "test-tiny"})
    return path
