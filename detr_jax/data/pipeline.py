"""Batches for training and evaluation: plan in numpy, then decode, augment, pad and group in tf.data.

An epoch is planned before any image is read: the image order (``Source.train_order``), each
image's transform (a stateless function of seed, epoch and image id), its output size and bucket,
and the batch it belongs to. tf.data then reads the images, decodes and augments them in parallel
(order kept) and gathers each batch by its number; ``Batches`` hands them out in that order.

One global batch schedule. Train batches are planned for the whole job, not per host: the epoch's
order is a function of (seed, epoch) over the whole split; global batch k groups ``batch_size``
images of one bucket (a bucket's images fill batches in arrival order, batches numbered by the
arrival of their last image); host p of P takes ranks [p B / P, (p + 1) B / P) of each global batch,
in arrival order. So the content of global step k (images, their bucket, their augmentation draws)
depends on (seed, k) and the dataset only: every host feeds the same shape to every step, and a run
resumed on another number of hosts or devices continues the same data order. Random-access sources
read only their own images; a sequential source (tfds) reads every record of the split (the bytes,
not decoding the others' images), since a global batch may hold any image of the split.

Batch (dict of numpy arrays, B = per-host batch size, M = max_boxes, (H, W) the batch's bucket):
  image [B, H, W, 3] float32: RGB, ImageNet-normalised, image top-left, zeros on padding.
  padding_mask [B, H, W] bool: True on padding.
  boxes [B, M, 4] float32: (cx, cy, w, h) normalised by ``size``, zeros where not box_valid.
  labels [B, M] int32; box_valid [B, M] bool.
  image_id [B] int64; orig_size [B, 2] int32 (h, w as annotated); size [B, 2] int32 (h, w after
    resize: the unpadded region).
  example_valid [B] bool: False for fillers (eval: padding of a host's last batches; train and
    eval: an image that could not be read, counted in the report). A filler is all padding,
    no boxes, image_id -1, sizes 0; training and evaluation leave it out of every loss term.
With ``config.data.masks`` (a panoptic source), also:
  segments [B, H, W] int32: the panoptic segment id of each pixel (the PNG's R + 256 G + 256^2 B)
    after the image's flip, crop and resize, nearest: output pixel (i, j) takes the id of the
    source pixel under its centre (``transforms.resample_segments``); 0 on void and padding (and
    fillers). A pixel keeps its id where its segment is no target (left out by a crop, max_boxes or
    an unknown category): it then matches no slot.
  segment_ids [B, M] int32: the id in ``segments`` of each target slot, 0 where not box_valid; the
    binary mask of slot m is ``segments == segment_ids[..., m, None, None]``.
  A panoptic PNG that cannot be read, or lacks a target's segment id, makes its image a filler
  (counted as unreadable_image).

Train: ``steps_per_epoch`` global batches per epoch, all of one bucket each; the images of partly
filled bucket batches at an epoch's end wait for the next epoch's shuffle (at most
buckets x (B - 1) + B per epoch, counted as 'epoch_leftover' when the epoch is planned). Resuming at
step s plans only s's epoch (no image is read before it): random-access sources start at once; a
tfds source reads (without decoding) that epoch's records up to the resume point.

Eval: every image of the split exactly once over all hosts; each host gets the same number of
batches (partial batches and missing batches filled with fillers). Evaluation is compiled per host
(``jax.jit`` over the local devices), so hosts may feed different shapes to the same eval batch.
"""
import dataclasses
import itertools

import numpy as np
import tensorflow as tf

from detr_jax.data.buckets import assign_buckets, check_buckets, default_buckets
from detr_jax.data.registry import load_dataset
from detr_jax.data.source import Source, resolve_host
from detr_jax.data.transforms import (EXIF_APPLIED, EXIF_BY_SETTING, EXIF_IGNORED, EXIF_NONE, NUM_DRAWS, Params,
                                      decode_rgb, decode_segment_ids, eval_params, exif_orient, exif_orientation,
                                      normalize_and_pad, pad_segments, resample_image, resample_segments, safely,
                                      train_params, transform_boxes, uniforms)
