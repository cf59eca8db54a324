"""DETR's attention maps: the figures of the paper, from weights the model sows when asked.

``model.apply(..., mutable=SOWN)`` returns, beside the outputs, the softmax weights of every
attention module (collection "attention", [B, heads, Lq, Lk] each) and the feature mask
(collection "intermediates"). ``attention_maps`` keeps what the figures show, averaged over heads
as the official notebook does: the last decoder layer's cross-attention of each detection's query
over the feature map, and the last encoder layer's self-attention. Inside ``jax.jit`` (the
``Predictor`` of ``detr_jax.evaluation.inference``) the other layers' weights are never copied out.

Host side: ``feature_cell`` maps an original-image pixel to its feature-map cell, ``encoder_map``
gives that cell's self-attention over the feature map, ``valid_region`` crops a map to the image.
"""
import jax.numpy as jnp
import numpy as np

SOWN = ["attention", "intermediates"]


def _last_layer(layers: dict, prefix: str) -> dict:
    """The sown weights of the highest-numbered module ``prefix{i}`` of the transformer."""
    indices = [int(name[len(prefix):]) for name in layers if name.startswith(prefix)]
    if not indices:
        raise ValueError(f"the model has no {prefix.rstrip('_')}: no attention map to show")
    return layers[f"{prefix}{max(indices)}"]


def attention_maps(sown: dict, queries) -> dict:
    """Last-layer attention maps, head-averaged, float32 (jit-compatible).

    sown: the collections ``model.apply(..., mutable=SOWN)`` returned; queries [B, K] int: the
    query of each detection (``postprocess``'s "queries").
    -> {"decoder_attention" [B, K, h*w]: cross-attention of each detection's query over the feature
        map, row-major (0 on padding, 1 in total over the image);
        "encoder_attention" [B, h*w, h*w]: row i is how feature cell i attends to every cell;
        "feature_mask" [B, h, w] bool: True on padding}.
    """
    layers = sown["attention"]["transformer"]
    cross = _last_layer(layers, "decoder_layers_")["multihead_attn"]["weights"][0].astype(jnp.float32).mean(1)
    encoder = _last_layer(layers, "encoder_layers_")["self_attn"]["weights"][0].astype(jnp.float32).mean(1)
    return {"decoder_attention": jnp.take_along_axis(cross, queries[..., None].astype(jnp.int32), axis=1),
            "encoder_attention": encoder, "feature_mask": sown["intermediates"]["feature_mask"][0]}


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
