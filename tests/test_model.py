"""The OPIR model against paper section 3 and appendix A, checked by hand on tiny inputs.

Every equation is recomputed here from the model's own pieces (KPN outputs, TAM weights) with
plain tensor code, so a wrong wiring between the pieces shows up as a mismatch. The overfit test
trains the tiny model on one real rain pair; the checkpoint tests corrupt real files on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from opir_engine.model import CLASSES, OPIR, PRESETS, TAM, OPIRConfig, OPIRLoss, OPIROutput
from opir_engine.model.loss import charbonnier, fft_l1, laplacian
from opir_engine.weights import CheckpointError, load_checkpoint, read_card, save_checkpoint
from opir_kernels.inverse_operator import TAPS, inverse_operator, inverse_operator_flops

EPS = 1e-3  # Charbonnier epsilon of appendix A


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _tiny(**overrides: object) -> OPIRConfig:
    return OPIRConfig.from_name("tiny", **overrides)


def _model(config: OPIRConfig | None = None, seed: int = 0, perturb: float = 0.0) -> OPIR:
    """A seeded model; `perturb` adds noise to every weight so no piece is the identity."""
    torch.manual_seed(seed)
    model = OPIR(config or _tiny())
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * perturb)
    return model


def _image(seed: int = 0, shape: tuple[int, ...] = (2, 3, 16, 24)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _one_hot(*tasks: str) -> torch.Tensor:
    return F.one_hot(torch.tensor([CLASSES.index(t) for t in tasks]), len(CLASSES)).float()


def _apply_operator_by_hand(
    image: torch.Tensor,
    kernel: torch.Tensor,
    modulation: torch.Tensor | None,
    logits: torch.Tensor,
    bias: torch.Tensor,
    dilations: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11 and 16-19 written out pixel-shift by pixel-shift, zero outside the image."""
    k_mod = kernel if modulation is None else kernel * modulation  # Eq. 19
    alpha = torch.softmax(logits, dim=1)  # Eq. 18
    h, w = image.shape[-2:]
    out = bias.clone()
    for s, d in enumerate(dilations):
        padded = F.pad(image, (d, d, d, d))
        j_s = torch.zeros_like(image)
        for i, (dy, dx) in enumerate(TAPS):  # Eq. 16: I(p + d * delta_i)
            y0, x0 = d + d * dy, d + d * dx
            j_s += k_mod[:, i : i + 1] * padded[..., y0 : y0 + h, x0 : x0 + w]
        out += alpha[:, s : s + 1] * j_s
    return out, k_mod.abs().mean(dim=1, keepdim=True)  # Eq. 11


# ---------------------------------------------------------------------------------------------
# Shapes and input checks
# ---------------------------------------------------------------------------------------------


def test_output_shapes_tiny_batch2_32x48() -> None:
    model = _model()
    x = _image(shape=(2, 3, 32, 48))
    out = model(x, _one_hot("rain", "haze"))
    assert isinstance(out, OPIROutput)
    assert out.restored.shape == (2, 3, 32, 48)
    assert len(out.stages) == 2
    assert all(s.shape == (2, 3, 32, 48) for s in out.stages)
    assert out.uncertainty.shape == (2, 1, 32, 48)
    assert out.class_logits.shape == (2, len(CLASSES))
    assert model.classify(x).shape == (2, len(CLASSES))
    assert all(t.dtype == torch.float32 for t in (out.restored, out.uncertainty, *out.stages))
    # auto mode gives the same shapes
    auto = model(x)
    assert auto.restored.shape == (2, 3, 32, 48) and auto.class_logits.shape == (2, 4)


@pytest.mark.parametrize("size", [(30, 48), (32, 46), (17, 17)])
def test_sides_not_multiple_raise(size: tuple[int, int]) -> None:
    model = _model()
    assert model.multiple_of == 4
    x = torch.rand(1, 3, *size)
    with pytest.raises(ValueError, match=r"multiples of 4.*pad first"):
        model(x)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.classify(x)


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 4, 32, 32), (3, 32, 32)])
def test_non_rgb_input_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\)"):
        _model()(torch.rand(shape))


# ---------------------------------------------------------------------------------------------
# Equations of section 3
# ---------------------------------------------------------------------------------------------


