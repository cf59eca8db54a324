"""The decoder extension point: ``config.model.decoder`` picks the encoder-decoder between the
backbone's features and the heads. Backbone, heads, matcher, loss, train and eval loops are shared.

The contract. A variant is a Flax module (a subclass of ``transformer.EncoderDecoder``, built with
its fields and the model fields its entry names in ``module_fields``) called as

  ``module(src, pos, mask, spatial_shapes, queries, class_heads, box_heads, train)``

- src [B, N, d]: the projected features, each level flattened row-major, levels one after the
  other (shallowest first); pos [B, N, d]: their sine position embedding; mask [B, N] bool, True
  on padding; spatial_shapes: ((h, w), ...) of each level (Python ints), sum of h * w = N;
- queries [Q, ``query_width(d)``]: the learned queries, the model's ``query_param`` parameter
  (None for a two-stage model, whose queries come from the encoder);
- class_heads, box_heads: the model's heads, one per decoder layer (the same module repeated when
  the official model shares it) and, for a two-stage model, one more for the encoder's proposals.
  Box heads map float32 [..., d] -> [..., 4] before the sigmoid, for decoders that refine boxes
  layer by layer;

and returns ``(hs, references, memory, encoder_outputs)``:

- hs [L, B, Q, d]: every decoder layer's output (after the final decoder norm, where there is one);
- references: per layer l, [B, Q, R] in (0, 1), R = 2 (cx, cy) or 4 (cx, cy, w, h), what layer l's
  boxes are relative to (an array [L, B, Q, R] or a sequence of L arrays), or None for absolute
  boxes (DETR);
- memory [B, N, d]: the encoder output;
- encoder_outputs: None, or (two-stage) {"pred_logits" [B, N, C'], "pred_boxes" [B, N, 4]}: the
  encoder's proposals, trained as the official ``enc_outputs`` (every target labelled 0).

A decoder whose entry has ``label_embedding`` also takes ``content=`` (DN-DETR's content queries
and denoising queries, ``DETR.content_queries``): P denoising queries come before the Q matching
queries in hs and references, and the model returns their predictions as ``dn_outputs``.

The heads then compute ``logits = class_embed_l(hs[l])`` and
``boxes = sigmoid(bbox_embed_l(hs[l]) + inverse_sigmoid(references[l], reference_eps))``, the inverse
sigmoid added to the first R box coordinates (``detr_jax.models.detr``).
"""
import dataclasses
from typing import Callable

from detr_jax.models.conditional import DAB_INVERSE_SIGMOID_EPS, ConditionalTransformer, DABTransformer
from detr_jax.models.deformable import INVERSE_SIGMOID_EPS, DeformableTransformer
from detr_jax.models.transformer import DETRTransformer, EncoderDecoder


@dataclasses.dataclass(frozen=True)
class Decoder:
    module: type[EncoderDecoder]
    query_param: str  # the learned queries' parameter, named as the official state_dict key
    query_width: Callable[[int], int]  # hidden_dim -> width of one query
    reference_eps: float | None  # the heads' inverse-sigmoid eps; None: absolute boxes
    position_temperature: float = 10000.0  # of the features' sine position embedding
    position_offset: float = 0.0  # subtracted from the cumulative cell count (Deformable DETR: 0.5)
    multi_scale: bool = False  # levels (C3, C4, C5, a stride-64 conv; or C5 alone) with conv + GroupNorm projections
    module_fields: tuple[str, ...] = ()  # config.model fields the module takes as its own
    indexed_heads: bool = False  # heads named per layer (class_embed_0 ...) even when shared, as official
    label_embedding: bool = False  # takes DN-DETR's content queries (``content=``): label embedding and denoising


DECODERS = {
    "detr": Decoder(DETRTransformer, "query_embed", lambda d: d, None),
    "conditional": Decoder(ConditionalTransformer, "query_embed", lambda d: d, 1e-5),
    "dab": Decoder(DABTransformer, "refpoint_embed", lambda d: 4, DAB_INVERSE_SIGMOID_EPS, position_temperature=20.0,
                   label_embedding=True),
    "deformable": Decoder(DeformableTransformer, "query_embed", lambda d: 2 * d, INVERSE_SIGMOID_EPS,
                          position_offset=0.5, multi_scale=True,
                          module_fields=("with_box_refine", "two_stage", "num_queries", "msda_impl", "padding",
                                         "num_feature_levels"),
                          indexed_heads=True),
}