from detr_jax.errors import ConfigError

CHUNK = 1024  # plan rows handed to tf.data at a time (a tfds source hands its shuffle window)


def bucket_list(data_config) -> np.ndarray:
    """[K, 2] int64 canvas sizes: data_config.buckets, or ``default_buckets`` when empty."""
    buckets = data_config.buckets if data_config.buckets else default_buckets(data_config)
    return check_buckets(buckets, data_config.size_divisor)


def steps_per_epoch(num_images: int, batch_size: int, num_buckets: int) -> int:
    """Full global batches of batch_size any epoch of num_images makes: each bucket may leave up to
    B - 1 images over, so the full batches number at least ceil((N - buckets * (B - 1)) / B)."""
    steps = -(-(num_images - num_buckets * (batch_size - 1)) // batch_size)
    if steps < 1:
        raise ConfigError(f"{num_images} training images cannot fill one global batch of {batch_size} per epoch "
                         f"in {num_buckets} buckets (up to {batch_size - 1} images of each may be left over); "
                         "use a smaller batch or fewer buckets (data_config.buckets)")
    return steps


def train_host_batch(batch_size: int, process_count: int) -> int:
    """Images per host of a global batch of batch_size (a clear error unless it divides evenly)."""
    if batch_size % process_count:
        raise ConfigError(f"the global batch of {batch_size} images cannot be split evenly over {process_count} "
                         "hosts; use a multiple of the number of hosts")
    return batch_size // process_count


def group_into_batches(bucket, batch_size: int):
    """Images in arrival order with bucket [n] -> (batch [n] int64, num_full).

    Each bucket's images fill batches of batch_size in arrival order. Full batches are numbered
    0..num_full-1 by the arrival of their last image; partly filled ones follow, by bucket.
    """
    bucket = np.asarray(bucket, np.int64)
    n = len(bucket)
    if n == 0:
        return np.zeros(0, np.int64), 0
    by_bucket = np.argsort(bucket, kind="stable")
    sorted_bucket = bucket[by_bucket]
    first = np.searchsorted(sorted_bucket, sorted_bucket)
    rank = np.arange(n) - first
    count = np.bincount(bucket)[sorted_bucket]
    full = rank // batch_size < count // batch_size
    last = by_bucket[np.minimum(first + (rank // batch_size + 1) * batch_size - 1, n - 1)]
    order_key = np.where(full, last, n + sorted_bucket)
    numbers, batch_sorted = np.unique(order_key, return_inverse=True)
    batch = np.empty(n, np.int64)
    batch[by_bucket] = batch_sorted
    return batch, int((numbers < n).sum())


def rank_in_batch(batch) -> np.ndarray:
    """batch [n] (batch number of each image, arrival order) -> [n] int64: the image's position among
    its batch's images in arrival order (0 for the first to arrive)."""
    batch = np.asarray(batch, np.int64)
    by_batch = np.argsort(batch, kind="stable")
    sorted_batch = batch[by_batch]
    rank = np.empty(len(batch), np.int64)
    rank[by_batch] = np.arange(len(batch)) - np.searchsorted(sorted_batch, sorted_batch)
    return rank


def _row_spec(max_boxes: int, masks: bool) -> dict:
    """One planned image: where to read it (masks: and its panoptic PNG), how to transform it, its
    targets and its batch."""
    panoptic = {"panoptic_path": tf.TensorSpec([], tf.string), "panoptic_encoded": tf.TensorSpec([], tf.string),
                "segment_ids": tf.TensorSpec([max_boxes], tf.int32)}
    return {
        "index": tf.TensorSpec([], tf.int64),  # row of source.records, -1 for a filler
        "rank": tf.TensorSpec([], tf.int64),  # position in the stream
        "key": tf.TensorSpec([], tf.int64),  # batch number, -1: not read in this run
        "image_id": tf.TensorSpec([], tf.int64),
        "path": tf.TensorSpec([], tf.string),
        "encoded": tf.TensorSpec([], tf.string),
        "orig_size": tf.TensorSpec([2], tf.int32),
        "flip": tf.TensorSpec([], tf.bool),
        "region": tf.TensorSpec([4], tf.float32),
        "size": tf.TensorSpec([2], tf.int32),
        "canvas": tf.TensorSpec([2], tf.int32),
        "boxes": tf.TensorSpec([max_boxes, 4], tf.float32),
        "labels": tf.TensorSpec([max_boxes], tf.int32),
        "box_valid": tf.TensorSpec([max_boxes], tf.bool),
        **(panoptic if masks else {}),
    }


def _filler_rows(keys, canvas, max_boxes: int, masks: bool) -> dict:
    """Rows of fillers: batch numbers keys [n], canvases [n, 2]."""
    n = len(keys)
    rows = {name: np.full((n, *spec.shape), b"", object) if spec.dtype == tf.string
            else np.zeros((n, *spec.shape), spec.dtype.as_numpy_dtype)
            for name, spec in _row_spec(max_boxes, masks).items()}
    rows.update(index=np.full(n, -1, np.int64), key=np.asarray(keys, np.int64), image_id=np.full(n, -1, np.int64),
                canvas=np.asarray(canvas, np.int32))
    return rows


@dataclasses.dataclass
class PassPlan:
    """One pass (a train epoch or an eval pass) as one host sees it, in stream order.

    order [n]: rows of source.records; key [n]: this host's batch number (-1: not read by this
    host); params: transforms;
    size [n, 2]: output sizes (fitted to the canvas); canvas [n, 2]: the bucket of each image.
    """
    order: np.ndarray
    key: np.ndarray
    params: Params
    size: np.ndarray
    canvas: np.ndarray

    def rows(self, positions, source: Source, max_boxes: int, masks: bool) -> dict:
        """The rows (see ``_row_spec``) of stream positions [k], targets transformed and padded to M."""
        idx = self.order[positions]
        params = self.params.take(positions)
        splits = source.targets.splits
        counts = splits[idx + 1] - splits[idx]
        flat = np.repeat(splits[idx] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        owner = np.repeat(np.arange(len(idx)), counts)
        boxes, keep = transform_boxes(source.targets.boxes[flat], owner, source.records.orig_size[idx], params)
        owner, boxes, flat = owner[keep], boxes[keep], flat[keep]
        slot = np.arange(len(owner)) - np.searchsorted(owner, owner)
        out = _filler_rows(self.key[positions], self.canvas[positions], max_boxes, masks)  # then filled in
        out["boxes"][owner, slot] = boxes
        out["labels"][owner, slot] = source.targets.labels[flat]
        out["box_valid"][owner, slot] = True
        if masks:
            out["segment_ids"][owner, slot] = source.targets.segment_ids[flat]
            out["panoptic_path"] = source.records.panoptic_path[idx]
        out.update(index=idx.astype(np.int64), rank=np.asarray(positions, np.int64),
                   image_id=source.records.image_id[idx], path=source.records.path[idx],
                   orig_size=source.records.orig_size[idx].astype(np.int32), flip=params.flip,
                   region=params.region.astype(np.float32), size=self.size[positions].astype(np.int32))
        return out


def _fit(source: Source, order, params: Params, buckets, what: str):
    """Buckets of the planned images -> (bucket [n], fitted sizes [n, 2]); shrunk ones reported."""
    bucket, size, shrunk = assign_buckets(params.size, buckets)
    names = [f"{source.records.file_name[i]} {what}: {tuple(s.tolist())}"
             for i, s in zip(order[shrunk][:5], params.size[shrunk])]
    source.report.add("shrunk_to_bucket", int(shrunk.sum()), names)
    return bucket, size


def plan_train_epoch(source: Source, data_config, buckets, *, seed: int, epoch: int, batch_size: int,
                     steps: int, start_step: int, process_index: int, process_count: int) -> PassPlan:
    """One train epoch of the global schedule, as host process_index sees it.

    batch_size: global. The global batches of the epoch are those of the whole split's order (see
    the module docstring); this host's rows of global batch k have key k (a global step, from
    start_step), the others' rows key -1.
    """
    order = source.train_order(seed, epoch)
    draws = uniforms(seed, epoch, source.records.image_id[order], NUM_DRAWS)
    params = train_params(draws, source.records.orig_size[order], data_config)
    bucket, size = _fit(source, order, params, buckets, f"epoch {epoch}")
    batch, _ = group_into_batches(bucket, batch_size)
    leftover = batch >= steps
    source.report.add("epoch_leftover", int(leftover.sum()), [f"epoch {epoch}: {leftover.sum()} images"])
    host = rank_in_batch(batch) // train_host_batch(batch_size, process_count)
    key = epoch * steps + batch
    mine = ~leftover & (host == process_index) & (key >= start_step)
    return PassPlan(order=order, key=np.where(mine, key, -1), params=params, size=size, canvas=buckets[bucket])


def _eval_batches_of(source: Source, data_config, buckets, process_index: int, batch_size: int) -> int:
    """How many batches host process_index needs for its eval images."""
    order = source.eval_order(process_index)
    bucket, _, _ = assign_buckets(eval_params(source.records.orig_size[order], data_config).size, buckets)
    return int((-(-np.bincount(bucket) // batch_size)).sum())


def plan_eval(source: Source, data_config, buckets, batch_size: int):
    """-> (PassPlan of this host's eval images, filler rows, number of batches (equal on all hosts))."""
    num_batches = max(_eval_batches_of(source, data_config, buckets, q, batch_size)
                      for q in range(source.process_count))
    order = source.eval_order(source.process_index)
    params = eval_params(source.records.orig_size[order], data_config)
    bucket, size = _fit(source, order, params, buckets, "eval")
    batch, _ = group_into_batches(bucket, batch_size)
    members = np.bincount(batch, minlength=num_batches)
    batch_bucket = np.full(num_batches, np.argmin(buckets[:, 0] * buckets[:, 1]))
    batch_bucket[batch] = bucket
    filler_keys = np.repeat(np.arange(num_batches), batch_size - members)
    fillers = _filler_rows(filler_keys, buckets[batch_bucket[filler_keys]], data_config.max_boxes, data_config.masks)
    return PassPlan(order=order, key=batch, params=params, size=size, canvas=buckets[bucket]), fillers, num_batches


def read_order(plan: PassPlan, sequential: bool) -> np.ndarray:
    """Stream positions of a plan in the order the host reads them: a sequential source reads every
    row in canonical (file) order; a random-access one only its own rows, batch by batch."""
    if sequential:
        return np.argsort(plan.order, kind="stable")
    mine = np.flatnonzero(plan.key >= 0)
    return mine[np.argsort(plan.key[mine], kind="stable")]


def _plan_chunks(plans, source: Source, max_boxes: int, masks: bool, chunk: int):
    """Rows of each plan in the order the source reads them (``read_order``), in chunks."""
    for plan in plans:
        read = read_order(plan, source.sequential)
        for start in range(0, len(read), chunk):
            yield plan.rows(read[start:start + chunk], source, max_boxes, masks)


def _read(path, encoded):
    """The bytes of file ``path``, or ``encoded`` where path is '' (a streamed record)."""
    return tf.cond(tf.strings.length(path) > 0, lambda: tf.io.read_file(path), lambda: encoded)


def _segment_ids_of(row):
    """A mask row's panoptic PNG -> ids [h, w] int32; raises (making the row a filler) when a valid
    target's segment id is not in it."""
    ids = decode_segment_ids(_read(row["panoptic_path"], row["panoptic_encoded"]))
    found = tf.reduce_any(row["segment_ids"][:, None] == tf.unique(tf.reshape(ids, [-1])).y[None, :], 1)
    check = tf.debugging.assert_equal(found | ~row["box_valid"], True,
                                      message="a target's segment id is not in its panoptic PNG")
    with tf.control_dependencies([check]):
        return tf.identity(ids)


def _decoder(exif_policy: str):
    """The tf.data function decoding a row's image, turned into its annotation's frame (``exif_orient``),
    and, for a mask row (with 'segment_ids'), its panoptic PNG into 'ids'."""
    def decode(row):
        data = _read(row["path"], row["encoded"])
        pixels, exif = exif_orient(decode_rgb(data), exif_orientation(data), row["orig_size"], exif_policy == "apply")
        ids = {"ids": _segment_ids_of(row)} if "segment_ids" in row else {}
        return {**row, "pixels": pixels, "decoded": tf.constant(True), "exif": exif, **ids}
    return decode


def _not_decoded(row):
    ids = {"ids": tf.zeros([1, 1], tf.int32)} if "segment_ids" in row else {}
    return {**row, "pixels": tf.zeros([1, 1, 3], tf.uint8), "decoded": tf.constant(False),
            "exif": tf.constant(EXIF_NONE, tf.int32), **ids}


def _segments(row):
    """A decoded mask row -> segments [H, W] int32 and segment_ids [M] int32 (zeros for a filler)."""
    ok, canvas = row["decoded"], row["canvas"]
    segments = tf.cond(
        ok, lambda: pad_segments(resample_segments(row["ids"], row["orig_size"], row["flip"], row["region"],
                                                   row["size"]), canvas),
        lambda: tf.zeros(canvas, tf.int32))
    return {"segments": segments, "segment_ids": tf.where(ok, row["segment_ids"], tf.zeros_like(row["segment_ids"]))}


def _example(row):
    """A decoded row -> one example of the batch format (a filler where the image was not decoded)."""
    ok, canvas = row["decoded"], row["canvas"]
    image, mask = tf.cond(
        ok,
        lambda: normalize_and_pad(resample_image(row["pixels"], row["orig_size"], row["flip"], row["region"],
                                                 row["size"]), canvas),
        lambda: (tf.zeros(tf.concat([canvas, [3]], 0)), tf.ones(canvas, tf.bool)))
    if_ok = lambda x: tf.where(ok, x, tf.zeros_like(x))
    return {
        "image": image, "padding_mask": mask, "boxes": if_ok(row["boxes"]), "labels": if_ok(row["labels"]),
        "box_valid": row["box_valid"] & ok, "image_id": tf.where(ok, row["image_id"], tf.constant(-1, tf.int64)),
        "orig_size": if_ok(row["orig_size"]), "size": if_ok(row["size"]), "example_valid": ok,
        "_key": row["key"], "_index": row["index"], "_failed": ~ok & (row["index"] >= 0),
        "_size_mismatch": ok & tf.reduce_any(tf.shape(row["pixels"])[:2] != row["orig_size"]), "_exif": row["exif"],
        **(_segments(row) if "segment_ids" in row else {}),
    }


def _batches_dataset(source: Source, data_config, plans, *, train: bool, batch_size: int, chunk: int,
                     fillers=None) -> tf.data.Dataset:
    spec = _row_spec(data_config.max_boxes, data_config.masks)
    rows = tf.data.Dataset.from_generator(
        lambda: _plan_chunks(plans(), source, data_config.max_boxes, data_config.masks, chunk),
        output_signature={k: tf.TensorSpec([None, *s.shape], s.dtype) for k, s in spec.items()})
    rows = source.attach_images(rows, train, chunk)
    if fillers is not None:
        rows = rows.concatenate(tf.data.Dataset.from_tensor_slices(fillers))
    parallel = tf.data.AUTOTUNE if data_config.num_parallel_calls == -1 else data_config.num_parallel_calls
    examples = (rows.filter(lambda r: r["key"] >= 0)
                .interleave(safely(_decoder(data_config.exif), _not_decoded), num_parallel_calls=parallel,
                            deterministic=True)
                .map(_example, num_parallel_calls=parallel, deterministic=True))
    batches = examples.group_by_window(key_func=lambda e: e["_key"], window_size=batch_size,
                                       reduce_func=lambda _, window: window.batch(batch_size))
    return batches.prefetch(data_config.prefetch)


class Batches:
    """Iterator of batch dicts (see the module docstring) in batch-number order, with what the caller
    needs to know.

    info: DatasetInfo; report: what was skipped or fixed (shared with the source); buckets [K, 2];
    num_batches: batches in this iterator (eval) or per epoch (train: ``steps_per_epoch``).
    A sequential source may complete a host's share of batch k + 1 before that of batch k: such
    batches wait here (at most one per bucket) until their turn.
    """

    def __init__(self, dataset: tf.data.Dataset, source: Source, buckets, num_batches: int, first_key: int):
        self.source, self.info, self.report = source, source.info, source.report
        self.buckets, self.num_batches = buckets, num_batches
        self._batches = dataset.as_numpy_iterator()
        self._next_key, self._waiting = first_key, {}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while self._next_key not in self._waiting:
            batch = next(self._batches)
            self._waiting[int(batch["_key"][0])] = batch
        batch = self._waiting.pop(self._next_key)
        self._next_key += 1
        del batch["_key"]
        index, failed, mismatch = batch.pop("_index"), batch.pop("_failed"), batch.pop("_size_mismatch")
        exif = batch.pop("_exif")
        names = self.source.records.file_name
        for kind, cases in (("unreadable_image", failed), ("size_mismatch", mismatch),
                            ("exif_applied", exif == EXIF_APPLIED), ("exif_ignored", exif == EXIF_IGNORED),
                            ("exif_by_setting", exif == EXIF_BY_SETTING)):
            self.report.add(kind, int(cases.sum()), [str(names[i]) for i in index[cases]])
        return batch


def _source(data_config, split, source, process_index, process_count) -> Source:
    if source is None:
        return load_dataset(data_config, split, process_index=process_index, process_count=process_count)
    if (source.split, source.process_index, source.process_count) != (split, process_index, process_count) \
            or source.data_config != data_config:
        raise ValueError(f"the given source was loaded for split {source.split!r}, host {source.process_index} of "
                         f"{source.process_count} with another data config; expected split {split!r}, host "
                         f"{process_index} of {process_count} and this data config")
    return source


def train_batches(data_config, batch_size: int, *, seed: int, start_step: int = 0, process_index=None,
                  process_count=None, source: Source | None = None) -> Batches:
    """Endless train batches of this host from global step ``start_step`` on.

    batch_size: the global batch; each host gets batch_size / process_count images of every global
    batch (see the module docstring). The batches from step s are the same (images, augmentation,
    order) whether the iterator starts at 0 or at s, and whatever the number of hosts.
    ``source``: a ``load_dataset(data_config, 'train')`` result to reuse (default: loaded here).
    ``.num_batches`` is the steps per epoch.
    """
    process_index, process_count = resolve_host(process_index, process_count)
    source = _source(data_config, "train", source, process_index, process_count)
    buckets = bucket_list(data_config)
    host_batch = train_host_batch(batch_size, process_count)
    steps = steps_per_epoch(source.info.num_images, batch_size, len(buckets))
    plans = lambda: (plan_train_epoch(source, data_config, buckets, seed=seed, epoch=epoch, batch_size=batch_size,
                                      steps=steps, start_step=start_step, process_index=process_index,
                                      process_count=process_count)
                     for epoch in itertools.count(start_step // steps))
    chunk = data_config.shuffle_window if source.sequential else CHUNK
    dataset = _batches_dataset(source, data_config, plans, train=True, batch_size=host_batch, chunk=chunk)
    return Batches(dataset, source, buckets, steps, first_key=start_step)


def eval_batches(data_config, batch_size: int, *, process_index=None, process_count=None,
                 source: Source | None = None) -> Batches:
    """One pass over the val split: every image exactly once over all hosts, ``.num_batches`` batches
    on every host (fillers have example_valid False; evaluate only images with example_valid True,
    restricting COCOeval's imgIds to them, since unreadable images are fillers too)."""
    process_index, process_count = resolve_host(process_index, process_count)
    source = _source(data_config, "val", source, process_index, process_count)
    buckets = bucket_list(data_config)
    plan, fillers, num_batches = plan_eval(source, data_config, buckets, batch_size)
    dataset = _batches_dataset(source, data_config, lambda: [plan], train=False, batch_size=batch_size,
                               chunk=CHUNK, fillers=fillers)
    return Batches(dataset, source, buckets, num_batches, first_key=0)