def test_identity_at_init() -> None:
    """The KPN's last conv is zero and the centre tap is offset by 1, TAM m = 1: J = I."""
    model = _model(seed=3)
    x = _image(seed=4, shape=(2, 3, 32, 48))
    kpn = model.kpn(x)
    centre = torch.zeros(9)
    centre[4] = 1.0
    assert torch.equal(kpn.kernel, centre.view(1, 9, 1, 1).expand_as(kpn.kernel))
    assert torch.equal(kpn.fusion_logits, torch.zeros_like(kpn.fusion_logits))
    assert torch.equal(kpn.bias, torch.zeros_like(kpn.bias))
    for weights in (_one_hot("rain", "snow"), None):
        out = model(x, weights)
        assert torch.equal(out.restored, x)
        assert all(torch.equal(s, x) for s in out.stages)
        # UM of the identity kernel: one tap of 1 out of 9
        assert torch.allclose(out.uncertainty, torch.full_like(out.uncertainty, 1 / 9))


def test_both_stages_match_hand_computation() -> None:
    """Eq. 9-13: J1 = K~1 (.) I with K~1 = KPN(I) * TAM1; J2 = K~2 (.) J1 with KPN(J1 * UM)."""
    model = _model(perturb=0.05)
    x = _image(seed=1)
    w = _one_hot("rain", "haze")
    dil = model.config.dilations
    out = model(x, w)

    kpn1 = model.kpn(x)
    m1 = model.tams[0](kpn1.kernel, w)
    j1, um = _apply_operator_by_hand(x, kpn1.kernel, m1, kpn1.fusion_logits, kpn1.bias, dil)
    assert not torch.allclose(j1, x, atol=1e-3)  # the perturbed model does something
    torch.testing.assert_close(out.stages[0], j1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.uncertainty, um, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.class_logits, model.head(kpn1.bottleneck))

    kpn2 = model.kpn(j1 * um)
    m2 = model.tams[1](kpn2.kernel, w)
    j2, _ = _apply_operator_by_hand(j1, kpn2.kernel, m2, kpn2.fusion_logits, kpn2.bias, dil)
    torch.testing.assert_close(out.stages[1], j2, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.restored, out.stages[1])  # explicit task: no pass-through


def test_uncertainty_is_mean_abs_modulated_kernel_by_hand() -> None:
    """Eq. 11 with known taps: K_i = 0.1 (i - 4), m = 2 -> UM = 0.2 * 20 / 9 everywhere."""
    b, h, w = 1, 5, 7
    taps = 0.1 * (torch.arange(9, dtype=torch.float64) - 4)
    kernel = taps.view(1, 9, 1, 1).expand(b, 9, h, w).contiguous()
    modulation = torch.full((b, 9, h, w), 2.0, dtype=torch.float64)
    logits = torch.zeros(b, 1, h, w, dtype=torch.float64)
    image = torch.rand(b, 3, h, w, dtype=torch.float64)
    _, um = inverse_operator(image, kernel, modulation, logits, None, (1,))
    torch.testing.assert_close(um, torch.full((b, 1, h, w), 0.2 * 20 / 9, dtype=torch.float64))
    _, um_plain = inverse_operator(image, kernel, None, logits, None, (1,))
    torch.testing.assert_close(um_plain, torch.full_like(um_plain, 0.1 * 20 / 9))


@pytest.mark.parametrize("use_uncertainty", [True, False])
def test_stage2_kpn_input(use_uncertainty: bool) -> None:
    """Eq. 13: the second KPN call sees J1 * UM (or J1 when the ablation turns UM off)."""
    model = _model(_tiny(use_uncertainty=use_uncertainty), perturb=0.05)
    seen: list[torch.Tensor] = []
    handle = model.kpn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        x = _image(seed=2)
        out = model(x, _one_hot("snow", "rain"))
    finally:
        handle.remove()
    assert len(seen) == 2
    assert torch.equal(seen[0], x)
    expected = out.stages[0] * out.uncertainty if use_uncertainty else out.stages[0]
    assert torch.equal(seen[1], expected)
    assert not torch.allclose(out.uncertainty, torch.ones_like(out.uncertainty))


def test_fusion_weights_sum_to_one_uniform_kernel() -> None:
    """Eq. 18: a uniform 3x3 kernel on a constant image gives back the constant for any logits
    (away from the zero border), so sum_s alpha_s = 1."""
    b, h, w, dil = 2, 12, 13, (1, 2, 3, 4)
    c = 0.37
    image = torch.full((b, 3, h, w), c, dtype=torch.float64)
    kernel = torch.full((b, 9, h, w), 1 / 9, dtype=torch.float64)
    logits = 3 * torch.randn(b, len(dil), h, w, dtype=torch.float64)
    out, _ = inverse_operator(image, kernel, None, logits, None, dil)
    inner = out[..., 4:-4, 4:-4]
    torch.testing.assert_close(inner, torch.full_like(inner, c), atol=1e-12, rtol=0)


