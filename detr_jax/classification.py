"""Classification types (``config.model.classification``): everything that depends on how a
model's logits score classes, in one place, for the model's head, the matcher, the loss, the
postprocess, detect and the val loss.

- "softmax" (official DETR): num_classes + 1 logits, the last is no-object; class probabilities
  are the softmax over all of them. Matching cost -prob[label]; loss: cross-entropy, the no-object
  class weighted by ``eos_coef``; detections: each query's best real class (no-object excluded
  from the max, part of the softmax), ``topk`` keeps the k best queries (0: all, official).
- "sigmoid_focal" (Deformable, Conditional and DAB-DETR): num_classes logits, each an independent
  sigmoid score; the class head's bias starts at the prior -log((1 - 0.01) / 0.01). Matching cost:
  the focal-style cost (alpha, gamma); loss: the sigmoid focal loss over queries x classes, summed
  and divided by the number of target boxes; detections: the ``topk`` best (query, class) pairs of
  the flat list of queries x classes (0: 100, the official PostProcess; DAB-DETR's selects 300).

Labels are class indices 0..num_classes-1 in both; ``num_classes`` (an index past the last logit
for focal) marks an unmatched query.
"""
import math

import jax
import jax.numpy as jnp

FOCAL_PRIOR = 0.01
FOCAL_DEFAULT_TOPK = 100  # official PostProcess of Conditional and Deformable DETR


class Softmax:
    name = "softmax"

    @staticmethod
    def num_logits(num_classes: int) -> int:
        return num_classes + 1

    @staticmethod
    def num_classes(num_logits: int) -> int:
        return num_logits - 1

    prior_bias = None  # the class head's bias starts as torch's default

    @staticmethod
    def match_cost(logits, labels, loss_config):
        """logits [..., B, Q, C+1], labels [B, M] -> [..., B, Q, M]: -prob[label]."""
        prob = jax.nn.softmax(logits, axis=-1)
        index = jnp.broadcast_to(labels[:, None, :], (*logits.shape[:-1], labels.shape[-1]))
        return -jnp.take_along_axis(prob, index, axis=-1)

    @staticmethod
    def loss_sums(logits, target_classes, query_valid, num_boxes, loss_config):
        """(sum of weight x NLL, sum of the weights) over every query: logits [B, Q, C+1],
        target_classes [B, Q] (C = no-object), query_valid [B, Q] (False: counts nowhere)."""
        no_object = logits.shape[-1] - 1
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, target_classes[..., None], axis=-1)[..., 0]
        weight = jnp.where(target_classes == no_object, loss_config.eos_coef, 1.0) * query_valid
        return (weight * nll).sum(), weight.sum()

    @staticmethod
    def query_classes(logits):
        """logits [..., Q, C+1] -> (scores [..., Q], labels [..., Q] int32): each query's most probable
        class over all C + 1, no-object (label C) included, as official PostProcessPanoptic reads them."""
        prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return prob.max(-1), prob.argmax(-1).astype(jnp.int32)

    @staticmethod
    def detections(logits, topk: int):
        """logits [B, Q, C+1] -> (scores [B, K], labels [B, K] int32, queries [B, K] int32): each
        query's best real class, all Q queries in query order (topk 0) or the topk best by score."""
        prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]
        scores, labels = prob.max(axis=-1), prob.argmax(axis=-1).astype(jnp.int32)
        queries = jnp.broadcast_to(jnp.arange(logits.shape[1], dtype=jnp.int32), scores.shape)
        if topk:
            scores, queries = jax.lax.top_k(scores, topk)
            labels = jnp.take_along_axis(labels, queries, axis=1)
        return scores, labels, queries.astype(jnp.int32)

    @staticmethod
    def max_topk(num_queries: int, num_classes: int) -> int:
        return num_queries


class SigmoidFocal:
    name = "sigmoid_focal"

    @staticmethod
    def num_logits(num_classes: int) -> int:
        return num_classes

    @staticmethod
    def num_classes(num_logits: int) -> int:
        return num_logits

    prior_bias = -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR)  # official: every class starts at FOCAL_PRIOR

    @staticmethod
    def match_cost(logits, labels, loss_config):
        """logits [..., B, Q, C], labels [B, M] -> [..., B, Q, M]: the official focal-style cost
        alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)), p = sigmoid(logit[label])."""
        index = jnp.broadcast_to(labels[:, None, :], (*logits.shape[:-1], labels.shape[-1]))
        p = jnp.take_along_axis(jax.nn.sigmoid(logits), index, axis=-1)
        alpha, gamma = loss_config.focal_alpha, loss_config.focal_gamma
        pos = alpha * (1 - p) ** gamma * -jnp.log(p + 1e-8)
        neg = (1 - alpha) * p ** gamma * -jnp.log(1 - p + 1e-8)
        return pos - neg

    @staticmethod
    def loss_sums(logits, target_classes, query_valid, num_boxes, loss_config):
        """(sum of the sigmoid focal loss over queries x classes, number of target boxes):
        logits [B, Q, C], target_classes [B, Q] (C = unmatched: all classes negative), query_valid
        [B, Q] (False: counts nowhere)."""
        onehot = jax.nn.one_hot(target_classes, logits.shape[-1] + 1)[..., :-1]
        p = jax.nn.sigmoid(logits)
        ce = jnp.maximum(logits, 0) - logits * onehot + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        p_t = p * onehot + (1 - p) * (1 - onehot)
        alpha_t = loss_config.focal_alpha * onehot + (1 - loss_config.focal_alpha) * (1 - onehot)
        focal = (alpha_t * ce * (1 - p_t) ** loss_config.focal_gamma).sum(-1)
        return jnp.where(query_valid, focal, 0).sum(), num_boxes

    @staticmethod
    def query_classes(logits):
        """logits [..., Q, C] -> (scores [..., Q], labels [..., Q] int32): each query's best sigmoid
        score and its class (never no-object: a focal model has no such logit)."""
        prob = jax.nn.sigmoid(logits.astype(jnp.float32))
        return prob.max(-1), prob.argmax(-1).astype(jnp.int32)

    @staticmethod
    def detections(logits, topk: int):
        """logits [B, Q, C] -> (scores [B, K], labels [B, K] int32, queries [B, K] int32): the
        K = topk (0: FOCAL_DEFAULT_TOPK, at most Q x C) best sigmoid scores of the flat queries x classes list,
        best first; a query can appear with several classes."""
        b, q, c = logits.shape
        scores, index = jax.lax.top_k(jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(b, q * c),
                                      topk or min(FOCAL_DEFAULT_TOPK, q * c))
        return scores, (index % c).astype(jnp.int32), (index // c).astype(jnp.int32)

    @staticmethod
    def max_topk(num_queries: int, num_classes: int) -> int:
        return num_queries * num_classes


CLASSIFICATIONS = {kind.name: kind for kind in (Softmax, SigmoidFocal)}


def classification(name: str):
    """The classification type ``name`` (``config.model.classification``)."""
    if name not in CLASSIFICATIONS:
        raise ValueError(f"config.model.classification = {name!r}; expected one of {', '.join(CLASSIFICATIONS)}")
    return CLASSIFICATIONS[name]
