"""The degradation classifier behind `--task auto`: clean, rain, snow or haze, per image.

The paper gives the task; opir must also recognise it. A head on the KPN bottleneck (the
`bottleneck` choice, `DegradationHead`) shares the restoration encoder, but frozen features of
that encoder told the four classes apart poorly: held-out photos 57-67% with pooled
statistics of every encoder level (run `runs/small-allinone`, step 1000, 2400 views). The
`trunk` choice gives the classifier a light trunk of its own, trained on whole images as the
engine shows them (`classifier_training.py`): at width 24 it costs 0.7 GFLOPs on a 512x384
view, once per image, next to the restoration's 5.8 GFLOPs per 256x256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opir_engine.model.nafnet import NAFBlock, masked_mean


def mask_at(valid: Tensor | None, x: Tensor) -> Tensor | None:
    """The validity mask (B, 1, H, W) at the resolution of features x: a feature pixel is
    valid when any pixel it covers is, the KPN's rule (`KPN.level_masks`) for any size the
    strided convolutions give. The image's top-left pixel is always covered, so no statistic
    is taken over an empty set."""
    return None if valid is None else F.adaptive_max_pool2d(valid, x.shape[-2:])


class DegradationHead(nn.Module):
    """Classifies the degradation from the KPN bottleneck (the `bottleneck` choice)."""

    def __init__(self, channels: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * channels, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, bottleneck: Tensor, valid: Tensor | None = None) -> Tensor:
        """(B, C, h, w) -> logits (B, num_classes). Mean and max pooling: haze is global,
        rain and snow are sparse and show in the max. valid (B, 1, H, W): the image's pixels
        at input resolution (None: all); both pools read only those."""
        v = mask_at(valid, bottleneck)
        peak = bottleneck if v is None else bottleneck.masked_fill(v == 0, float("-inf"))
        mean = masked_mean(bottleneck, v).flatten(1)
        pooled = torch.cat([mean, peak.amax(dim=(2, 3))], dim=1)
        return self.fc2(F.gelu(self.fc1(pooled)))


class DegradationClassifier(nn.Module):
    """Logits from the image itself (the `trunk` choice).

    A two-convolution stem down to 1/4 resolution (a 3x3 at stride 2 still sees a streak one
    pixel wide), then one NAFBlock per level and a stride-2 convolution between levels
    (padded, so any size goes through);
    mean and standard deviation of the last features: haze shifts the mean, streaks and
    flakes raise the spread. No max pooling: a max grows with the image, and the classifier
    trains on crops but reads whole views.
    """

    def __init__(self, num_classes: int, width: int, hidden: int, levels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 2, stride=2),
        )
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        channels = width
        for level in range(levels):
            self.blocks.append(NAFBlock(channels))
            if level < levels - 1:
                self.downs.append(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1))
                channels *= 2
        self.fc1 = nn.Linear(2 * channels, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, image: Tensor, valid: Tensor | None = None) -> Tensor:
        """image (B, 3, H, W) in [0, 1], H and W >= 2 -> logits (B, num_classes).

        valid (B, 1, H, W): 1 on the image, 0 on padding added at the bottom and right (None:
        no padding). The blocks' channel attention and the final mean and spread then read the
        image alone, so a tile or shape bucket's padding does not change the decision beyond
        the convolutions' reach across the border.
        """
        x = self.stem(image)
        for i, block in enumerate(self.blocks):
            v = mask_at(valid, x)
            x = block(x, v)
            if i < len(self.downs):
                x = self.downs[i](x)
        if v is None:
            flat = x.flatten(2)
            pooled = torch.cat([flat.mean(-1), flat.std(-1, correction=0)], dim=1)
        else:  # the last block has no down after it: v is at x's resolution
            mean = masked_mean(x, v)
            spread = masked_mean((x - mean) ** 2, v).sqrt()
            pooled = torch.cat([mean.flatten(1), spread.flatten(1)], dim=1)
        return self.fc2(F.gelu(self.fc1(pooled)))
