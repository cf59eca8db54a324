"""detr_jax.evaluation.panoptic against the official PostProcessPanoptic / PostProcessSegm
(tests/data/detr_panoptic_r50.npz, made by tests/data/make_panoptic_ref.py), and hand cases of the
official semantics: the stuff merge that the area loop undoes, all small segments dropped at once,
the empty case, the two nearest rules."""
import numpy as np
import pytest

from conftest import DATA
from detr_jax.evaluation import panoptic


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA / "detr_panoptic_r50.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k.startswith(("pp_", "pano/", "segm/"))}


def _image(ref, i):
    """(logits [100, 251], masks [100, 40, 48] float32, processed (h, w), target (h, w)) of crafted image i
    (the float32 masks of the confident queries replace their float16 rows, as in make_panoptic_ref.py)."""
    masks = ref["pp_masks"].astype(np.float32)
    masks[tuple(ref["pp_confident"].T)] = ref["pp_masks_confident"]
    return (ref["pp_logits"][i].astype(np.float32), masks[i],
            tuple(ref["pp_processed_sizes"][i]), tuple(ref["pp_target_sizes"][i]))


@pytest.mark.parametrize("i", [0, 1, 2])
def test_panoptic_matches_official(ref, i):
    logits, masks, processed, target = _image(ref, i)
    keep, _ = panoptic.kept_queries(logits)
    np.testing.assert_array_equal(keep, ref[f"pp_kept/img{i}"])
    ids, segments = panoptic.panoptic_segments(logits, masks, processed, target)
    assert ids.shape == target and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, ref[f"pano/img{i}_ids"])
    for field in ("id", "category_id", "isthing", "area"):
        assert [int(s[field]) for s in segments] == ref[f"pano/img{i}_{field}"].tolist(), field
    png = panoptic.panoptic_png(ids)
    np.testing.assert_array_equal(panoptic.read_panoptic_png(png), ids)


def test_crafted_cases_are_exercised(ref):
    """The reference covers what it was made for: merged stuff, dropped queries, no segment at all."""
    categories = [ref[f"pano/img{i}_category_id"].tolist() for i in range(3)]
    assert categories[0].count(120) == 1 and categories[0].count(17) == 2  # 3 stuff 120 -> 1; things stay
    assert categories[1].count(100) == 1
    assert len(categories[0]) < len(ref["pp_kept/img0"]) and len(categories[1]) < len(ref["pp_kept/img1"]) - 1
    assert len(ref["pp_kept/img2"]) == 0 and categories[2] == [] and not ref["pano/img2_ids"].any()


@pytest.mark.parametrize("i", [0, 1, 2])
def test_instance_masks_match_official(ref, i):
    _, masks, processed, target = _image(ref, i)
    canvas = tuple(ref["pp_processed_sizes"].max(0))
    shape = tuple(ref[f"segm/img{i}_shape"])
    expected = np.unpackbits(ref[f"segm/img{i}_masks"])[:np.prod(shape)].reshape(shape)
    got = panoptic.instance_masks(masks, processed, canvas, target)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def _logits(labels, num_classes=250):
    """[len(labels), num_classes + 1]: query q predicts labels[q] (None: no object) with probability ~1."""
    logits = np.zeros((len(labels), num_classes + 1), np.float32)
    for q, label in enumerate(labels):
        logits[q, num_classes if label is None else label] = 20
    return logits


def test_stuff_merge_is_undone_by_the_area_loop():
    """Two queries of stuff 100 (0, 1) and a thing (2) on 8 x 8 (no resizing). The merge gives query 1's
    columns 3..5 to query 0, but then query 1 has area 0, is dropped, and the re-run assigns without
    merging: those columns go to the thing, which beats query 0 there."""
    masks = np.full((3, 8, 8), -5, np.float32)
    masks[0, :, :3], masks[0, :, 3:] = 5, 0
    masks[1, :, 3:6] = 5
    masks[2, :, 3:] = 1
    masks[2, :, 6:] = 5
    ids, segments = panoptic.panoptic_segments(_logits([100, 100, 3]), masks, (8, 8), (8, 8))
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in segments] == [(0, 100, False, 24),
                                                                                           (1, 3, True, 40)]
    assert (ids[:, :3] == 0).all() and (ids[:, 3:] == 1).all()


