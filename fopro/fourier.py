"""The one implementation of the FFT helpers, shared by the Fourier Prompt Generator and the frequency probe.

Conventions (used everywhere in fopro):

* images ``x`` are raw torch tensors in [0, 1] of shape (B, C, H, W) (any leading dims work);
* the spectrum is ``torch.fft.fft2`` over the last two dims, on the full **unshifted** grid
  (DC at index (0, 0)); ``fftshift2`` / ``ifftshift2`` only exist for plotting centred spectra;
* a spectral mask is a real map over that unshifted grid, broadcastable to ``x``
  (e.g. (H, W), (1, 1, H, W) or (B, 1, H, W));
* frequency radius is a fraction of Nyquist: r = sqrt(fy^2 + fx^2) / 0.5 with fy, fx from
  ``torch.fft.fftfreq`` (cycles/pixel), clipped to 1 so the corners beyond the Nyquist radius
  belong to the last band.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fopro.bands import DEFAULT_LOG_MIN_RADIUS, band_edges
from fopro.errors import FoproError

__all__ = [
    "amplitude_phase",
    "rebuild",
    "apply_spectral_mask",
    "radial_frequency",
    "band_edges",
    "band_masks",
    "band_gain_mask",
    "scale_band",
    "symmetrize",
    "fftshift2",
    "ifftshift2",
    "DEFAULT_LOG_MIN_RADIUS",
]


_DIMS = (-2, -1)


def amplitude_phase(x: Tensor) -> tuple[Tensor, Tensor]:
    """Amplitude and phase of ``fft2(x)`` over the last two dims (unshifted grid)."""
    spec = torch.fft.fft2(x, dim=_DIMS)
    return spec.abs(), spec.angle()


def rebuild(amplitude: Tensor, phase: Tensor) -> Tensor:
    """Real image ``ifft2(A * exp(iP)).real`` (no clamping)."""
    return torch.fft.ifft2(torch.polar(amplitude, phase), dim=_DIMS).real


def apply_spectral_mask(x: Tensor, mask: Tensor, clamp: bool = True) -> Tensor:
    """``clamp(ifft2(mask * fft2(x)).real, 0, 1)``; differentiable w.r.t. ``x`` and ``mask``.

    Multiplying the complex spectrum by a real mask equals scaling the amplitude and keeping
    the phase (where the mask is non-negative). ``mask`` must broadcast to ``x`` and live on
    the unshifted grid; for a real output it should be symmetric (see :func:`symmetrize`).
    """
    if tuple(mask.shape[-2:]) != tuple(x.shape[-2:]):
        raise FoproError(
            f"spectral mask is {tuple(mask.shape[-2:])} but the image is {tuple(x.shape[-2:])}; "
            "build the mask for the image's height and width"
        )
    out = torch.fft.ifft2(mask * torch.fft.fft2(x, dim=_DIMS), dim=_DIMS).real
    return out.clamp(0.0, 1.0) if clamp else out


def _radius64(h: int, w: int, device=None) -> Tensor:
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    fx = torch.fft.fftfreq(w, device=device, dtype=torch.float64)
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5
    return r.clamp(max=1.0)


def radial_frequency(h: int, w: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(H, W) radius of each frequency as a fraction of Nyquist, clipped to 1; 0 at DC."""
    return _radius64(h, w, device).to(dtype)


def _check_edges(edges: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    try:
        out = [(float(lo), float(hi)) for lo, hi in edges]
    except (TypeError, ValueError):
        raise FoproError("band edges must be a list of (low, high) pairs; build them with band_edges()") from None
    if not out:
        raise FoproError("band edges are empty; build them with band_edges(n_bands) and --bands >= 1")
    return out


def band_masks(h: int, w: int, edges: Sequence[Sequence[float]], device=None) -> Tensor:
    """(n_bands, H, W) float 0/1 masks: band i is ``low <= r < high``, the last band also takes r == 1.

    With contiguous edges from :func:`band_edges` they partition the spectrum. Each mask is
    symmetric under (u, v) -> (-u, -v) since the radius is.
    """
    edges = _check_edges(edges)
    r = _radius64(h, w, device)
    masks = []
    for i, (lo, hi) in enumerate(edges):
        m = (r >= lo) & (r < hi)
        if i == len(edges) - 1:
            m = m | ((r >= lo) & (r <= hi))
        masks.append(m)
    return torch.stack(masks).to(torch.float32)


def band_gain_mask(h: int, w: int, edges: Sequence[Sequence[float]], gains, device=None) -> Tensor:
    """(H, W) mask ``sum_b gains[b] * band_b`` (``gains``: 1-D tensor or list, one per band)."""
    edges = _check_edges(edges)
    g = torch.as_tensor(gains, dtype=torch.float32, device=device).reshape(-1)
    if g.numel() != len(edges):
        raise FoproError(f"got {g.numel()} band gains for {len(edges)} bands; pass one gain per band")
    bands = band_masks(h, w, edges, device=g.device)
    return torch.einsum("b,bhw->hw", g, bands)


def scale_band(x: Tensor, edges: Sequence[Sequence[float]], band_index: int, gain: float) -> Tensor:
    """Multiply the amplitude of band ``band_index`` by ``gain`` (0 removes it), keep phase, rebuild, clamp."""
    edges = _check_edges(edges)
    if not (-len(edges) <= int(band_index) < len(edges)):
        raise FoproError(f"band index {band_index} is out of range for {len(edges)} bands; use 0..{len(edges) - 1}")
    h, w = x.shape[-2:]
    band = band_masks(h, w, edges, device=x.device)[band_index].to(x.dtype)
    mask = 1.0 + (float(gain) - 1.0) * band
    return apply_spectral_mask(x, mask, clamp=True)


def symmetrize(m: Tensor) -> Tensor:
    """Make a real map over the unshifted grid symmetric under index k -> (-k mod N) on both axes."""
    mirrored = torch.roll(torch.flip(m, dims=_DIMS), shifts=(1, 1), dims=_DIMS)
    return 0.5 * (m + mirrored)


def fftshift2(x: Tensor) -> Tensor:
    """Move DC to the centre of the last two dims (for plotting / local convolution)."""
    return torch.fft.fftshift(x, dim=_DIMS)


def ifftshift2(x: Tensor) -> Tensor:
    """Inverse of :func:`fftshift2`."""
    return torch.fft.ifftshift(x, dim=_DIMS)