def test_fusion_weights_are_softmax_by_hand() -> None:
    """Eq. 16-18: with the single tap delta = (0, +1) on a ramp I(y, x) = x, J_s(p) = x + d_s,
    so out(p) - x = sum_s softmax(logits)_s d_s: alpha is a non-negative softmax."""
    b, h, w, dil = 1, 6, 14, (1, 2, 3, 4)
    ramp = torch.arange(w, dtype=torch.float64).expand(b, 3, h, w).contiguous()
    kernel = torch.zeros(b, 9, h, w, dtype=torch.float64)
    kernel[:, TAPS.index((0, 1))] = 1.0
    logits = torch.randn(b, len(dil), h, w, dtype=torch.float64)
    out, _ = inverse_operator(ramp, kernel, None, logits, None, dil)
    alpha = torch.softmax(logits, dim=1)
    assert (alpha >= 0).all()
    expected = (alpha * torch.tensor(dil, dtype=torch.float64).view(1, -1, 1, 1)).sum(1)
    inner = slice(0, w - max(dil))  # taps that stay inside the image
    torch.testing.assert_close(
        (out - ramp)[:, 0, :, inner], expected[..., inner], atol=1e-12, rtol=0
    )


def test_tam_is_one_at_init_and_depends_on_task_once_trained() -> None:
    torch.manual_seed(0)
    tam = TAM(len(CLASSES), task_dim=4, hidden=4)
    kernel = torch.randn(2, 9, 5, 6)
    weights = _one_hot("rain", "haze")
    assert torch.equal(tam(kernel, weights), torch.ones(2, 9, 5, 6))
    with torch.no_grad():
        tam.out.weight.normal_()
    m_rain = tam(kernel[:1], _one_hot("rain"))
    m_snow = tam(kernel[:1], _one_hot("snow"))
    assert m_rain.shape == (1, 9, 5, 6)
    assert (m_rain - m_snow).abs().max() > 1e-3


def test_tam_one_hot_selects_embedding_by_hand() -> None:
    """Eq. 21: m_p(q) = MLP(K_p(q) w_k + W_e e_t + offset_q) with e_t the chosen row."""
    torch.manual_seed(0)
    tam = TAM(len(CLASSES), task_dim=4, hidden=4)
    with torch.no_grad():
        tam.out.weight.normal_()
        tam.tap_offset.normal_()
    kernel = torch.randn(1, 9, 3, 4)
    for k, task in enumerate(CLASSES):
        e_t = tam.embeddings[k]
        pre = (
            kernel.unsqueeze(-1) * tam.weight_k
            + tam.proj_task(e_t)
            + tam.tap_offset.view(1, 9, 1, 1, -1)
        )
        expected = (F.gelu(pre) @ tam.out.weight.T + tam.out.bias).squeeze(-1)
        torch.testing.assert_close(tam(kernel, _one_hot(task)), expected)


def test_model_one_hot_task_selects_that_embedding() -> None:
    """Copying the haze embedding into the rain row makes "rain" restore exactly like "haze"."""
    model = _model(perturb=0.05)
    x = _image(seed=5, shape=(1, 3, 16, 16))
    haze = model(x, _one_hot("haze"))
    assert not torch.allclose(model(x, _one_hot("rain")).restored, haze.restored)
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        for tam in swapped.tams:
            tam.embeddings[CLASSES.index("rain")] = tam.embeddings[CLASSES.index("haze")]
    assert torch.equal(swapped(x, _one_hot("rain")).restored, haze.restored)


def test_auto_mode_uses_head_softmax_mix() -> None:
    model = _model(perturb=0.05)
    x = _image(seed=6)
    auto = model(x)
    probs = torch.softmax(auto.class_logits, dim=1)
    assert (probs[:, 0] < model.config.clean_threshold).all()  # no pass-through here
    explicit = model(x, probs)
    assert all(torch.equal(a, e) for a, e in zip(auto.stages, explicit.stages, strict=True))
    assert torch.equal(auto.restored, explicit.restored)
    assert not torch.allclose(auto.restored, model(x, _one_hot("rain", "rain")).restored)


