"""Flax modules of DETR: ResNet backbones, position embeddings, transformer, the detector."""
from detr_jax.models.detr import DETR, build_model, count_trainable, trainable_mask

__all__ = ["DETR", "build_model", "count_trainable", "trainable_mask"]
