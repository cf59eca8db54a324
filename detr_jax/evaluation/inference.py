"""Data-parallel inference: forward + postprocess compiled once per batch shape, each batch sharded
over this host's devices, then every host's predictions gathered.

A host's batch [B, H, W, 3] is split over its D local devices (B a multiple of D, see
``host_batch_size``) with ``jax.jit`` and a 1-D device mesh; the variables are replicated. The
computation uses only local devices, so hosts run independently until ``gather_hosts``.
"""
import functools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from detr_jax.evaluation.postprocess import postprocess

AXIS = "batch"


class Predictor:
    """``predictor(variables, image [B, H, W, 3], padding_mask [B, H, W], orig_size [B, 2])`` ->
    ``postprocess`` output (scores [B, K], labels [B, K], boxes [B, K, 4], queries [B, K]),
    jit-compiled. With ``attention``, also the attention maps of ``visualize.attention.attention_maps``
    (decoder_attention [B, K, h*w], encoder_attention [B, h*w, h*w], feature_mask [B, h, w]); without
    it, the model sows nothing and the program is the plain forward pass.

    ``traces`` counts how often jax traced (= compiled) it: once per distinct input shape, i.e.
    once per (bucket, batch size), never per batch.
    """

    def __init__(self, model, topk: int, attention: bool = False):
        self.model, self.topk, self.attention, self.traces = model, topk, attention, 0
        self._jitted = jax.jit(self._forward)

    def _forward(self, variables, image, padding_mask, orig_size):
        from detr_jax.visualize.attention import SOWN, attention_maps

        self.traces += 1  # Python side effect: runs at trace time only
        if self.attention:
            outputs, sown = self.model.apply(variables, image, padding_mask, train=False, mutable=SOWN)
        else:
            outputs, sown = self.model.apply(variables, image, padding_mask, train=False), None
        detections = postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_size, topk=self.topk)
        return detections if sown is None else {**detections, **attention_maps(sown, detections["queries"])}

    def __call__(self, variables, image, padding_mask, orig_size):
        return self._jitted(variables, image, padding_mask, orig_size)


@functools.lru_cache(maxsize=8)
def predictor(model, topk: int = 0, attention: bool = False) -> Predictor:
    """The Predictor of a model (Flax modules hash by their fields), shared by every evaluation of
    it, so that periodic evaluation during training compiles once per shape for the whole run."""
    return Predictor(model, topk, attention)


def host_batch_size(batch_size: int, process_count: int, local_device_count: int) -> int:
    """Images per host batch: the global ``batch_size`` split over the hosts (rounded up), then
    rounded up to a multiple of the local devices (the extra slots hold fillers)."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}; expected a positive integer")
    per_host = -(-batch_size // process_count)
    return -(-per_host // local_device_count) * local_device_count


def local_mesh() -> Mesh:
    """A 1-D mesh over this host's devices, axis ``AXIS``."""
    return Mesh(np.asarray(jax.local_devices()), (AXIS,))


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
    ``eval_batches`` iterator), each batch sharded over ``mesh``; the calls are dispatched
    asynchronously, so the caller decides when to fetch."""
    data, replicated = NamedSharding(mesh, PartitionSpec(AXIS)), NamedSharding(mesh, PartitionSpec())
    variables = jax.device_put(variables, replicated)
    for batch in batches:
        inputs = jax.device_put((batch["image"], batch["padding_mask"], batch["orig_size"]), data)
        yield batch, predict(variables, *inputs)


def predict_batches(predict, variables, batches, record_image_ids, mesh: Mesh) -> dict:
    """Run ``predict`` (a Predictor) over every batch of ``batches`` (an ``eval_batches`` iterator).

    -> this host's predictions, numpy, one row per batch slot in batch order (n = num_batches x B):
    {"record" [n] int32 (row of the source's records, -1 for fillers), "scores" [n, K] float32,
    "labels" [n, K] int32, "boxes" [n, K, 4] float32 (x0, y0, x1, y1) original pixels}.
    """
    row_of = {int(image_id): row for row, image_id in enumerate(record_image_ids)}
    rows, outputs = [], []
    for batch, output in run_batches(predict, variables, batches, mesh):
        rows.append(record_rows(batch["image_id"], batch["example_valid"], row_of))
        outputs.append(output)  # fetched below, all at once
    outputs = jax.device_get(outputs)
    return {"record": np.concatenate(rows),
            **{k: np.concatenate([o[k] for o in outputs]) for k in ("scores", "labels", "boxes")}}


def gather_hosts(predictions: dict) -> dict:
    """Every host's ``predict_batches`` output concatenated in host order, on every process (all
    hosts have the same number of batches, so the same shapes)."""
    if jax.process_count() == 1:
        return predictions
    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(predictions, tiled=True).items()}
