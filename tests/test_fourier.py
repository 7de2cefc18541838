"""FFT helpers checked against numpy.fft as the independent reference."""

import numpy as np
import pytest
import torch

from fopro.errors import FoproError
from fopro.fourier import (
    amplitude_phase,
    apply_spectral_mask,
    band_edges,
    band_gain_mask,
    band_masks,
    fftshift2,
    ifftshift2,
    radial_frequency,
    rebuild,
    scale_band,
    symmetrize,
)

H = W = 32


def _images(b=2, c=3, h=H, w=W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g, dtype=torch.float64)


def _np_radius(h, w):
    fy = np.fft.fftfreq(h)
    fx = np.fft.fftfreq(w)
    return np.minimum(np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5, 1.0)


def test_amplitude_phase_rebuild_matches_numpy():
    x = _images()
    amp, phase = amplitude_phase(x)
    ref = np.fft.fft2(x.numpy(), axes=(-2, -1))
    np.testing.assert_allclose(amp.numpy(), np.abs(ref), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(rebuild(amp, phase).numpy(), x.numpy(), atol=1e-10)
    x32 = x.float()
    a32, p32 = amplitude_phase(x32)
    np.testing.assert_allclose(rebuild(a32, p32).numpy(), x32.numpy(), atol=1e-5)


def test_radial_frequency():
    r = radial_frequency(H, 30)
    assert r.shape == (H, 30)
    assert r[0, 0] == 0
    assert float(r.max()) == 1.0
    np.testing.assert_allclose(r.numpy(), _np_radius(H, 30), atol=1e-6)
    assert r[H // 2, 0] == 1.0  # Nyquist along y


def test_band_edges_linear_and_log():
    assert band_edges(1) == [(0.0, 1.0)]
    assert band_edges(1, log=True) == [(0.0, 1.0)]
    lin = band_edges(4)
    assert lin == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    lg = band_edges(4, log=True)
    assert lg[0][0] == 0.0 and lg[-1][1] == 1.0
    highs = [hi for _, hi in lg]
    assert all(a < b for a, b in zip(highs, highs[1:]))
    ratios = [highs[i + 1] / highs[i] for i in range(len(highs) - 1)]
    np.testing.assert_allclose(ratios, ratios[0])
    for (_, hi), (lo, _) in zip(lg, lg[1:]):
        assert hi == lo


@pytest.mark.parametrize("n_bands,log", [(1, False), (3, False), (4, False), (5, True)])
@pytest.mark.parametrize("hw", [(32, 32), (31, 32)])
def test_band_masks_partition_and_symmetric(n_bands, log, hw):
    h, w = hw
    masks = band_masks(h, w, band_edges(n_bands, log=log))
    assert masks.shape == (n_bands, h, w)
    assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(0), torch.ones(h, w))
    assert torch.equal(symmetrize(masks), masks)


def test_gain_one_everywhere_is_identity():
    x = _images().float()
    edges = band_edges(4)
    m = band_gain_mask(H, W, edges, [1.0, 1.0, 1.0, 1.0])
    assert torch.equal(m, torch.ones(H, W))
    torch.testing.assert_close(apply_spectral_mask(x, m), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(scale_band(x, edges, 2, 1.0), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_bands", [3, 5])
def test_lowest_band_equals_numpy_low_pass(n_bands):
    x = _images(seed=1)
    edges = band_edges(n_bands)
    gains = [1.0] + [0.0] * (n_bands - 1)
    m = band_gain_mask(H, W, edges, gains).double()
    ours = apply_spectral_mask(x, m, clamp=False).numpy()
    lp = (_np_radius(H, W) < edges[0][1]).astype(np.float64)
    ref = np.fft.ifft2(lp * np.fft.fft2(x.numpy(), axes=(-2, -1)), axes=(-2, -1)).real
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    # the clamped version equals the clamped numpy low-pass
    masks = band_masks(H, W, edges)
    only_low = apply_spectral_mask(x, masks[0].double())
    np.testing.assert_allclose(only_low.numpy(), np.clip(ref, 0, 1), atol=1e-10)


def test_scale_band_removes_band_and_matches_numpy():
    x = _images(seed=2)
    edges = band_edges(4)
    out = scale_band(x, edges, 1, 0.0)
    r = _np_radius(H, W)
    keep = 1.0 - ((r >= 0.25) & (r < 0.5)).astype(np.float64)
    ref = np.fft.ifft2(keep * np.fft.fft2(x.numpy(), axes=(-2, -1)), axes=(-2, -1)).real
    np.testing.assert_allclose(out.numpy(), np.clip(ref, 0, 1), atol=1e-10)


def test_apply_spectral_mask_broadcast_and_grad():
    x = _images(b=3).float()
    mask = torch.rand(3, 1, H, W, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = apply_spectral_mask(x, symmetrize(mask), clamp=False)
    ref = np.fft.ifft2(symmetrize(mask).detach().numpy() * np.fft.fft2(x.numpy(), axes=(-2, -1)), axes=(-2, -1)).real
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=1e-5)
    out.sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    with pytest.raises(FoproError):
        apply_spectral_mask(x, torch.ones(16, 16))


def test_symmetrize_is_index_negation():
    m = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(4))
    s = symmetrize(m)
    h, w = m.shape[-2:]
    neg = s[..., (-torch.arange(h)) % h, :][..., (-torch.arange(w)) % w]
    assert torch.equal(s, neg)
    assert torch.equal(symmetrize(s), s)
    # a symmetric real mask keeps ifft2 real (numpy reference)
    spec = np.fft.fft2(np.random.default_rng(0).random((7, 8)))
    assert np.abs(np.fft.ifft2(s[0].numpy() * spec).imag).max() < 1e-12


def test_shift_helpers_match_numpy():
    m = torch.arange(7 * 8, dtype=torch.float32).reshape(1, 7, 8)
    np.testing.assert_array_equal(fftshift2(m).numpy(), np.fft.fftshift(m.numpy(), axes=(-2, -1)))
    assert torch.equal(ifftshift2(fftshift2(m)), m)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_band_edges_rejects_bad_count(bad):
    with pytest.raises(FoproError, match="n_bands must be an integer"):
        band_edges(bad)


def test_band_gain_mask_wrong_length():
    with pytest.raises(FoproError):
        band_gain_mask(H, W, band_edges(3), [1.0, 0.5])
    with pytest.raises(FoproError):
        scale_band(_images(), band_edges(3), 3, 0.0)