# ---------------------------------------------------------------------------------------------
# Ablation switches (Table 5)
# ---------------------------------------------------------------------------------------------


def _count(model: OPIR) -> int:
    return sum(p.numel() for p in model.parameters())


def _tam_params(c: OPIRConfig) -> int:
    """embeddings, w_k, proj_task (W, b), tap offsets, out (W, b)."""
    n = len(c.classes)
    return (
        n * c.task_dim
        + c.tam_hidden
        + (c.task_dim + 1) * c.tam_hidden
        + 9 * c.tam_hidden
        + (c.tam_hidden + 1)
    )


def test_single_stage() -> None:
    model = _model(_tiny(stages=1), perturb=0.05)
    out = model(_image(), _one_hot("rain", "snow"))
    assert len(out.stages) == 1 and len(model.tams) == 1
    assert torch.equal(out.restored, out.stages[0])


def test_without_tam_uses_unmodulated_kernel() -> None:
    config = _tiny(use_tam=False)
    model = _model(config, perturb=0.05)
    assert len(model.tams) == 0
    assert not any(name.startswith("tams.") for name, _ in model.named_parameters())
    x = _image(seed=7)
    out = model(x, _one_hot("rain", "haze"))
    kpn1 = model.kpn(x)
    j1, um = _apply_operator_by_hand(
        x, kpn1.kernel, None, kpn1.fusion_logits, kpn1.bias, config.dilations
    )
    torch.testing.assert_close(out.stages[0], j1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.uncertainty, um, atol=1e-6, rtol=1e-5)
    # without TAM the task cannot change the restoration
    assert torch.equal(out.stages[1], model(x, _one_hot("snow", "snow")).stages[1])


def test_single_dilation() -> None:
    config = _tiny(dilations=(1,))
    model = _model(config, perturb=0.05)
    x = _image(seed=8)
    out = model(x, _one_hot("rain", "rain"))
    kpn1 = model.kpn(x)
    assert kpn1.fusion_logits.shape == (2, 1, 16, 24)
    m1 = model.tams[0](kpn1.kernel, _one_hot("rain", "rain"))
    j1, _ = _apply_operator_by_hand(x, kpn1.kernel, m1, kpn1.fusion_logits, kpn1.bias, (1,))
    torch.testing.assert_close(out.stages[0], j1, atol=1e-5, rtol=1e-5)


def test_ablation_parameter_counts() -> None:
    base = _tiny()
    full = _count(OPIR(base))
    tam = _tam_params(base)
    assert tam == 81
    assert _count(OPIR(_tiny(use_tam=False))) == full - 2 * tam
    assert _count(OPIR(_tiny(stages=1))) == full - tam
    assert _count(OPIR(_tiny(stages=1, use_tam=False))) == full - 2 * tam
    assert _count(OPIR(_tiny(use_uncertainty=False))) == full
    # one scale: the KPN's last 3x3 conv loses 3 fusion-logit channels
    assert _count(OPIR(_tiny(dilations=(1,)))) == full - 3 * (base.width * 9 + 1)


def test_bad_config_values_raise() -> None:
    with pytest.raises(ValueError, match="stages"):
        _tiny(stages=3)
    with pytest.raises(ValueError, match="dilations"):
        _tiny(dilations=(0, 1))
    with pytest.raises(ValueError, match="same number of levels"):
        _tiny(dec_blocks=(1,))
    with pytest.raises(ValueError, match="classifier must be 'bottleneck' or 'trunk'"):
        _tiny(classifier="resnet")


# ---------------------------------------------------------------------------------------------
# The trunk classifier (model/classifier.py)
# ---------------------------------------------------------------------------------------------


def test_trunk_classifier_reads_the_image_not_the_kpn() -> None:
    model = _model(_tiny(classifier="trunk", classifier_width=8), perturb=0.05)
    assert not hasattr(model, "head")
    x = _image(seed=11)
    out = model(x)
    torch.testing.assert_close(out.class_logits, model.classifier(x))
    torch.testing.assert_close(model.classify(x), model.classifier(x))
    # the KPN does not feed it: changing the KPN leaves the logits alone
    with torch.no_grad():
        model.kpn.intro.weight.add_(1.0)
    torch.testing.assert_close(model.classify(x), out.class_logits)
    # padded strided convolutions: any size the model takes goes through, even 4 pixels high
    assert model.classify(torch.rand(1, 3, 4, 4)).shape == (1, len(CLASSES))
    assert model.classify(torch.rand(1, 3, 4, 1000)).shape == (1, len(CLASSES))


SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "opir-small-allinone.safetensors"


def test_trunk_classifier_with_a_mask_judges_a_padded_photo_as_the_photo(
    shared_data: Path,
) -> None:
    """The shipped classifier on real photos padded at the bottom and right, as a tile or a
    shape bucket is: with the mask its logits stay near the unpadded photo's whatever the
    padding holds (only the convolutions' reach across the border differs), without it a dark
    frame moves them by many units; the decision never changes with the mask."""
    model, _ = load_checkpoint(SHIPPED)
    for path in sorted((shared_data / "clean" / "CBSD68").iterdir())[:3]:
        photo = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255)
        x = photo.permute(2, 0, 1)[None, :, :320, :320].contiguous()  # some are portrait
        valid = torch.zeros(1, 1, 512, 544)
        valid[..., :320, :320] = 1
        with torch.no_grad():
            alone = model.classifier(x)
            for fill in (0.0, 0.5):
                padded = F.pad(x, (0, 224, 0, 192), value=fill)
                masked, unmasked = model.classifier(padded, valid), model.classifier(padded)
                assert (masked - alone).abs().max() < 2.0, path.name
                assert (masked - alone).abs().max() < (unmasked - alone).abs().max(), path.name
                assert masked.argmax() == alone.argmax(), path.name
            assert (model.classifier(F.pad(x, (0, 224, 0, 192)), None) - alone).abs().max() > 5
            # an all-ones mask is no mask
            ones = torch.ones(1, 1, 320, 320)
            torch.testing.assert_close(model.classifier(x, ones), alone, atol=1e-4, rtol=1e-4)


