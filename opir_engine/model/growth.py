"""Growing a trained model deeper: more NAFBlocks per level, the trained weights kept.

A NAFBlock starts as the identity (its `beta` and `gamma` are zero, see `nafnet.NAFBlock`), so a
model with extra blocks, given every weight of a trained shallower one, computes exactly what
the trained model computes. Fine-tuning it then starts from the trained model's quality instead
of from scratch, and only has to learn what the new blocks add: on a 2-core CPU, where a run
from scratch costs days, that is the affordable way to more capacity.
"""

from __future__ import annotations

import dataclasses

from opir_engine.model.config import OPIRConfig
from opir_engine.model.nafnet import NAFBlock
from opir_engine.model.opir import OPIR

_BLOCK_COUNTS = ("enc_blocks", "middle_blocks", "dec_blocks")
# Not a weight: a run's threshold comes from its own config, as it did before growth existed.
_RUNTIME = ("clean_threshold",)
# The `--task auto` classifier is trained apart from the restoration (`opir train-classifier`,
# which copies it onto restoration weights with `--from`), so a run may start from weights that
# carry another kind of classifier (the shipped trunk): the restoration is copied, the run keeps
# its own classifier.
_CLASSIFIER = ("classifier", "classifier_width")


class GrowthError(ValueError):
    """The trained model cannot be grown into the requested one."""


def can_grow(source: OPIRConfig, target: OPIRConfig) -> None:
    """Raise GrowthError unless `target` is `source` with the same or more blocks everywhere
    (and any classifier)."""
    free = {*_BLOCK_COUNTS, *_RUNTIME, *_CLASSIFIER}
    same = {f.name for f in dataclasses.fields(OPIRConfig)} - free
    differ = sorted(k for k in same if getattr(source, k) != getattr(target, k))
    if differ:
        raise GrowthError(
            "only block counts may differ when growing a model; these differ too: "
            + ", ".join(f"{k} ({getattr(source, k)} -> {getattr(target, k)})" for k in differ)
        )
    levels = len(source.enc_blocks)
    if len(target.enc_blocks) != levels or len(target.dec_blocks) != levels:
        raise GrowthError(f"the number of U-Net levels must stay {levels}")
    pairs = [
        *zip(source.enc_blocks, target.enc_blocks, strict=True),
        (source.middle_blocks, target.middle_blocks),
        *zip(source.dec_blocks, target.dec_blocks, strict=True),
    ]
    if any(new < old for old, new in pairs):
        raise GrowthError(
            f"a grown model needs at least the trained model's blocks at every level, got "
            f"enc {target.enc_blocks}, middle {target.middle_blocks}, dec {target.dec_blocks} "
            f"for enc {source.enc_blocks}, middle {source.middle_blocks}, dec {source.dec_blocks}"
        )


def same_classifier(source: OPIRConfig, target: OPIRConfig) -> bool:
    """Whether the two configs' classifiers have the same kind and width (same weights)."""
    return all(getattr(source, k) == getattr(target, k) for k in _CLASSIFIER)


def grow(source: OPIR, target: OPIR) -> list[str]:
    """Copy every weight of `source` into `target` (same names: a level's first blocks), in
    place; `target`'s extra blocks keep their identity start. When the classifiers differ
    (`same_classifier`), `target` keeps its own and only the restoration is copied.

    Returns the names of the added blocks. Raises GrowthError when the configs do not allow it
    or an added block is not the identity (its beta or gamma not zero).
    """
    can_grow(source.config, target.config)
    trained = source.state_dict()
    state = target.state_dict()
    blocks = {n for n, m in target.named_modules() if isinstance(m, NAFBlock)}
    added = sorted(blocks - {n for n, m in source.named_modules() if isinstance(m, NAFBlock)})
    for name in added:
        block = target.get_submodule(name)
        if block.beta.any() or block.gamma.any():  # type: ignore[union-attr]
            raise GrowthError(f"added block {name} is not the identity (beta or gamma not zero)")
    # can_grow leaves only NAFBlocks to differ, and a level's first blocks keep their names
    # (Sequential indices), so every trained weight has its place at the same name and shape.
    own = () if same_classifier(source.config, target.config) else ("classifier.", "head.")
    for key, tensor in trained.items():
        if not key.startswith(own):
            state[key] = tensor
    target.load_state_dict(state)
    return added
