"""Restoring a large photo at the scale the model learned its weather at.

The model is trained on photos shrunk to at most `recipe.max_side` (512) pixels long, so it
knows rain streaks, flakes and haze at that scale. In a 12-megapixel photo the same rain is six
times wider and longer than anything it has seen, and restored at full size it is left in place
(measured in bench/results/working_scale-*.md). So a photo longer than the working side is
restored at that side, and only the correction the model made, restored minus input, is
brought back up to full size and added to the full-size photo: weather is removed at the scale
the model knows, while the photo's own fine detail, which the shrunken copy lost, is kept (it
is in the full-size input, not in the correction).

Which side is right depends on the photo: its streaks, flakes and haze gradients are as large
as the scene was photographed and the photo enlarged, so one fixed side leaves them in some
photos and blurs the correction of others. With the working side "auto", a photo longer than
`AUTO_ABOVE` is restored at each side of `AUTO_SIDES` shorter than it, and the restoration that
leaves the least line-like structure (`streaks.streak_energy`) is kept; docs/design.md has the
figures per weather. Photos no longer than `AUTO_ABOVE` are restored at full size.

Haze is the exception for weights whose card lists `haze_sides`: at full size the model sees
too little of a photo's veil to tell it from a pale, flat scene, and leaves it on dark things
under a bright sky (docs/experiments.md, "The veil is removed at a smaller scale"). A photo no
longer than `AUTO_ABOVE` whose task is haze is then restored at full size and at each of those
sides shorter than it, and the restoration with the least dark channel
(`dark_channel.dark_channel`) is kept. Each side comes with the least probability of haze at
which it is tried: a smaller side removes more veil, and misty rain the classifier calls haze
without being sure (GT-RAIN) turns dark and contrasty at the smallest one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

# Defined beside the reader, which shrinks training photos to the same size; named here too.
from opir_engine.image_io.sizing import working_size

AUTO = "auto"
AUTO_ABOVE = 1024  # photos no longer than this are restored at full size under "auto"
AUTO_SIDES = (512, 768, 1024, 1536)  # tried for a longer photo, those shorter than it
MIN_SIDE = 64  # a shrunken copy smaller than this is not worth restoring


def auto_sides(height: int, width: int) -> tuple[int | None, ...]:
    """The working sides "auto" tries for a photo of this size (None: full size; a single
    side: nothing to choose)."""
    long_side = max(height, width)
    if long_side <= AUTO_ABOVE:
        return (None,)
    return tuple(side for side in AUTO_SIDES if side < long_side)


def card_haze_sides(listed: object) -> tuple[tuple[int, float], ...]:
    """A card's `haze_sides` as ((side, least haze probability), ...); () when the card lists
    none. Each entry is a side of at least MIN_SIDE pixels and the least probability of haze,
    0 to 1, at which that side is tried (ValueError otherwise)."""
    if listed is None:
        return ()
    entries = listed if isinstance(listed, list) else [listed]
    parsed = []
    for entry in entries:
        ok = isinstance(entry, list) and len(entry) == 2
        side, least = entry if ok else (None, None)
        ok = ok and type(side) is int and side >= MIN_SIDE  # not a bool, not a float
        ok = ok and type(least) in (int, float) and 0 <= least <= 1
        if not ok:
            raise ValueError(
                f"haze_sides entries must be [side, least haze probability] with side at least "
                f"{MIN_SIDE} and the probability from 0 to 1, got {entry!r}"
            )
        parsed.append((side, float(least)))
    return tuple(parsed)


def haze_sides(
    height: int, width: int, card_sides: tuple[tuple[int, float], ...], haze: float
) -> tuple[int | None, ...] | None:
    """The working sides "auto" tries, judged by the veil left, for a photo of this size whose
    haze weight is `haze` (1 for the haze task, the classifier's probability under auto), under
    weights whose card lists `card_sides` (`card_haze_sides`): full size, and each listed side
    shorter than the photo whose least probability `haze` reaches. None where that rule does not
    apply (no sides listed, or a photo longer than AUTO_ABOVE: `auto_sides` and the line energy,
    as for any weather)."""
    if not card_sides or max(height, width) > AUTO_ABOVE:
        return None
    tried = {side for side, least in card_sides if side < max(height, width) and haze >= least}
    return (None, *sorted(tried, reverse=True))


def shrink_to_side(image: Tensor, side: int) -> Tensor:
    """(..., C, H, W) with its long side brought down to `side` by area averaging (each output
    pixel the mean of the input pixels it covers, so thin streaks fade as they would in a
    photo taken at that size); unchanged when the long side is already at most `side`."""
    height, width = image.shape[-2:]
    size = working_size(height, width, side)
    if size == (height, width):
        return image
    batch = image.reshape(-1, *image.shape[-3:])
    return F.interpolate(batch, size=size, mode="area").reshape(*image.shape[:-2], *size)


def enlarge_to(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., C, h, w) -> (..., C, H, W) by bicubic interpolation (smooth, no blocks)."""
    batch = image.reshape(-1, *image.shape[-3:])
    out = F.interpolate(batch, size=size, mode="bicubic", align_corners=False)
    return out.reshape(*image.shape[:-2], *size)


def transfer_correction(image: Tensor, small: Tensor, restored_small: Tensor) -> Tensor:
    """The full-size restoration of `image` (..., C, H, W) from a restoration made at a
    smaller size: image + enlarge(restored_small - small), clamped to [0, 1].

    `small` is the shrunken input the model saw and `restored_small` its output, same shape.
    """
    if small.shape != restored_small.shape:
        raise ValueError(
            f"small input {tuple(small.shape)} and its restoration "
            f"{tuple(restored_small.shape)} differ in shape"
        )
    correction = enlarge_to(restored_small.to(image.dtype) - small.to(image.dtype),
                            tuple(image.shape[-2:]))  # fmt: skip
    return (image + correction).clamp_(0, 1)
