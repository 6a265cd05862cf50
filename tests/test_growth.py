"""Growing a trained model deeper (model/growth.py), alone and as `opir train --init`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from opir_engine.cli.app import app
from opir_engine.model import OPIR, GrowthError, OPIRConfig, grow
from opir_engine.model.growth import can_grow
from opir_engine.training.recipe import DataSpec, Recipe, TrainingError
from opir_engine.training.trainer import Trainer
from opir_engine.weights import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TINY = OPIRConfig.from_name("tiny")
DEEPER = dataclasses.replace(TINY, enc_blocks=(2, 3), middle_blocks=2, dec_blocks=(1, 2))


def _trained(config: OPIRConfig, seed: int = 0) -> OPIR:
    """A model whose every weight is non-trivial: beta and gamma too, so its blocks act."""
    torch.manual_seed(seed)
    model = OPIR(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _outputs(model: OPIR, x: torch.Tensor) -> list[torch.Tensor]:
    mixed = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    haze = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    with torch.no_grad():
        return [t for w in (mixed, haze) for t in (model(x, w).restored, model(x, w).uncertainty)]


def test_a_grown_model_computes_exactly_what_the_trained_one_does() -> None:
    source = _trained(TINY)
    target = OPIR(DEEPER).eval()
    added = grow(source, target)
    # decoders run deepest level first: dec_blocks (1, 2) gives decoders.0 its second block
    assert added == ["kpn.decoders.0.1", "kpn.encoders.0.1", "kpn.encoders.1.1",
                     "kpn.encoders.1.2", "kpn.middle.1"]  # fmt: skip
    x = torch.rand(2, 3, 20, 28)
    for a, b in zip(_outputs(source, x), _outputs(target, x), strict=True):
        assert torch.equal(a, b)
    # the trained weights were copied, not shared: training the grown model leaves them alone
    with torch.no_grad():
        target.kpn.intro.weight.add_(1.0)
    assert not torch.equal(source.kpn.intro.weight, target.kpn.intro.weight)


def test_growing_into_the_same_config_is_a_plain_copy() -> None:
    source, target = _trained(TINY, seed=1), OPIR(TINY)
    # the clean threshold is not a weight: an init with another one loads, as before growth
    source.config = dataclasses.replace(TINY, clean_threshold=0.3)
    assert grow(source, target) == []
    assert target.config.clean_threshold == TINY.clean_threshold
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor)


def test_weights_with_another_classifier_give_their_restoration_and_keep_the_runs_head() -> None:
    # shipped weights carry the trunk classifier; a run trains the restoration with its own head
    source = _trained(dataclasses.replace(TINY, classifier="trunk"), seed=3)
    torch.manual_seed(4)
    target = OPIR(TINY).eval()
    head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("head.")}
    assert grow(source, target) == []
    x = torch.rand(2, 3, 20, 28)
    for a, b in zip(_outputs(source, x), _outputs(target, x), strict=True):
        assert torch.equal(a, b)  # the restoration under a given task is the source's
    for key, tensor in head.items():
        assert torch.equal(target.state_dict()[key], tensor)
    assert not any(k.startswith("classifier.") for k in target.state_dict())


def test_a_grown_block_that_is_not_the_identity_is_refused() -> None:
    target = OPIR(DEEPER)
    with torch.no_grad():
        target.kpn.middle[1].gamma.fill_(0.5)
    with pytest.raises(GrowthError, match=r"added block kpn.middle.1 is not the identity"):
        grow(_trained(TINY), target)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (dataclasses.replace(TINY, width=12), r"these differ too: width \(8 -> 12\)"),
        (dataclasses.replace(TINY, dilations=(1, 2)), r"dilations \(\(1, 2, 3, 4\) -> \(1, 2\)\)"),
        (dataclasses.replace(TINY, enc_blocks=(1, 1, 1), dec_blocks=(1, 1, 1)),
         r"the number of U-Net levels must stay 2"),
        (dataclasses.replace(DEEPER, middle_blocks=1, enc_blocks=(2, 1)),
         r"at least the trained model's blocks at every level"),
    ],
)  # fmt: skip
def test_configs_that_cannot_be_grown_say_why(target: OPIRConfig, message: str) -> None:
    source = DEEPER if "at least" in message else TINY
    with pytest.raises(GrowthError, match=message):
        can_grow(source, target)


def test_small_grows_into_small_deep() -> None:
    small, deep = OPIRConfig.from_name("small"), OPIRConfig.from_name("small-deep")
    can_grow(small, deep)
    with pytest.raises(GrowthError):
        can_grow(deep, small)


def _spec(tmp_path: Path) -> DataSpec:
    return DataSpec(paired={"rain": [str(tmp_path)]}, clean=[str(tmp_path)])


def test_trainer_init_grows_and_records_the_config_it_grew_from(tmp_path: Path) -> None:
    source = _trained(OPIRConfig.from_name("small"), seed=2)
    weights = tmp_path / "small.safetensors"
    save_checkpoint(weights, source, {"steps": 7})
    trainer = Trainer(tmp_path / "run", Recipe(config="small-deep"), _spec(tmp_path), weights)
    assert trainer.model.config == OPIRConfig.from_name("small-deep")
    x = torch.rand(1, 3, 32, 48)
    for a, b in zip(_outputs(source, x), _outputs(trainer.model.eval(), x), strict=True):
        assert torch.equal(a, b)
    assert trainer.init is not None and trainer.init["steps"] == 7
    assert trainer.init["grown_from"]["middle_blocks"] == 1
    # the same config loads as before, with no growth recorded
    same = Trainer(tmp_path / "same", Recipe(config="small"), _spec(tmp_path), weights)
    assert same.init is not None and "grown_from" not in same.init


def test_trainer_init_from_shipped_weights_records_the_classifier_it_left(tmp_path: Path) -> None:
    source = _trained(dataclasses.replace(OPIRConfig.from_name("small"), classifier="trunk"))
    weights = tmp_path / "shipped.safetensors"
    save_checkpoint(weights, source, {"steps": 9})
    trainer = Trainer(tmp_path / "run", Recipe(config="small"), _spec(tmp_path), weights)
    assert trainer.model.config.classifier == "bottleneck"
    assert trainer.init is not None and trainer.init["classifier_not_copied"] == "trunk"
    assert "grown_from" not in trainer.init and trainer.init["steps"] == 9


def test_train_refuses_an_init_it_cannot_grow_with_one_line(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "tiny.safetensors", _trained(TINY), {})
    with pytest.raises(TrainingError, match=r"tiny.safetensors: cannot start a small run from it"):
        Trainer(tmp_path / "run", Recipe(config="small"), _spec(tmp_path),
                tmp_path / "tiny.safetensors")  # fmt: skip
    result = CliRunner().invoke(app, [
        "train", "--out", str(tmp_path / "cli"), "--config", "small", "--clean", str(tmp_path),
        "--init", str(tmp_path / "tiny.safetensors"), "--steps", "1",
    ])  # fmt: skip
    assert result.exit_code == 2
    assert "cannot start a small run from it: only block counts may differ" in result.output
    assert "width (8 -> 16)" in result.output
    assert not (tmp_path / "cli" / "state").exists()
    assert json.loads((tmp_path / "tiny.json").read_text()) is not None  # the init is untouched
