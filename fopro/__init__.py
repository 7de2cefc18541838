"""fopro: Fourier Prompted Effective Knowledge Distillation for long-tailed medical image recognition."""

__version__ = "0.9.0"

from fopro.errors import FoproError

__all__ = ["FoproError", "__version__"]
