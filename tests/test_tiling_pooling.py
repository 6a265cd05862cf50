"""The channel attention's pooling modes that let a tile compute what the whole photo does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opir_engine.model import OPIR
from opir_engine.model.config import OPIRConfig
from opir_engine.model.nafnet import local_mean, masked_mean

pytestmark = pytest.mark.usefixtures("one_thread")


def _local_mean_loop(y: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """local_mean written out: per pixel, the box slid inside the valid bounding box."""
    out = torch.empty_like(y)
    for b in range(y.shape[0]):
        v = valid[b, 0]
        rows, cols = torch.nonzero(v.amax(1) > 0)[:, 0], torch.nonzero(v.amax(0) > 0)[:, 0]
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        for i in range(y.shape[2]):
            top = max(min(max(i - window // 2, 0), r1 - window), r0)
            for j in range(y.shape[3]):
                left = max(min(max(j - window // 2, 0), c1 - window), c0)
                box = (slice(top, min(top + window, r1)), slice(left, min(left + window, c1)))
                out[b, :, i, j] = (y[b][:, box[0], box[1]] * v[box]).sum((1, 2)) / v[box].sum()
    return out


@pytest.mark.parametrize("window", [4, 7, 16])
def test_local_mean_matches_the_loop_and_skips_padding(window: int) -> None:
    torch.manual_seed(0)
    y = torch.randn(2, 3, 19, 26, dtype=torch.float64)
    valid = torch.ones(2, 1, 19, 26, dtype=torch.float64)
    valid[0, :, 15:] = 0  # bottom and right padding, as the engine pads
    valid[0, :, :, 21:] = 0
    torch.testing.assert_close(local_mean(y, valid, window), _local_mean_loop(y, valid, window))


def test_local_mean_on_a_map_no_larger_than_the_window_is_the_global_mean() -> None:
    y = torch.randn(1, 4, 12, 16)
    valid = torch.ones(1, 1, 12, 16)
    valid[..., 10:, :] = 0
    assert torch.equal(local_mean(y, valid, 16), masked_mean(y, valid))


def test_local_pooling_is_a_mode_of_the_same_weights() -> None:
    torch.manual_seed(0)
    model = OPIR(OPIRConfig.from_name("tiny")).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    local = OPIR(dataclasses.replace(model.config, pooling="local", pool_window=32)).eval()
    local.load_state_dict(model.state_dict())
    weights = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    with torch.inference_mode():
        small, large = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 64, 96)
        # a photo no larger than the window restores as with global means, a larger one not
        assert torch.equal(local(small, weights).restored, model(small, weights).restored)
        assert not torch.equal(local(large, weights).restored, model(large, weights).restored)


def test_shared_means_of_the_whole_reproduce_its_forward() -> None:
    torch.manual_seed(0)
    model = OPIR(OPIRConfig.from_name("tiny")).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    image, weights = torch.rand(1, 3, 48, 80), torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    with torch.inference_mode():
        means = model.block_means(image, weights)
        assert len(means) == 2 * 5  # two stages of five blocks
        shared = model(image, weights, shared_means=means).restored
        assert torch.equal(shared, model(image, weights).restored)