def test_small_segments_are_dropped_together():
    """Query 1 wins a 2 x 2 block (area 4) where query 2 is second; query 2 wins 3 pixels of its own.
    Both are dropped in the same pass, so query 2 never takes the block: everything goes to query 0.
    With 2 more pixels, query 2 survives, takes the block after query 1 is dropped, and keeps id 1."""
    masks = np.zeros((3, 6, 6), np.float32)
    masks[1, :2, :2], masks[2, :2, :2] = 9, 5
    masks[2, 5, 3:6] = 5
    ids, segments = panoptic.panoptic_segments(_logits([7, 8, 9]), masks, (6, 6), (6, 6))
    assert [(s["category_id"], s["area"]) for s in segments] == [(7, 36)] and not ids.any()
    masks[2, 4, 4:6] = 5
    ids, segments = panoptic.panoptic_segments(_logits([7, 8, 9]), masks, (6, 6), (6, 6))
    assert [(s["id"], s["category_id"], s["area"]) for s in segments] == [(0, 7, 27), (1, 9, 9)]
    assert (ids[:2, :2] == 1).all()


def test_empty_results():
    """No kept query (no object, or an object below 0.85), or every segment too small: an all-0 map and
    no segment (the official's class 1 for that case never reaches segments_info)."""
    masks = np.random.RandomState(0).standard_normal((3, 4, 5)).astype(np.float32)
    weak = _logits([None, None, 5])
    weak[2, 5] = 1.5  # softmax 4.5 / (4.5 + 250) < 0.85
    ids, segments = panoptic.panoptic_segments(weak, masks, (8, 10), (9, 7))
    assert segments == [] and ids.shape == (9, 7) and not ids.any()
    ids, segments = panoptic.panoptic_segments(_logits([5, None, None]), masks, (8, 10), (2, 2))
    assert segments == [] and not ids.any()  # the one kept query covers 4 pixels


def test_label_beyond_is_thing_raises():
    """The official is_thing_map covers classes 0..200; a kept class 201..249 is a KeyError there."""
    with pytest.raises(IndexError):
        panoptic.panoptic_segments(_logits([230]), np.zeros((1, 4, 4), np.float32), (4, 4), (4, 4))


def test_resize_rules():
    row = np.arange(3, dtype=np.float32)[None]
    np.testing.assert_array_equal(panoptic.resize_nearest_torch(row, (1, 5))[0], [0, 0, 1, 1, 2])  # floor(d * 3/5)
    np.testing.assert_array_equal(panoptic.resize_nearest_pil(row.astype(np.int32), (1, 5))[0],
                                  [0, 0, 1, 2, 2])  # floor((d + 0.5) * 3/5)
    np.testing.assert_array_equal(panoptic.resize_nearest_torch(row, (1, 6))[0], [0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(panoptic.resize_bilinear(np.array([[0, 1]], np.float32), (1, 4))[0],
                               [0, 0.25, 0.75, 1])  # align_corners=False, clamped at the borders
    x = np.random.RandomState(1).standard_normal((2, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(panoptic.resize_bilinear(x, (5, 7)), x)


def test_id_rgb_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, 65536 * 3 + 7]])
    rgb = panoptic.id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb[1, 0].tolist() == [0, 1, 0] and rgb[1, 2].tolist() == [7, 0, 3]
    np.testing.assert_array_equal(panoptic.rgb2id(rgb), ids)
    png, annotation = panoptic.coco_panoptic_annotation(
        ids, [{"id": 0, "category_id": 3, "isthing": True, "area": 1}], 42, "000042.png", category_ids={3: 17})
    np.testing.assert_array_equal(panoptic.read_panoptic_png(png), ids)
    assert annotation == {"image_id": 42, "file_name": "000042.png",
                          "segments_info": [{"id": 0, "category_id": 17, "isthing": True, "area": 1}]}
