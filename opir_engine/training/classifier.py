"""Training the degradation classifier on whole images, as `--task auto` sees them.

The restoration run sees 128x128 crops; the engine classifies a whole photo from one copy at
most 512 px long (`engine.classification_view`). This second phase takes a trained checkpoint,
gives it a `trunk` classifier (model/classifier.py) and trains that alone, every other weight
unchanged, on views drawn the engine's way: a random part of a photo (at least `min_crop` of
each side), weather synthesized on it where the class asks for it, then the classification
view. Classes are balanced; the clean class includes the clean targets of the real pairs, so
the classifier learns the weather rather than the kind of scene (the haze pairs are indoor
rooms and hazy landscapes, the clean photos mostly outdoor). Synthetic rain views can also be
another renderer's rain layer laid on a clean photo (`transplant_ratio`, `synthesis.transplant`),
synthetic snow views larger flakes under a light veil (`snow_variety`) and a few flakes only
(`snow_sparse`): our renderer's streaks and flakes alone left real and heavy rain called haze
or clean, and sparse real snowfall clean.

Views are rendered once into a pool (synthesis costs more than a classifier step); steps take
random crops of them. A seeded part of the source photos is held out: its loss picks the
checkpoint (early stopping) and its views set the model's `clean_threshold` (the confidence
above which `--task auto` returns a photo unchanged); the validation split is
never read except to report accuracy at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from opir_engine.datasets import DataError, HeldOut, class_index, kept_images, kept_pairs, load_rgb
from opir_engine.evaluation.scoring import photo_items, validation_items
from opir_engine.inference.engine import classification_view
from opir_engine.model import CLASSES, OPIR, auto_decision
from opir_engine.model.padding import pad_reflect_to
from opir_engine.synthesis import (
    RAIN_VEIL,
    apply_snow,
    apply_veil,
    sample_snow_params,
    sample_veil_params,
    scale_for_size,
    synthesize,
    thin_snow,
)
from opir_engine.synthesis.transplant import rain_layer, random_transplant
from opir_engine.weights import load_checkpoint, save_checkpoint


class ClassifierTrainingError(Exception):
    """The data or options of a classifier run are unusable."""


# The share of the renderer's flakes a sparse snow view keeps: at 8-35% the thinnest views
# looked like clean photos' glints and foliage, and 3 of 61 held-out clean photos were called
# snow (1 without sparse views); see docs/experiments.md.
SPARSE_SNOW = (0.15, 0.4)


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the view pool is drawn and the classifier trained."""

    views_per_class: int = 1000
    real_ratio: float = 0.5  # weather views from real photos (when a class has any), else synthetic
    pair_target_ratio: float = 0.3  # clean views from the real pairs' clean targets
    min_crop: float = 0.6  # a view keeps at least this fraction of each side
    holdout: float = 0.15  # of the source photos, for early stopping
    width: int = 24  # the trunk's first width (16 reached 82% on held-out photos, 24 88%)
    steps: int = 4000
    batch: int = 32
    patch: int = 192
    lr: float = 1e-3
    weight_decay: float = 1e-2
    eval_every: int = 250
    max_side: int = 1024  # sources are loaded this long at most: weather is drawn at this size
    seed: int = 0
    # of the synthetic rain views, the share that is another renderer's rain layer laid on a
    # clean photo (`synthesis.transplant`): our renderer's streaks alone taught the classifier
    # to call real and heavy rain haze or clean
    transplant_ratio: float = 0.0
    # of the synthetic snow views, the share drawn with larger flakes (scale x1.5-3) and, half
    # of them, a light bright veil: falling snow as photos show it, near and in a snowy haze
    snow_variety: float = 0.0
    # of the other synthetic snow views, the share drawn with a few of the renderer's flakes
    # (`synthesis.thin_snow`): its dense draws alone left sparse real snowfall called clean
    snow_sparse: float = 0.0
    # of the synthetic rain views (rendered or transplanted), the share seen through a grey veil
    # of the rain's own mist (`synthesis.RAIN_VEIL`): real heavy rain is dim and grey, and the
    # classifier called it haze
    rain_veil: float = 0.0

    def __post_init__(self) -> None:
        for name in ("real_ratio", "pair_target_ratio", "holdout", "transplant_ratio",
                     "snow_variety", "snow_sparse", "rain_veil"):  # fmt: skip
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ClassifierTrainingError(f"{name} {value}: expected a share in [0, 1]")
        if not 0.0 < self.min_crop <= 1.0:
            raise ClassifierTrainingError(f"min_crop {self.min_crop}: expected a share in (0, 1]")
        for name in ("views_per_class", "steps", "batch", "patch", "width", "max_side"):
            if getattr(self, name) < 1:
                raise ClassifierTrainingError(f"{name} {getattr(self, name)}: expected >= 1")
        if self.lr <= 0:
            raise ClassifierTrainingError(f"lr {self.lr}: expected > 0")


