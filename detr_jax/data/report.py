"""What the input pipeline skipped or fixed, counted by kind, with the first few cases named."""
import collections
import threading

from absl import logging

# kind -> what happened (the summary's wording)
KINDS = {
    "missing_image": "image file not found: image left out",
    "unreadable_image": "image (or, with masks, its panoptic PNG; or a target's segment id is not in that PNG) "
                        "could not be read or decoded: replaced by a filler (example_valid False)",
    "size_mismatch": "decoded image size differs from the annotation: resampled to the annotated frame",
    "unknown_category": "annotation with a category id not in 'categories': annotation left out",
    "degenerate_box": "box with width or height <= 0 (or not finite): annotation left out of the targets and "
                      "the evaluation ground truth",
    "clipped_box": "box reaching outside the image: clipped to the image",
    "outside_box": "box entirely outside the image: annotation left out of the targets and the evaluation "
                   "ground truth",
    "crowd_excluded": "iscrowd annotation: left out of the targets (kept in the ground truth)",
    "crowd_kept": "iscrowd panoptic segment: kept as a target, as official DETR panoptic does (and kept crowd in "
                  "the ground truth)",
    "over_max_boxes": "more objects than max_boxes: the smallest boxes left out of the targets",
    "exif_applied": "EXIF orientation tag, annotated in the displayed frame: image turned as the tag says",
    "exif_ignored": "EXIF orientation tag, annotated in the stored frame (as COCO): tag ignored",
    "exif_by_setting": "EXIF orientation tag the annotated size cannot confirm (square image, a flip, or neither "
                       "size): config.data.exif followed",
    "empty_image": "image without objects (after the repairs above): kept, it teaches 'no object'",
    "shrunk_to_bucket": "resized image larger than every bucket: scaled down to fit one",
    "epoch_leftover": "train images in partly filled bucket batches: not in that epoch (reshuffled next epoch)",
}
# normal with COCO: logged at info level, not as warnings
EXPECTED = ("crowd_excluded", "crowd_kept", "epoch_leftover", "exif_ignored", "empty_image")
NAMED = 5  # cases named in the log and kept in ``examples``, per kind


class Report:
    """Counters of everything skipped or fixed; thread-safe (tf.data calls in from its threads).

    ``counts[kind]`` is a number of occurrences (an image unreadable in three epochs counts three);
    ``examples[kind]`` names the first few (file and annotation id). Each named case is logged, as a
    warning unless its kind is one of ``EXPECTED``.
    """

    def __init__(self, name: str):
        self.name = name
        self.counts = collections.Counter()
        self.examples = collections.defaultdict(list)
        self._lock = threading.Lock()

    def add(self, kind: str, count: int = 1, cases=()):
        """Record ``count`` occurrences of ``kind``; ``cases``: descriptions of (some of) them."""
        if kind not in KINDS:
            raise KeyError(f"unknown report kind {kind!r}; expected one of {', '.join(KINDS)}")
        if count <= 0:
            return
        with self._lock:
            self.counts[kind] += int(count)
            fresh = [c for c in cases if c not in self.examples[kind]][:NAMED - len(self.examples[kind])]
            self.examples[kind].extend(fresh)
        log = logging.info if kind in EXPECTED else logging.warning
        for case in fresh:
            log("%s: %s (%s)", self.name, KINDS[kind], case)

    def summary(self) -> str:
        """One line per kind seen, e.g. 'degenerate_box: 3 (box with width ...; e.g. a.jpg ann 7)'."""
        with self._lock:
            lines = [f"{kind}: {self.counts[kind]} ({KINDS[kind]}"
                     + (f"; e.g. {'; '.join(self.examples[kind])})" if self.examples[kind] else ")")
                     for kind in KINDS if self.counts[kind]]
        return f"{self.name}: " + ("nothing skipped or fixed" if not lines else "\n  " + "\n  ".join(lines))
