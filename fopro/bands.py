"""Radial frequency bands as fractions of Nyquist (the torch-free half of :mod:`fopro.fourier`'s conventions).

A band is a ring ``(low, high)`` of the normalised frequency radius r in [0, 1]; :mod:`fopro.fourier` builds
their masks on the unshifted FFT grid. probe.json stores bands as these pairs.
"""

from __future__ import annotations

import math

from fopro.errors import FoproError

#: Inner edge of the second band for log-spaced bands, as a fraction of Nyquist.
#: 1/32 of Nyquist is the lowest non-DC frequency (one cycle per image) of a 64-px image, so
#: the first band [0, 1/32) holds the DC term and, at larger resolutions, only the very
#: coarsest structure; the remaining edges are geometric from 1/32 up to 1.
DEFAULT_LOG_MIN_RADIUS = 1.0 / 32.0


def band_edges(
    n_bands: int, log: bool = False, min_radius: float = DEFAULT_LOG_MIN_RADIUS
) -> list[tuple[float, float]]:
    """Split the radius range [0, 1] into ``n_bands`` rings ``[(low, high), ...]``.

    Linear: edges i / n_bands. Log (``log=True``): the first band is [0, e1] and the edges
    e1 < e2 < ... < e_n = 1 are geometric from ``min_radius`` (default
    :data:`DEFAULT_LOG_MIN_RADIUS` = 1/32 of Nyquist) to 1. With one band both give [(0, 1)].
    """
    if isinstance(n_bands, bool) or not isinstance(n_bands, int) or n_bands < 1:
        raise FoproError(f"n_bands must be an integer >= 1 (got {n_bands!r}), e.g. 4")
    if not (0.0 < float(min_radius) < 1.0):
        raise FoproError(f"the log band minimum radius must be in (0, 1) (got {min_radius!r})")
    if n_bands == 1:
        return [(0.0, 1.0)]
    if log:
        lr = math.log(float(min_radius))
        inner = [math.exp(lr * (n_bands - 1 - i) / (n_bands - 1)) for i in range(n_bands)]
        inner[-1] = 1.0
        edges = [0.0] + inner
    else:
        edges = [i / n_bands for i in range(n_bands)] + [1.0]
    return [(edges[i], edges[i + 1]) for i in range(n_bands)]