@dataclass
class ClassifierData:
    """Where the classifier reads from; the split's files are never used for training."""

    paired: dict[str, list[str]] = field(default_factory=dict)
    photos: dict[str, list[str]] = field(default_factory=dict)  # degraded photos, no target
    clean: list[str] = field(default_factory=list)
    rain_layers: list[str] = field(default_factory=list)  # paired rain folders lending layers
    split: str | None = None
    data_root: str | None = None


@dataclass
class _Source:
    """One photo a view can be drawn from; `synth` names the weather drawn on it, if any."""

    label: str
    image: Tensor  # uint8 (3, H, W)
    key: str  # identifies the photo (pairs by their target), for the held-out part
    synth: str | None = None
    layer: int | None = None  # a transplant: the index of the rain layer laid on the photo
    variety: bool = False  # snow: larger flakes, maybe a veil (`ClassifierRecipe.snow_variety`)
    sparse: bool = False  # snow: a few flakes only (`ClassifierRecipe.snow_sparse`)
    veil: bool = False  # rain seen through its mist (`ClassifierRecipe.rain_veil`)


class _Sources:
    """Every photo training may use, loaded once: real degraded per task, pair targets, clean."""

    def __init__(self, data: ClassifierData, recipe: ClassifierRecipe) -> None:
        excluded = HeldOut()
        if data.split:
            if not data.data_root:
                raise ClassifierTrainingError(f"{data.split}: a validation split needs a data root")
            excluded = HeldOut.from_split(Path(data.split), Path(data.data_root))
        root = Path(data.data_root) if data.data_root else Path("/")

        def load(path: Path) -> Tensor:
            return load_rgb(path, recipe.max_side)

        self.real: dict[str, list[_Source]] = {t: [] for t in CLASSES[1:]}
        self.targets: list[_Source] = []
        for task, folders in data.paired.items():
            seen: set[Path] = set()
            for p in kept_pairs(folders, task, excluded, root):
                self.real[task].append(_Source(task, load(p.input), str(p.target)))
                if p.target not in seen:  # haze levels share one clean target
                    seen.add(p.target)
                    self.targets.append(_Source("clean", load(p.target), str(p.target)))
        for task, folders in data.photos.items():
            paths = kept_images(folders, excluded, root)
            self.real[task] += [_Source(task, load(q), str(q)) for q in paths]
        clean = kept_images(data.clean, excluded, root)
        self.clean = [_Source("clean", load(q), str(q)) for q in clean]
        if not self.clean:
            raise ClassifierTrainingError(f"no clean photos in {data.clean}")
        # the split's held-out pairs lend no layer: their rain is the transplant validation rows'
        try:
            self.layer_pairs = kept_pairs(data.rain_layers, "rain", excluded, root)
        except DataError as e:
            raise ClassifierTrainingError(f"rain layers: {e}") from e
        self.layers = [rain_layer(load(p.input), load(p.target)) for p in self.layer_pairs]
        self.layer_keys = [str(p.target) for p in self.layer_pairs]
        if recipe.transplant_ratio > 0 and not self.layers:
            raise ClassifierTrainingError(
                f"a transplant ratio of {recipe.transplant_ratio} needs rain pairs to lend "
                f"layers; none in {data.rain_layers}"
            )

    def pick(
        self, label: str, rng: np.random.Generator, recipe: ClassifierRecipe
    ) -> tuple[_Source, str]:
        """A source for a view of `label`, and which kind it is (real, pair target, synthetic)."""
        if label == "clean":
            if self.targets and rng.random() < recipe.pair_target_ratio:
                return self.targets[rng.integers(len(self.targets))], "pair_targets"
            return self.clean[rng.integers(len(self.clean))], "real"
        real = self.real[label]
        if real and rng.random() < recipe.real_ratio:
            return real[rng.integers(len(real))], "real"
        photo = self.clean[rng.integers(len(self.clean))]
        # drawn only when the option is on, so pools of runs without it stay as they were
        r = recipe
        if label == "rain" and r.transplant_ratio > 0 and rng.random() < r.transplant_ratio:
            layer = int(rng.integers(len(self.layers)))
            veil = r.rain_veil > 0 and rng.random() < r.rain_veil
            source = _Source(label, photo.image, photo.key, synth=label, layer=layer, veil=veil)
            return source, "transplant"
        if label == "rain" and r.rain_veil > 0 and rng.random() < r.rain_veil:
            return _Source(label, photo.image, photo.key, synth=label, veil=True), "synthetic"
        variety = label == "snow" and r.snow_variety > 0 and rng.random() < r.snow_variety
        sparse = (label == "snow" and not variety and r.snow_sparse > 0
                  and rng.random() < r.snow_sparse)  # fmt: skip
        source = _Source(label, photo.image, photo.key, synth=label, variety=variety, sparse=sparse)
        return source, "synthetic"

    def held_out(self, source: _Source, recipe: ClassifierRecipe) -> bool:
        """A view is held out when its photo is, or the rain layer laid on it: held-in views
        never show a held-out layer."""
        if source.layer is not None and _is_held_out(self.layer_keys[source.layer], recipe):
            return True
        return _is_held_out(source.key, recipe)


