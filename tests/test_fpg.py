"""Fourier Prompt Generator: identity at init, symmetric bounded masks, gradients, band-gain init."""

import numpy as np
import pytest
import torch

from fopro.errors import FoproError
from fopro.fourier import band_edges, band_masks, symmetrize
from fopro.fpg import FPG_MODES, FourierPromptGenerator

S = 32


def _images(b=2, c=3, seed=0):
    return torch.rand(b, c, S, S, generator=torch.Generator().manual_seed(seed))


def _randomize(fpg, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if fpg.prompt is not None:
            fpg.prompt.copy_(3.0 * torch.randn(fpg.prompt.shape, generator=g))
        if fpg.net is not None:
            last = fpg.net[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g))
            last.bias.copy_(torch.randn(last.bias.shape, generator=g))


@pytest.mark.parametrize("mode", FPG_MODES)
def test_identity_at_init(mode):
    torch.manual_seed(0)
    fpg = FourierPromptGenerator(S, mode=mode, strength=0.5)
    x = _images()
    xp, m = fpg(x)
    assert torch.equal(m, torch.ones_like(m))
    assert m.shape[-3:] == (1, S, S)
    assert m.shape[0] == (1 if mode == "dataset" else x.shape[0])
    assert xp.shape == x.shape
    torch.testing.assert_close(xp, x, atol=1e-5, rtol=0)
    ref = np.clip(np.fft.ifft2(np.fft.fft2(x.numpy(), axes=(-2, -1)), axes=(-2, -1)).real, 0, 1)
    np.testing.assert_allclose(xp.detach().numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("mode", FPG_MODES)
@pytest.mark.parametrize("strength", [0.3, 0.9])
def test_random_params_bounded_symmetric_real(mode, strength):
    torch.manual_seed(1)
    fpg = FourierPromptGenerator(S, mode=mode, strength=strength, hidden=8)
    _randomize(fpg, seed=2)
    x = _images(seed=3)
    xp, m = fpg(x)
    m = m.detach()
    assert not torch.equal(m, torch.ones_like(m))
    assert float(m.min()) >= 1 - strength and float(m.max()) <= 1 + strength
    assert torch.equal(m, symmetrize(m))
    spec = np.fft.fft2(x.numpy().astype(np.float64), axes=(-2, -1))
    full = np.fft.ifft2(m.numpy().astype(np.float64) * spec, axes=(-2, -1))
    assert np.abs(full.imag).max() < 1e-5
    np.testing.assert_allclose(xp.detach().numpy(), np.clip(full.real, 0, 1), atol=1e-5)
    assert float(xp.detach().min()) >= 0 and float(xp.detach().max()) <= 1
    mm = fpg.mean_mask(x)
    assert mm.shape == (S, S) and not mm.requires_grad
    torch.testing.assert_close(mm, m.mean(dim=(0, 1)))


def test_conditional_mask_depends_on_input():
    torch.manual_seed(4)
    fpg = FourierPromptGenerator(S, mode="conditional", hidden=8)
    _randomize(fpg, seed=5)
    m = fpg.mask(_images(b=2, seed=6)).detach()
    assert not torch.allclose(m[0], m[1])


@pytest.mark.parametrize("mode", FPG_MODES)
def test_gradients_reach_parameters(mode):
    torch.manual_seed(7)
    fpg = FourierPromptGenerator(S, mode=mode, hidden=8)
    x = _images(seed=8)
    target = _images(seed=9)
    xp, _ = fpg(x)
    ((xp - target) ** 2).mean().backward()
    if fpg.prompt is not None:
        assert fpg.prompt.grad is not None and fpg.prompt.grad.abs().sum() > 0
    if fpg.net is not None:
        w = fpg.net[-1].weight.grad
        assert w is not None and w.abs().sum() > 0


@pytest.mark.parametrize("mode", ["dataset", "both"])
@pytest.mark.parametrize("log", [False, True])
def test_init_from_band_gains(mode, log):
    strength = 0.5
    fpg = FourierPromptGenerator(S, mode=mode, strength=strength, hidden=4)
    edges = band_edges(4, log=log)
    gains = [1.3, 0.8, 1.0, 0.6]  # inside [1 - 0.475, 1 + 0.475]
    fpg.init_from_band_gains(edges, gains)
    m = fpg.mask(_images()).detach()
    bands = band_masks(S, S, edges)
    bands[:, 0, 0] = 0  # the DC term keeps gain 1 (tested below)
    for b, gain in enumerate(gains):
        sel = bands[b].bool()
        if sel.any():
            vals = m[..., sel]
            assert torch.allclose(vals, torch.full_like(vals, gain), atol=1e-4)
    # out-of-range gains are clipped into [1 - 0.95 s, 1 + 0.95 s]
    fpg.init_from_band_gains(edges, [5.0, 0.0, 1.0, 1.0])
    m = fpg.mask(_images()).detach()
    assert torch.allclose(m[..., bands[0].bool()], torch.tensor(1 + 0.95 * strength), atol=1e-4)
    assert torch.allclose(m[..., bands[1].bool()], torch.tensor(1 - 0.95 * strength), atol=1e-4)


@pytest.mark.parametrize("mode", FPG_MODES)
def test_dc_term_is_never_changed(mode):
    """M is 1 at DC whatever the parameters, so the prompt keeps every image's mean brightness (before clamping)."""
    fpg = FourierPromptGenerator(S, mode=mode, strength=0.9, hidden=8)
    _randomize(fpg, seed=11)
    x = _images(seed=12) * 0.5 + 0.25
    m = fpg.mask(x).detach()
    assert torch.all(m[..., 0, 0] == 1.0)
    assert (m - 1).abs().amax() > 0.1  # the other frequencies do move
    unclamped = np.fft.ifft2(m.numpy().astype(np.float64) * np.fft.fft2(x.numpy().astype(np.float64), axes=(-2, -1)), axes=(-2, -1)).real
    np.testing.assert_allclose(unclamped.mean(axis=(-2, -1)), x.numpy().mean(axis=(-2, -1)), atol=1e-6)
    if fpg.prompt is not None:
        fpg.init_from_band_gains(band_edges(2), [1.4, 0.7])
        assert torch.all(fpg.mask(x).detach()[..., 0, 0] == 1.0)


def test_init_from_band_gains_needs_dataset_prompt():
    fpg = FourierPromptGenerator(S, mode="conditional", hidden=4)
    with pytest.raises(FoproError, match="needs a dataset prompt"):
        fpg.init_from_band_gains(band_edges(2), [1.0, 1.0])
    fpg = FourierPromptGenerator(S, mode="dataset")
    with pytest.raises(FoproError):
        fpg.init_from_band_gains(band_edges(3), [1.0, 1.0])


def test_bad_options_raise():
    with pytest.raises(FoproError, match="mode must be one of"):
        FourierPromptGenerator(S, mode="spectral")
    for bad in (0, 0.0, 1.0, 1.5, -0.2):
        with pytest.raises(FoproError, match="strength must be a number"):
            FourierPromptGenerator(S, strength=bad)


def test_size_mismatch_raises():
    fpg = FourierPromptGenerator(S, mode="dataset")
    with pytest.raises(FoproError, match="32x32"):
        fpg(torch.rand(1, 3, 16, 16))
    with pytest.raises(FoproError):
        fpg(torch.rand(3, S, S))
