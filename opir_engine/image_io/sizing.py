"""The size an image is worked at: its long side capped, its aspect ratio kept.

Training reads photos shrunk to this size and the engine restores large photos at it, so both
take it from here.
"""

from __future__ import annotations


def working_size(height: int, width: int, side: int | None) -> tuple[int, int]:
    """The (H, W) the model runs at for an image of (height, width) with working side `side`
    (None: always full size): the long side becomes `side`, the aspect ratio is kept."""
    if side is None or max(height, width) <= side:
        return height, width
    scale = side / max(height, width)
    return (max(1, min(side, round(height * scale))), max(1, min(side, round(width * scale))))
