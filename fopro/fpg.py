"""The Fourier Prompt Generator (FPG): a learnable, symmetric, bounded amplitude mask.

``M = 1 + strength * tanh(symmetrize(g))`` over the unshifted fft2 grid, shared across colour
channels, except at the DC term (the image's mean brightness), where ``M`` is always 1: a brightness
gain would be the adversary's easiest move and clamps whole regions to 0 or 1, where no gradient
flows. The prompted image is ``clamp(ifft2(M * fft2(x)).real, 0, 1)``. ``g`` is

* ``"dataset"``: one learnable map (1, 1, H, W), zero init (a dataset-level prompt);
* ``"conditional"``: a small conv net reading the channel-mean log-amplitude spectrum
  ``log1p(|fft2(x)|)`` fftshift-ed (low frequencies at the centre, so convolution is local in
  frequency) and ifftshift-ed back; its last conv is zero-initialised;
* ``"both"``: the sum of the two.

At init ``M == 1`` exactly in every mode, so the FPG starts as the identity.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fopro.errors import FoproError
from fopro.fourier import apply_spectral_mask, band_gain_mask, fftshift2, ifftshift2, symmetrize

__all__ = ["FourierPromptGenerator", "FPG_MODES"]

FPG_MODES = ("dataset", "conditional", "both")


class FourierPromptGenerator(nn.Module):
    """Learnable Fourier amplitude prompt for images of size ``image_size`` x ``image_size``."""

    def __init__(self, image_size: int, mode: str = "both", strength: float = 0.5, hidden: int = 16):
        super().__init__()
        if mode not in FPG_MODES:
            raise FoproError(f"FourierPromptGenerator mode must be one of {', '.join(FPG_MODES)} (got {mode!r})")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (0.0 < float(strength) < 1.0):
            raise FoproError(f"FourierPromptGenerator strength must be a number in (0, 1), e.g. 0.5 (got {strength!r})")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2:
            raise FoproError(f"FourierPromptGenerator image_size must be an integer >= 2 (got {image_size!r})")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise FoproError(f"FourierPromptGenerator hidden must be an integer >= 1 (got {hidden!r})")
        self.image_size = int(image_size)
        self.mode = mode
        self.strength = float(strength)
        self.hidden = int(hidden)

        not_dc = torch.ones(self.image_size, self.image_size)
        not_dc[0, 0] = 0.0
        self.register_buffer("not_dc", not_dc, persistent=False)
        self.prompt: nn.Parameter | None = None
        self.net: nn.Sequential | None = None
        if mode in ("dataset", "both"):
            self.prompt = nn.Parameter(torch.zeros(1, 1, self.image_size, self.image_size))
        if mode in ("conditional", "both"):
            # circular padding once (3 px for three 3x3 convolutions) instead of in every layer: same result, cheaper
            conv = dict(kernel_size=3, padding=0)
            self.net = nn.Sequential(
                nn.Conv2d(1, hidden, **conv),
                nn.GELU(),
                nn.Conv2d(hidden, hidden, **conv),
                nn.GELU(),
                nn.Conv2d(hidden, 1, **conv),
            )
            last = self.net[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, mode={self.mode!r}, strength={self.strength}, hidden={self.hidden}"

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise FoproError(f"the FPG expects images of shape (B, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            raise FoproError(
                f"the FPG was built for {self.image_size}x{self.image_size} images but got {h}x{w}; "
                f"resize the inputs to {self.image_size} or build the FPG with image_size={h} "
                "(the dataset prompt is resolution specific)"
            )

    def logits(self, x: Tensor) -> Tensor:
        """The unsymmetrised map ``g``: (1, 1, H, W) for "dataset", (B, 1, H, W) otherwise."""
        self._check_input(x)
        g = None
        if self.prompt is not None:
            g = self.prompt
        if self.net is not None:
            spec = torch.fft.fft2(x, dim=(-2, -1))
            log_amp = torch.log1p(spec.abs()).mean(dim=1, keepdim=True)
            padded = F.pad(fftshift2(log_amp), (3, 3, 3, 3), mode="circular")
            cond = ifftshift2(self.net(padded))
            g = cond if g is None else g + cond
        return g

    def mask(self, x: Tensor) -> Tensor:
        """``M = 1 + strength * tanh(symmetrize(g))`` (1 at DC), shape (B or 1, 1, H, W), in [1-s, 1+s]."""
        deviation = self.strength * torch.tanh(symmetrize(self.logits(x)))
        return 1.0 + deviation * self.not_dc.to(deviation.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x_prompted, mask)`` with ``x_prompted = clamp(ifft2(M * fft2(x)).real, 0, 1)``."""
        m = self.mask(x)
        return apply_spectral_mask(x, m.to(x.dtype), clamp=True), m

    @torch.no_grad()
    def init_from_band_gains(self, edges: Sequence[Sequence[float]], gains) -> None:
        """Set the dataset prompt so that ``M`` takes the given per-band gains.

        Gains are clipped into [1 - 0.95 s, 1 + 0.95 s] and ``g = atanh((gain - 1) / s)`` per band.
        In mode "both" the conditional part adds on top (it is zero at init).
        """
        if self.prompt is None:
            raise FoproError(
                f"init_from_band_gains needs a dataset prompt but the FPG's mode is {self.mode!r}; "
                "build it with mode 'dataset' or 'both'"
            )
        s = self.strength
        g = torch.as_tensor(gains, dtype=torch.float64).reshape(-1)
        if not torch.isfinite(g).all():
            raise FoproError(f"band gains must be finite numbers (got {g.tolist()})")
        g = g.clamp(1.0 - 0.95 * s, 1.0 + 0.95 * s)
        logits = torch.atanh((g - 1.0) / s).to(torch.float32)
        n = self.image_size
        gmap = band_gain_mask(n, n, edges, logits, device=self.prompt.device)
        self.prompt.copy_(gmap.reshape(1, 1, n, n).to(self.prompt.dtype))

    @torch.no_grad()
    def mean_mask(self, x: Tensor) -> Tensor:
        """The mask averaged over the batch, (H, W) on the unshifted grid (for plotting)."""
        return self.mask(x).mean(dim=(0, 1))

