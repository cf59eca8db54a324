"""The attention maps DETR's paper shows, read out of the weights the model sows when asked.

``model.apply(..., mutable=SOWN)`` returns, beside the outputs, the softmax weights of every
attention module (collection "attention", [B, heads, Lq, Lk] each) and the feature mask
(collection "intermediates"). ``attention_maps`` keeps what the figures show, averaged over heads
as the official notebook does: the last decoder layer's cross-attention of each detection's query
over the feature map, and the last encoder layer's self-attention. Inside ``jax.jit`` (the
``Predictor`` of ``detr_jax.evaluation.inference``) the other layers' weights are never copied out.
``detr_jax.visualize.attention`` draws them.
"""
import jax.numpy as jnp

SOWN = ["attention", "intermediates"]
CROSS_ATTENTIONS = ("multihead_attn", "cross_attn")  # the decoder layer's cross-attention: DETR's; Conditional / DAB's


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
    decoder_layer = _last_layer(layers, "decoder_layers_")
    cross_name = next((name for name in CROSS_ATTENTIONS if "weights" in decoder_layer.get(name, {})), None)
    if cross_name is None:
        raise ValueError("this model's decoder has no dense cross-attention map (Deformable DETR samples a few "
                         "points per query and level): attention maps are not available for it")
    cross = decoder_layer[cross_name]["weights"][0].astype(jnp.float32).mean(1)
    encoder = _last_layer(layers, "encoder_layers_")["self_attn"]["weights"][0].astype(jnp.float32).mean(1)
    return {"decoder_attention": jnp.take_along_axis(cross, queries[..., None].astype(jnp.int32), axis=1),
            "encoder_attention": encoder, "feature_mask": sown["intermediates"]["feature_mask"][0]}
