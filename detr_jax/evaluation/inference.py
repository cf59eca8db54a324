"""Data-parallel inference: forward + postprocess compiled once per batch shape, each batch sharded
over this host's devices, then every host's predictions gathered.

A host's batch [B, H, W, 3] is split over its D local devices (B a multiple of D, see
``host_batch_size``) with ``jax.jit`` and a 1-D device mesh; the variables are replicated. The
computation uses only local devices, so hosts run independently until ``gather_hosts``.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from detr_jax.classification import classification as classification_of
from detr_jax.evaluation.postprocess import postprocess
from detr_jax.parallel import AXIS, local_mesh



TARGET_KEYS = ("labels", "boxes", "box_valid", "example_valid")  # the batch fields the loss reads
MASK_TARGET_KEYS = ("segments", "segment_ids")  # and with the mask head
MASK_OUTPUT_KEYS = ("query_scores", "query_labels", "pred_masks", "pred_masks_hw")  # what the host's MaskScorer reads


def has_mask_head(model) -> bool:
    """Whether ``model`` returns pred_masks (a DETR with ``masks``; a custom module without the field has none)."""
    return bool(getattr(model, "masks", False))


class Predictor:
    """``predictor(variables, image [B, H, W, 3], padding_mask [B, H, W], orig_size [B, 2], targets)`` ->
    ``postprocess`` output (scores [B, K], labels [B, K], boxes [B, K, 4], queries [B, K]),
    jit-compiled. With ``attention``, also the attention maps of ``models.attention_maps.attention_maps``
    (decoder_attention [B, K, h*w], encoder_attention [B, h*w, h*w], feature_mask [B, h, w]); without
    it, the model sows nothing and the program is the plain forward pass. With ``loss_config``
    (frozen), also "loss_sums": {term: [2] (numerator, denominator)} of ``losses.loss_sums`` on
    ``targets`` (the batch's TARGET_KEYS; fillers count nowhere), from the same forward pass.

    ``traces`` counts how often jax traced (= compiled) it: once per distinct input shape, i.e.
    once per (bucket, batch size), never per batch.
    """

    def __init__(self, model, topk: int, attention: bool = False, loss_config=None):
        self.model, self.topk, self.attention, self.loss_config, self.traces = model, topk, attention, loss_config, 0
        self._jitted = jax.jit(self._forward)

    def _forward(self, variables, image, padding_mask, orig_size, targets):
        from detr_jax.models.attention_maps import SOWN, attention_maps

        self.traces += 1  # Python side effect: runs at trace time only
        if self.attention:
            outputs, sown = self.model.apply(variables, image, padding_mask, train=False, mutable=SOWN)
        else:
            outputs, sown = self.model.apply(variables, image, padding_mask, train=False), None
        detections = postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_size, self.model.classification,
                                 topk=self.topk)
        if sown is not None:
            detections.update(attention_maps(sown, detections["queries"]))
        if has_mask_head(self.model):
            scores, labels = classification_of(self.model.classification).query_classes(outputs["pred_logits"])
            detections.update(query_scores=scores, query_labels=labels, pred_masks=outputs["pred_masks"],
                              pred_masks_hw=outputs["pred_masks_hw"])
        if self.loss_config is not None:
            detections["loss_sums"] = self._loss_sums(outputs, targets)
        return detections

    def _loss_sums(self, outputs, targets):
        """{term: [2]} summed over the batch: each device sums its own images (as in training; left
        to the partitioner, the loss's gathers and scatters compile slower), then a psum."""
        from detr_jax.losses import loss_sums

        def local(outputs, targets):
            sums = loss_sums(outputs, targets, self.loss_config, self.model.classification)
            return {name: jax.lax.psum(jnp.stack(pair), AXIS) for name, pair in sums.items()}

        # check_vma off: the device matcher's while_loops start from constants the mesh axis does not vary
        return jax.shard_map(local, mesh=local_mesh(), in_specs=PartitionSpec(AXIS), out_specs=PartitionSpec(),
                             check_vma=False)(
            outputs, targets)

    def __call__(self, variables, image, padding_mask, orig_size, targets=None):
        if (targets is None) != (self.loss_config is None):
            raise ValueError("targets go with a loss config: pass both (val loss) or neither")
        return self._jitted(variables, image, padding_mask, orig_size, targets)


def predictor(model, topk: int = 0, attention: bool = False, loss_config=None, padding: str = "exact") -> Predictor:
    """The Predictor of a model (Flax modules hash by their fields) and settings, shared by every
    evaluation with them, so that periodic evaluation during training compiles once per shape for
    the whole run. loss_config: config.loss (a ConfigDict) to compute the loss terms too, or None.
    padding: config.model.padding for inference, whatever the model was trained with ("exact": each
    image's outputs are those of the image alone, whatever its bucket and batch; config.eval.padding)."""
    frozen = None if loss_config is None else ml_collections.FrozenConfigDict(loss_config)
    return _predictor(model.clone(padding=padding), topk, attention, frozen)


@functools.lru_cache(maxsize=8)
def _predictor(model, topk: int, attention: bool, loss_config) -> Predictor:
    return Predictor(model, topk, attention, loss_config)


def host_batch_size(batch_size: int, process_count: int, local_device_count: int) -> int:
    """Images per host batch: the global ``batch_size`` split over the hosts (rounded up), then
    rounded up to a multiple of the local devices (the extra slots hold fillers)."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}; expected a positive integer")
    per_host = -(-batch_size // process_count)
    return -(-per_host // local_device_count) * local_device_count


def record_rows(image_ids, example_valid, row_of: dict) -> np.ndarray:
    """Rows of the source's records of a batch's images -> [B] int32, -1 for fillers.

    image_ids [B] and example_valid [B] of a batch; row_of: image id -> row of the source's records.
    Rows (not ids) travel between hosts: they fit int32 whatever the ids.
    """
    missing = [int(i) for i, v in zip(image_ids, example_valid) if v and int(i) not in row_of]
    if missing:
        raise ValueError(f"batch image ids {missing[:5]} are not in the source's records")
    return np.asarray([row_of[int(i)] if v else -1 for i, v in zip(image_ids, example_valid)], np.int32)


def run_batches(predict, variables, batches, mesh: Mesh):
    """Yield (batch, ``predict`` output on the devices) for every batch of ``batches`` (an
    ``eval_batches`` iterator; its targets too when ``predict`` has a loss config), each batch
    sharded over ``mesh``; the calls are dispatched
    asynchronously, so the caller decides when to fetch."""
    data, replicated = NamedSharding(mesh, PartitionSpec(AXIS)), NamedSharding(mesh, PartitionSpec())
    variables = jax.device_put(variables, replicated)
    for batch in batches:
        inputs = jax.device_put((batch["image"], batch["padding_mask"], batch["orig_size"]), data)
        keys = TARGET_KEYS + (MASK_TARGET_KEYS if has_mask_head(predict.model) else ())
        targets = None if predict.loss_config is None else jax.device_put({k: batch[k] for k in keys}, data)
        yield batch, predict(variables, *inputs, targets)


def predict_batches(predict, variables, batches, record_image_ids, mesh: Mesh, masks=None) -> dict:
    """Run ``predict`` (a Predictor) over every batch of ``batches`` (an ``eval_batches`` iterator).

    -> this host's predictions, numpy, one row per batch slot in batch order (n = num_batches x B):
    {"record" [n] int32 (row of the source's records, -1 for fillers), "scores" [n, K] float32,
    "labels" [n, K] int32, "boxes" [n, K, 4] float32 (x0, y0, x1, y1) original pixels}; with a loss
    config also "loss_sums": {term: [num_batches, 2] float32}, one (numerator, denominator) per batch.
    masks: a ``masks.MaskScorer`` for a model with the mask head: each batch's masks go to it as the
    batch arrives (they are not kept).
    """
    row_of = {int(image_id): row for row, image_id in enumerate(record_image_ids)}
    rows, outputs = [], []
    for batch, output in run_batches(predict, variables, batches, mesh):
        rows.append(record_rows(batch["image_id"], batch["example_valid"], row_of))
        if masks is not None:
            output = jax.device_get(output)
            masks.add_batch(rows[-1], output, batch["size"])
            output = {k: v for k, v in output.items() if k not in MASK_OUTPUT_KEYS}
        outputs.append(output)  # fetched below, all at once
    outputs = jax.device_get(outputs)
    predictions = {"record": np.concatenate(rows),
                   **{k: np.concatenate([o[k] for o in outputs]) for k in ("scores", "labels", "boxes")}}
    if predict.loss_config is not None:
        predictions["loss_sums"] = {k: np.stack([o["loss_sums"][k] for o in outputs]) for k in outputs[0]["loss_sums"]}
    return predictions


def gather_hosts(predictions: dict) -> dict:
    """Every host's ``predict_batches`` output concatenated in host order, on every process (all
    hosts have the same number of batches, so the same shapes). The loss sums travel as one array
    [num_batches, terms, 2] (one collective, not one per term)."""
    if jax.process_count() == 1:
        return predictions
    names = list(predictions.get("loss_sums", {}))
    packed = {**predictions, **({"loss_sums": np.stack([predictions["loss_sums"][k] for k in names], 1)}
                                if names else {})}
    gathered = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(packed, tiled=True).items()}
    if names:
        gathered["loss_sums"] = {k: gathered["loss_sums"][:, i] for i, k in enumerate(names)}
    return gathered