def _is_held_out(key: str, recipe: ClassifierRecipe) -> bool:
    """A seeded hash of the photo decides, so every view of one photo is on one side."""
    digest = hashlib.sha256(f"{recipe.seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < recipe.holdout


def render_view(
    source: _Source,
    rng: np.random.Generator,
    recipe: ClassifierRecipe,
    multiple: int,
    layers: list[Tensor] | None = None,
) -> Tensor:
    """A random part (at least `min_crop` of each side) and flip of the photo, weather drawn
    on it when the source asks for it (a transplant: `layers[source.layer]` fitted to the whole
    part, zoomed and at a random strength), as an 8-bit file would hold it, then the engine's
    classification view: uint8 (3, h, w)."""
    image = source.image
    h, w = image.shape[-2:]
    ch = round(h * rng.uniform(recipe.min_crop, 1.0))
    cw = round(w * rng.uniform(recipe.min_crop, 1.0))
    y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    crop = image[:, y : y + ch, x : x + cw].float() / 255.0
    if rng.random() < 0.5:
        crop = crop.flip(-1)
    if source.layer is not None:
        if layers is None:
            raise ClassifierTrainingError("a transplant view needs the rain layers")
        crop = random_transplant(crop, [layers[source.layer]], rng)
    elif source.synth is not None:
        crop = _synthesize(crop, source, rng)
    if source.veil:
        crop = apply_veil(crop.clamp(0, 1), sample_veil_params(rng, RAIN_VEIL))
    view = classification_view(crop.clamp(0, 1), multiple)[0]
    return (view * 255).round().to(torch.uint8)


def _synthesize(crop: Tensor, source: _Source, rng: np.random.Generator) -> Tensor:
    """`source.synth` weather drawn on `crop` (3, h, w); varied snow: flakes 1.5-3x larger and,
    one time in two, a bright veil of 5-25% (snow falling in its own haze); sparse snow: a share
    in `SPARSE_SNOW` of the renderer's flakes."""
    seed = int(rng.integers(0, 2**62))
    scale = scale_for_size(*crop.shape[-2:])
    if source.sparse:
        params = sample_snow_params(np.random.default_rng(seed), scale)
        return apply_snow(crop, thin_snow(params, float(rng.uniform(*SPARSE_SNOW))), seed)
    if not source.variety:
        return synthesize(crop, source.synth or "", seed, scale=scale)[0]
    crop, _ = synthesize(crop, "snow", seed, scale=scale * float(rng.uniform(1.5, 3.0)))
    if rng.random() < 0.5:
        veil, light = float(rng.uniform(0.05, 0.25)), float(rng.uniform(0.75, 0.95))
        crop = crop * (1 - veil) + light * veil
    return crop


@dataclass
class ViewPool:
    """Rendered views (uint8 (3, h, w), sizes vary), class indices and held-out flags."""

    views: list[Tensor]
    labels: Tensor
    held_out: Tensor
    counts: dict[str, dict[str, int]]  # per class: views from real / pair targets / synthetic
    layers: Tensor | None = None  # per view: the index of its transplanted rain layer, or -1
    layer_pairs: int = 0  # rain pairs that lent their layers


def render_pool(
    data: ClassifierData,
    recipe: ClassifierRecipe,
    multiple: int,
    on_view: Callable[[int, int], None] | None = None,
    held_out_only: bool = False,
) -> ViewPool:
    """`views_per_class` views of each class; view i of a class depends on (seed, class, i)
    alone, so `held_out_only` renders exactly the held-out views of the full pool."""
    sources = _Sources(data, recipe)
    views, labels, held, layers = [], [], [], []
    counts: dict[str, dict[str, int]] = {}
    total = recipe.views_per_class * len(CLASSES)
    for label in CLASSES:
        tally = counts.setdefault(label, {"real": 0, "pair_targets": 0, "synthetic": 0})
        for i in range(recipe.views_per_class):
            rng = np.random.default_rng([recipe.seed, class_index(label), i])
            source, kind = sources.pick(label, rng, recipe)
            is_held = sources.held_out(source, recipe)
            if held_out_only and not is_held:
                continue
            tally[kind] = tally.get(kind, 0) + 1
            views.append(render_view(source, rng, recipe, multiple, sources.layers))
            labels.append(class_index(label))
            held.append(is_held)
            layers.append(-1 if source.layer is None else source.layer)
            if on_view:
                on_view(len(views), total)
    return ViewPool(views, torch.tensor(labels), torch.tensor(held), counts,
                    torch.tensor(layers, dtype=torch.long), len(sources.layers))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _batch(
    pool: ViewPool, indices: Tensor, step: int, recipe: ClassifierRecipe
) -> tuple[Tensor, Tensor]:
    """Random `patch`-square crops (reflect-padded where a view is smaller) and flips."""
    rng = np.random.default_rng([recipe.seed, 1, step])
    chosen = indices[torch.from_numpy(rng.integers(len(indices), size=recipe.batch))]
    p = recipe.patch
    crops = []
    for i in chosen.tolist():
        view = pool.views[i][None].float() / 255.0
        view = pad_reflect_to(view, max(p, view.shape[-2]), max(p, view.shape[-1]))[0]
        y = int(rng.integers(view.shape[-2] - p + 1))
        x = int(rng.integers(view.shape[-1] - p + 1))
        crop = view[:, y : y + p, x : x + p]
        crops.append(crop.flip(-1) if rng.random() < 0.5 else crop)
    return torch.stack(crops), pool.labels[chosen]


@torch.no_grad()
def _score_views(model: OPIR, views: list[Tensor], labels: Tensor) -> tuple[float, float, Tensor]:
    """(mean cross-entropy, accuracy, logits (N, classes)) of the classifier on whole views."""
    logits = torch.cat([model.classifier(v[None].float() / 255.0) for v in views])
    loss = float(F.cross_entropy(logits, labels))
    return loss, float((logits.argmax(1) == labels).float().mean()), logits


CLEAN_THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.30 ... 0.95


def choose_clean_threshold(
    probs: Tensor, labels: Tensor, candidates: tuple[float, ...] = CLEAN_THRESHOLDS
) -> tuple[float | None, dict[str, float], float | None]:
    """The `clean_threshold` for `--task auto` (model.auto_decision), from these views.

    Each candidate is scored by the balanced accuracy of the engine's rule (the mean of
    per-class accuracies). The pick is the lowest candidate within one standard error of the
    best score (the error of that best: sqrt(sum_c p_c (1 - p_c) / n_c) / classes): a threshold
    moves `--task auto` away from the classifier's own most likely class, so it moves only as
    far as the views show a gain larger than their noise.

    Returns (threshold, {threshold: balanced accuracy}, standard error), or (None, {}, None)
    when the views lack clean or weather ones: the trade-off cannot be measured then.
    """
    present = labels.unique()
    if 0 not in present or len(present) < 2:
        return None, {}, None
    counts = torch.stack([(labels == c).sum() for c in present]).float()
    per_class = {}  # threshold -> accuracy per present class
    for threshold in candidates:
        right = (auto_decision(probs, threshold) == labels).float()
        per_class[threshold] = torch.stack([right[labels == c].mean() for c in present])
    scores = {t: float(acc.mean()) for t, acc in per_class.items()}
    best = max(candidates, key=lambda t: scores[t])
    acc = per_class[best]
    error = float((acc * (1 - acc) / counts).sum().sqrt()) / len(present)
    floor = scores[best] - error - 1e-9  # the 1e-9 keeps equal scores equal
    chosen = min(t for t in candidates if scores[t] >= floor)
    return chosen, {f"{t:.2f}": round(v, 4) for t, v in scores.items()}, round(error, 4)


def with_trunk_classifier(model: OPIR, width: int, seed: int) -> OPIR:
    """A copy of `model` whose classifier is a fresh, seeded `trunk` (all else unchanged)."""
    config = dataclasses.replace(model.config, classifier="trunk", classifier_width=width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = OPIR(config)
    state = {
        k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "classifier."))
    }
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)
    return new


