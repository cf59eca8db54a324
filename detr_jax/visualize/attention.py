"""DETR's attention maps as the figures of the paper show them, on the host: the maps themselves
come from ``detr_jax.models.attention_maps`` (the predictor's ``attention=True``).

``feature_cell`` maps an original-image pixel to its feature-map cell, ``encoder_map``
gives that cell's self-attention over the feature map, ``valid_region`` crops a map to the image.
"""
import numpy as np


def valid_region(feature_mask) -> tuple[int, int]:
    """feature_mask [h, w] bool (True = padding, at the bottom/right) -> (rows, cols) of the image."""
    feature_mask = np.asarray(feature_mask)
    return int((~feature_mask[:, 0]).sum()), int((~feature_mask[0, :]).sum())


def feature_cell(pixel_xy, orig_size, size, stride, valid) -> tuple[int, int]:
    """The feature-map cell (row, col) that sees pixel (x, y) of the original image.

    orig_size (h, w) of the original image; size (h, w) it was resized to; stride (sy, sx): canvas
    pixels per feature cell (canvas size / feature-map size); valid (rows, cols): the image's cells
    (``valid_region``). Pixels beyond the image are clamped to its border cells.
    """
    x, y = pixel_xy
    row = y * size[0] / orig_size[0] // stride[0]
    col = x * size[1] / orig_size[1] // stride[1]
    return int(np.clip(row, 0, valid[0] - 1)), int(np.clip(col, 0, valid[1] - 1))


def encoder_map(encoder_attention, feature_shape, cell) -> np.ndarray:
    """encoder_attention [h*w, h*w] of one image, feature_shape (h, w), cell (row, col) -> [h, w]:
    how that cell attends to every cell of the feature map (sums to 1; 0 on padding)."""
    h, w = feature_shape
    return np.asarray(encoder_attention)[cell[0] * w + cell[1]].reshape(h, w)
