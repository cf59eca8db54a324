"""The decoder extension point: ``config.model.decoder`` picks the encoder-decoder between the
backbone's features and the heads. Backbone, heads, matcher, loss, train and eval loops are shared.

The contract. A variant is a Flax module (a subclass of ``transformer.EncoderDecoder``, built with
its fields) called as

  ``module(src, pos, mask, spatial_shapes, queries, box_head, train)``

- src [B, N, d]: the projected features, flattened row-major (levels one after the other);
  pos [B, N, d]: their sine position embedding; mask [B, N] bool, True on padding;
  spatial_shapes: ((h, w), ...) of each feature level (Python ints), sum of h * w = N;
- queries [Q, ``query_width(d)``]: the learned queries, the model's ``query_param`` parameter;
- box_head: the model's box MLP, float32 [..., d] -> [..., 4] before the sigmoid, for decoders
  that refine boxes layer by layer (the official models share it);

and returns ``(hs, references, memory)``:

- hs [L, B, Q, d]: every decoder layer's output, after the final decoder norm;
- references [L, B, Q, R] in (0, 1), R = 2 (cx, cy) or 4 (cx, cy, w, h): what layer l's boxes are
  relative to, or None for absolute boxes (DETR);
- memory [B, N, d]: the encoder output.

The heads then compute ``logits = class_embed(hs)`` and
``boxes = sigmoid(bbox_embed(hs) + inverse_sigmoid(references, reference_eps))``, the inverse sigmoid
added to the first R box coordinates (``detr_jax.models.detr``).
"""
import dataclasses
from typing import Callable

from detr_jax.models.conditional import DAB_INVERSE_SIGMOID_EPS, ConditionalTransformer, DABTransformer
from detr_jax.models.transformer import DETRTransformer, EncoderDecoder


@dataclasses.dataclass(frozen=True)
class Decoder:
    module: type[EncoderDecoder]
    query_param: str  # the learned queries' parameter, named as the official state_dict key
    query_width: Callable[[int], int]  # hidden_dim -> width of one query
    reference_eps: float | None  # the heads' inverse-sigmoid eps; None: absolute boxes
    position_temperature: float = 10000.0  # of the features' sine position embedding


DECODERS = {
    "detr": Decoder(DETRTransformer, "query_embed", lambda d: d, None),
    "conditional": Decoder(ConditionalTransformer, "query_embed", lambda d: d, 1e-5),
    "dab": Decoder(DABTransformer, "refpoint_embed", lambda d: 4, DAB_INVERSE_SIGMOID_EPS, position_temperature=20.0),
}