def train_classifier(
    model: OPIR,
    pool: ViewPool,
    recipe: ClassifierRecipe,
    on_step: Callable[[int, float], None] | None = None,
    start: OPIR | None = None,
) -> tuple[OPIR, dict[str, Any]]:
    """Train a trunk classifier on the held-in views (AdamW, cosine): a fresh one, or a copy of
    the trained one of `start` (its width, not the recipe's); keep the state with the lowest
    held-out loss. Returns (model copy with it, report)."""
    t0 = time.monotonic()
    if start is not None and start.config.classifier != "trunk":
        raise ClassifierTrainingError("the classifier to start from is not a trained trunk")
    width = start.config.classifier_width if start is not None else recipe.width
    new = with_trunk_classifier(model, width, recipe.seed)
    classifier = new.classifier
    if start is not None:
        if start.config.classes != model.config.classes:
            raise ClassifierTrainingError(f"classes {start.config.classes} of the start differ")
        classifier.load_state_dict(start.classifier.state_dict())
    train_idx = torch.nonzero(~pool.held_out).flatten()
    held_idx = torch.nonzero(pool.held_out).flatten().tolist()
    if len(train_idx) == 0:
        raise ClassifierTrainingError("every view is held out: lower the holdout fraction")
    held_views = [pool.views[i] for i in held_idx]
    held_labels = pool.labels[held_idx]
    optimizer = torch.optim.AdamW(
        classifier.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.steps)
    best: dict[str, Any] = {"loss": float("inf"), "step": recipe.steps, "accuracy": None}
    best_state = copy.deepcopy(classifier.state_dict())
    best_logits: Tensor | None = None  # held-out logits of best_state
    history = []
    classifier.train()
    for step in range(1, recipe.steps + 1):
        images, labels = _batch(pool, train_idx, step, recipe)
        loss = F.cross_entropy(classifier(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step:
            on_step(step, float(loss.detach()))
        if held_views and (step % recipe.eval_every == 0 or step == recipe.steps):
            classifier.eval()
            held_loss, held_acc, held_logits = _score_views(new, held_views, held_labels)
            classifier.train()
            history.append({"step": step, "held_out_loss": round(held_loss, 4),
                            "held_out_accuracy": round(held_acc, 4)})  # fmt: skip
            if held_loss < best["loss"]:
                best = {"loss": held_loss, "step": step, "accuracy": held_acc}
                best_state = copy.deepcopy(classifier.state_dict())
                best_logits = held_logits
    threshold: dict[str, Any] = {"value": new.config.clean_threshold, "chosen_on": None}
    if held_views:
        classifier.load_state_dict(best_state)
    else:
        best = {"loss": None, "step": recipe.steps, "accuracy": None}
    if best_logits is not None:  # the logits that picked the kept state also pick the threshold
        threshold = _set_threshold(new, best_logits.softmax(dim=1), held_labels) or threshold
    new.eval()
    report = {
        "recipe": asdict(recipe),
        "views": pool.counts,
        "rain_layer_pairs": pool.layer_pairs,
        "held_out": {"views": len(held_views), **best},
        "clean_threshold": threshold,
        "history": history,
        "parameters": sum(p.numel() for p in classifier.parameters()),
        "train_seconds": round(time.monotonic() - t0, 1),
    }
    return new, report


def _set_threshold(model: OPIR, probs: Tensor, labels: Tensor) -> dict[str, Any] | None:
    """Choose `clean_threshold` on held-out views and set it on `model`; the report entry."""
    value, scores, error = choose_clean_threshold(probs, labels)
    if value is None:
        return None
    model.config = dataclasses.replace(model.config, clean_threshold=value)
    return {"value": value, "chosen_on": "held-out views", "rule": "lowest within one standard "
            "error of the best", "balanced_accuracy": scores, "standard_error": error}  # fmt: skip


@torch.inference_mode()
def split_accuracy(
    model: OPIR, items: list[tuple[str, str, Tensor]]
) -> dict[str, dict[str, float | int]]:
    """How often `--task auto` decides right (auto_decision with the model's clean_threshold,
    as the engine does), per group of (group, class, image (3, H, W) in [0, 1]) items, through
    the engine's view of each image."""
    per_group: dict[str, list[float]] = {}
    for group, label, image in items:
        probs = model.classify(classification_view(image, model.multiple_of)).softmax(dim=1)
        decision = int(auto_decision(probs, model.config.clean_threshold)[0])
        per_group.setdefault(group, []).append(float(decision == class_index(label)))
    return {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in per_group.items()}


def train_classifier_checkpoint(
    weights: Path,
    out: Path,
    data: ClassifierData,
    recipe: ClassifierRecipe,
    on_view: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    start: Path | None = None,
) -> dict[str, Any]:
    """Load `weights`, train its classifier (from the trained one of the checkpoint `start`,
    else fresh), score it on the split, write `out` (.safetensors + card: the input card plus
    a `classifier_training` entry)."""
    t0 = time.monotonic()
    model, card = load_checkpoint(weights)
    begin = load_checkpoint(start)[0] if start is not None else None
    pool = render_pool(data, recipe, model.multiple_of, on_view)
    render_seconds = time.monotonic() - t0
    trained, report = train_classifier(model, pool, recipe, on_step, begin)
    report = {"source": str(weights), "data": asdict(data), **report}
    if start is not None:
        report["started_from"] = str(start)
    report["render_seconds"] = round(render_seconds, 1)
    if data.split and data.data_root:
        report["split_accuracy"] = split_accuracy(trained, _split_items(data))
    save_checkpoint(out, trained, {**card, "classifier_training": report})
    return report


def transplant_classifier(
    weights: Path, donor: Path, out: Path, recalibrate: bool = False
) -> dict[str, Any]:
    """Write `out`: `weights` with the trained trunk classifier of `donor` (the trunk reads the
    image alone, so it serves any restoration weights of the same classes) and the donor's
    `clean_threshold` (chosen for that classifier's probabilities; a donor trained before the
    threshold was chosen carries the default 0.9); the card keeps the donor's
    `classifier_training` report. `recalibrate` chooses the threshold again, by the current
    rule, on the donor's held-out views (rendered again from its recipe and data) and scores
    the split again with it."""
    model, card = load_checkpoint(weights)
    giver, giver_card = load_checkpoint(donor)
    if giver.config.classifier != "trunk" or "classifier_training" not in giver_card:
        raise ClassifierTrainingError(f"{donor}: has no classifier trained by train-classifier")
    if giver.config.classes != model.config.classes:
        raise ClassifierTrainingError(f"{donor}: classes {giver.config.classes} differ")
    new = with_trunk_classifier(model, giver.config.classifier_width, seed=0)
    new.classifier.load_state_dict(giver.classifier.state_dict())
    # The threshold was chosen for this classifier's probabilities: it travels with it.
    new.config = dataclasses.replace(new.config, clean_threshold=giver.config.clean_threshold)
    report = {**giver_card["classifier_training"], "transplanted_from": str(donor)}
    new.eval()
    if recalibrate:
        _recalibrate(new, report)
    save_checkpoint(out, new, {**card, "classifier_training": report})
    return report


@torch.inference_mode()
def _recalibrate(model: OPIR, report: dict[str, Any]) -> None:
    """Choose `clean_threshold` again on the held-out views of the run `report` describes, and
    score the split again; updates `model` and `report`."""
    recipe = ClassifierRecipe(**report["recipe"])
    data = ClassifierData(**report["data"])
    pool = render_pool(data, recipe, model.multiple_of, held_out_only=True)
    if not pool.views:
        raise ClassifierTrainingError("the donor's recipe holds out no views to calibrate on")
    _, _, logits = _score_views(model, pool.views, pool.labels)
    chosen = _set_threshold(model, logits.softmax(dim=1), pool.labels)
    if chosen is None:
        raise ClassifierTrainingError("the held-out views lack clean or weather ones")
    report["clean_threshold"] = {**chosen, "recalibrated": True}
    if data.split and data.data_root:
        report["split_accuracy"] = split_accuracy(model, _split_items(data))


def _split_items(data: ClassifierData) -> list[tuple[str, str, Tensor]]:
    split, root = Path(data.split or ""), Path(data.data_root or "")
    items = [(task, task, degraded) for task, _n, degraded, _t in validation_items(split, root)]
    return items + [(f"{task}_photos", task, image) for task, _n, image in photo_items(split, root)]


def summarize_report(report: dict[str, Any], out: Path) -> str:
    """A classifier run's report in a few lines for the terminal: views, the held-out pick,
    accuracy on the split."""
    views = ", ".join(f"{k} {sum(v.values())}" for k, v in report["views"].items())
    held = report["held_out"]
    lines = [f"wrote {out}", f"views: {views}"]
    if held["accuracy"] is not None:
        lines.append(f"held-out photos: {held['views']} views, best at step {held['step']}: "
                     f"accuracy {100 * held['accuracy']:.1f}%")  # fmt: skip
    chosen = report.get("clean_threshold", {})
    if chosen.get("chosen_on"):
        lines.append(f"clean_threshold {chosen['value']:.2f} (chosen on the {chosen['chosen_on']})")
    if "transplanted_from" in report and not chosen.get("recalibrated"):
        # a donor trained under an older rule carries figures that no longer describe this copy
        lines.append(f"copied from {report['transplanted_from']}: the figures above and below are "
                     "the donor's, as recorded when it was trained (--recalibrate measures "
                     "this copy)")  # fmt: skip
    for group, score in report.get("split_accuracy", {}).items():
        lines.append(f"split {group}: {100 * score['accuracy']:.1f}% of {score['n']}")
    return "\n".join(lines)