def test_bottleneck_head_with_a_mask_pools_the_image_alone() -> None:
    """The head has no convolutions: with the mask, any padding gives the crop's logits."""
    model = _model(_tiny(), perturb=0.05)
    crop = torch.randn(2, model.head.fc1.in_features // 2, 3, 5)
    padded = F.pad(crop, (0, 3, 0, 1), value=100.0)  # a max and a mean the crop never has
    valid = torch.zeros(2, 1, 4 * 16, 8 * 16)
    valid[..., : 3 * 16, : 5 * 16] = 1
    torch.testing.assert_close(model.head(padded, valid), model.head(crop))
    assert (model.head(padded) - model.head(crop)).abs().max() > 1


def test_forward_in_auto_passes_the_mask_to_the_classifier() -> None:
    model = _model(_tiny(classifier="trunk", classifier_width=8), perturb=0.05)
    x = torch.rand(1, 3, 32, 48)
    valid = torch.zeros(1, 1, 32, 48)
    valid[..., :20, :30] = 1
    with torch.no_grad():
        out = model(x, valid=valid)
    torch.testing.assert_close(out.class_logits, model.classifier(x, valid))
    assert not torch.allclose(out.class_logits, model.classifier(x))


def test_trunk_classifier_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _model(_tiny(classifier="trunk", classifier_width=8), perturb=0.05)
    save_checkpoint(tmp_path / "t.safetensors", model, {"name": "t"})
    loaded, card = load_checkpoint(tmp_path / "t.safetensors")
    assert card["config"]["classifier"] == "trunk" and loaded.config == model.config
    x = _image(seed=12)
    torch.testing.assert_close(loaded.classify(x), model.classify(x))


# ---------------------------------------------------------------------------------------------
# Clean pass-through in auto mode
# ---------------------------------------------------------------------------------------------


def _set_head(model: OPIR, clean_logit: float) -> None:
    """Make the head output logits (clean_logit, 0, 0, 0) for every image."""
    with torch.no_grad():
        model.head.fc2.weight.zero_()
        model.head.fc2.bias.copy_(torch.tensor([clean_logit, 0.0, 0.0, 0.0]))


def test_confident_clean_passes_through() -> None:
    model = _model(perturb=0.05)
    _set_head(model, 10.0)  # p(clean) = e^10 / (e^10 + 3) ~ 0.9999
    x = _image(seed=9)
    out = model(x)
    assert torch.softmax(out.class_logits, 1)[:, 0].min() > 0.999
    assert torch.equal(out.restored, x)
    assert not torch.allclose(out.stages[-1], x, atol=1e-3)  # the operator would have changed it


def test_unsure_clean_or_explicit_task_does_not_pass_through() -> None:
    model = _model(perturb=0.05)
    _set_head(model, math.log(12.0))  # p(clean) = 12 / 15 = 0.8 < 0.9
    x = _image(seed=10)
    out = model(x)
    torch.testing.assert_close(torch.softmax(out.class_logits, 1)[:, 0], torch.full((2,), 0.8))
    assert torch.equal(out.restored, out.stages[-1])
    assert not torch.allclose(out.restored, x, atol=1e-3)
    _set_head(model, 10.0)
    explicit = model(x, _one_hot("clean", "clean"))  # an explicit task is always applied
    assert torch.equal(explicit.restored, explicit.stages[-1])
    assert not torch.allclose(explicit.restored, x, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Loss (appendix A, Eq. 22)
# ---------------------------------------------------------------------------------------------


def test_charbonnier_on_constants() -> None:
    x = torch.full((1, 3, 4, 5), 0.3, dtype=torch.float64)
    y = torch.full((1, 3, 4, 5), 0.1, dtype=torch.float64)
    assert charbonnier(x, y).item() == pytest.approx(math.sqrt(0.2**2 + EPS**2), abs=1e-12)
    assert charbonnier(y, y).item() == pytest.approx(EPS, abs=1e-15)


def test_laplacian_of_ramp_and_quadratic() -> None:
    yy, xx = torch.meshgrid(
        torch.arange(7, dtype=torch.float64), torch.arange(9, dtype=torch.float64), indexing="ij"
    )
    ramp = (0.3 * yy - 0.2 * xx + 1.0).expand(2, 3, 7, 9)
    torch.testing.assert_close(
        laplacian(ramp)[..., 1:-1, 1:-1], torch.zeros(2, 3, 5, 7, dtype=torch.float64)
    )
    bowl = (yy**2 + 3 * xx**2).expand(1, 3, 7, 9)  # Delta = 2 + 6
    torch.testing.assert_close(
        laplacian(bowl)[..., 1:-1, 1:-1], torch.full((1, 3, 5, 7), 8.0, dtype=torch.float64)
    )


def test_laplacian_is_the_five_point_stencil_with_replicated_borders() -> None:
    """Against the stencil as a depthwise convolution of the replicate-padded map, borders and
    gradients included (float64: the two sum in different orders)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    stencil = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=x.dtype)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), stencil.expand(3, 1, 3, 3),
                        groups=3)  # fmt: skip
    torch.testing.assert_close(laplacian(x), expected)
    # the top-left corner replicates itself into its missing up and left neighbours
    corner = x[:, :, 1, 0] + x[:, :, 0, 1] - 2 * x[:, :, 0, 0]
    torch.testing.assert_close(laplacian(x)[:, :, 0, 0], corner)
    w = torch.rand(2, 3, 6, 5, dtype=torch.float64, generator=g)
    (ours,) = torch.autograd.grad((laplacian(x) * w).sum(), x)
    (theirs,) = torch.autograd.grad((expected * w).sum(), x)
    torch.testing.assert_close(ours, theirs)


def test_fft_l1() -> None:
    x = _image(seed=11, shape=(1, 3, 8, 10))
    assert fft_l1(x, x).item() == 0.0
    # a constant difference d has only the DC coefficient d * H * W; the mean runs over
    # H * (W / 2 + 1) complex coefficients, real and imaginary parts
    d = 0.25
    expected = d * 8 * 10 / (8 * (10 // 2 + 1) * 2)
    assert fft_l1(x + d, x).item() == pytest.approx(expected, rel=1e-5)


def test_total_loss_is_weighted_sum_by_hand() -> None:
    h, w, t, d1, d2 = 6, 8, 0.5, 0.2, -0.05
    target = torch.full((2, 3, h, w), t)
    stages = (target + d1, target + d2)
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    output = OPIROutput(stages[-1], stages, torch.ones(2, 1, h, w), logits)
    total, parts = OPIRLoss()(output, target, labels)

    charb = sum(math.sqrt(d * d + EPS * EPS) for d in (d1, d2))
    edge = 2 * EPS  # constant images: both Laplacians are zero
    fft = sum(abs(d) * h * w / (h * (w // 2 + 1) * 2) for d in (d1, d2))
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    ce = ((lse[0] - 2.0) + (lse[1] - 0.0)) / 2
    assert parts["charbonnier"].item() == pytest.approx(charb, rel=1e-5)
    assert parts["edge"].item() == pytest.approx(edge, rel=1e-4)
    assert parts["fft"].item() == pytest.approx(fft, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    expected = charb + 0.05 * edge + 0.1 * fft + 0.1 * ce
    assert total.item() == pytest.approx(expected, rel=1e-5)

    weighted = OPIRLoss(edge_weight=1.0, fft_weight=0.0, ce_weight=2.0)(output, target, labels)[0]
    assert weighted.item() == pytest.approx(charb + edge + 2 * ce, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Overfitting one real pair
# ---------------------------------------------------------------------------------------------


def _load_crop(path: Path, top: int, left: int, size: int) -> torch.Tensor:
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))[top : top + size, left : left + size]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255.0


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


def test_overfits_one_real_rain_pair(shared_data: Path) -> None:
    rain_set = shared_data / "rain" / "Rain13K-subset"
    degraded = _load_crop(rain_set / "input" / "1.jpg", 64, 64, 64)
    target = _load_crop(rain_set / "target" / "1.jpg", 64, 64, 64)
    model = _model(seed=0)
    loss_fn = OPIRLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    weights, labels = _one_hot("rain"), torch.tensor([CLASSES.index("rain")])
    with torch.no_grad():
        first, _ = loss_fn(model(degraded, weights), target, labels)
    psnr_before = _psnr(degraded, target)  # the model starts as the identity
    for _ in range(200):
        total, _ = loss_fn(model(degraded, weights), target, labels)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    with torch.no_grad():
        out = model(degraded, weights)
        last, parts = loss_fn(out, target, labels)
    assert last.item() < 0.3 * first.item()
    assert _psnr(out.restored, target) > psnr_before + 6.0
    assert parts["ce"].item() < 0.1  # the head learns the label too


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, OPIR]:
    model = _model(perturb=0.05)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model, {"name": "opir-tiny", "steps": 7})
    return path, model


def test_checkpoint_round_trip(saved: tuple[Path, OPIR]) -> None:
    path, model = saved
    loaded, card = load_checkpoint(path)
    assert not loaded.training
    assert card["name"] == "opir-tiny" and card["steps"] == 7
    assert OPIRConfig.from_dict(card["config"]) == model.config
    assert json.loads(path.with_suffix(".json").read_text()) == card
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
        # aligned like any torch allocation: CPU kernels round unaligned weights differently
        assert loaded.state_dict()[key].data_ptr() % 64 == 0, key
    x = _image(seed=12)
    w = _one_hot("rain", "snow")
    with torch.no_grad():
        a, b = model(x, w), loaded(x, w)
    assert torch.equal(a.restored, b.restored) and torch.equal(a.class_logits, b.class_logits)


def test_card_falls_back_to_metadata(saved: tuple[Path, OPIR]) -> None:
    path, model = saved
    path.with_suffix(".json").unlink()
    assert OPIRConfig.from_dict(read_card(path)["config"]) == model.config
    loaded, _ = load_checkpoint(path)
    assert loaded.config == model.config


def test_checkpoint_is_safetensors_not_pickle(saved: tuple[Path, OPIR]) -> None:
    """The file is an 8-byte little-endian header length, a JSON header, then raw tensor data."""
    path, model = saved
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert OPIRConfig.from_dict(json.loads(header["__metadata__"]["config"])) == model.config
    ends = [entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"]
    assert 8 + header_len + max(ends) == len(raw)
    assert set(header) - {"__metadata__"} == set(model.state_dict())


def test_pickle_file_is_refused(saved: tuple[Path, OPIR], tmp_path: Path) -> None:
    path, model = saved
    evil = tmp_path / "evil.safetensors"
    torch.save(model.state_dict(), evil)
    evil.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match=r"evil\.safetensors"):
        load_checkpoint(evil)


def _rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _drop_key(tensors: dict[str, torch.Tensor]) -> None:
    del tensors["head.fc2.bias"]


def _reshape(tensors: dict[str, torch.Tensor]) -> None:
    tensors["kpn.intro.weight"] = torch.zeros(4, 3, 3, 3)


def test_truncated_file(saved: tuple[Path, OPIR]) -> None:
    path, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors.*truncated"):
        load_checkpoint(path)


def test_missing_key(saved: tuple[Path, OPIR]) -> None:
    path, _ = saved
    _rewrite(path, _drop_key)
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors.*missing.*head\.fc2\.bias"):
        load_checkpoint(path)


def test_wrong_shape(saved: tuple[Path, OPIR]) -> None:
    path, _ = saved
    _rewrite(path, _reshape)
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors.*kpn\.intro\.weight.*shape"):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nothing\.safetensors.*not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_unknown_config_key_in_card(saved: tuple[Path, OPIR]) -> None:
    path, _ = saved
    card_file = path.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card["config"]["wings"] = 2
    card_file.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors.*wings"):
        load_checkpoint(path)


def test_card_not_json(saved: tuple[Path, OPIR]) -> None:
    path, _ = saved
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tiny\.json.*not valid JSON"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_dict_round_trip(name: str) -> None:
    config = OPIRConfig.from_name(name)
    assert OPIRConfig.from_dict(config.to_dict()) == config
    assert OPIRConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.multiple_of == 2 ** len(config.enc_blocks)
    changed = OPIRConfig.from_name(name, stages=1, dilations=(1, 2))
    assert OPIRConfig.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed


def test_unknown_preset_and_key() -> None:
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        OPIRConfig.from_name("huge")
    with pytest.raises(ValueError, match="unknown config keys"):
        OPIRConfig.from_dict({**_tiny().to_dict(), "depth": 3})
    with pytest.raises(TypeError):
        OPIRConfig.from_name("tiny", depth=3)
    assert dataclasses.replace(_tiny(), width=4).width == 4


def test_flop_counter_sees_the_operator_once_per_stage() -> None:
    """The custom op's registered FLOP formula is counted for each stage's call."""
    model = _model().eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, _one_hot("rain"))
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["opir.inverse_operator"] == 2 * inverse_operator_flops(1, 3, 32, 32, 4)
    assert counts["aten.convolution"] > 0


def test_masked_mean_reads_only_the_valid_pixels() -> None:
    from opir_engine.model.nafnet import masked_mean

    gen = torch.Generator().manual_seed(0)
    y = torch.rand(2, 5, 12, 16, generator=gen)
    valid = torch.zeros(2, 1, 12, 16)
    valid[0, :, :7, :9] = 1
    valid[1, :, :12, :3] = 1
    expected = torch.stack([y[0, :, :7, :9].mean((1, 2)), y[1, :, :, :3].mean((1, 2))])
    torch.testing.assert_close(masked_mean(y, valid)[..., 0, 0], expected)
    torch.testing.assert_close(masked_mean(y, None), y.mean((2, 3), keepdim=True))


def test_nafblock_with_a_mask_ignores_padding_beyond_its_reach() -> None:
    """The block's only global read is the channel attention's mean; with the mask it skips
    the padding, so padding content the 3x3 convolution cannot reach (2+ px from the image)
    changes nothing on the image, while without the mask it shifts every pixel."""
    from opir_engine.model.nafnet import NAFBlock

    torch.manual_seed(0)
    block = NAFBlock(8).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.rand(1, 8, 20, 24)
    valid = torch.zeros(1, 1, 20, 24)
    valid[..., :13, :17] = 1
    other = x.clone()
    other[..., 15:, :] = 5.0  # far padding rows and columns, different content
    other[..., :, 19:] = -3.0
    with torch.no_grad():
        a, b = block(x, valid)[..., :13, :17], block(other, valid)[..., :13, :17]
        c, d = block(x)[..., :13, :17], block(other)[..., :13, :17]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert float((c - d).abs().max()) > 1e-2


def test_kpn_runs_channels_last_and_returns_plain_planes(shared_data: Path) -> None:
    """The KPN's U-Net runs on channels-last maps (a layout, not a different computation): on a
    real photo its outputs agree with the plain layout's to float rounding, and they come back
    as plain contiguous planes, the op's operands."""
    model, _ = load_checkpoint(Path(__file__).resolve().parents[1] / "weights"
                               / "opir-small-allinone.safetensors")  # fmt: skip
    with Image.open(shared_data / "clean" / "CBSD68" / "101085.png") as im:
        photo = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)
    x = photo[None, :, :96, :128].float() / 255
    layouts: list[bool] = []  # whether the first convolution's output is channels-last
    model.kpn.intro.register_forward_hook(
        lambda _m, _i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        assert model.kpn.channels_last
        now = model.kpn(x)
        model.kpn.channels_last = False
        try:
            plain = model.kpn(x)
        finally:
            model.kpn.channels_last = True
    assert layouts == [True, False]
    for a, b in zip(now[:3], plain[:3], strict=True):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
