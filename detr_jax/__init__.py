"""detr-jax: DETR (DEtection TRansformer) in JAX/Flax."""
from detr_jax.models import build_model

__all__ = ["build_model"]
__version__ = "0.1.0"
