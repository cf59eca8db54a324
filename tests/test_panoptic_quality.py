"""Panoptic quality against hand-computed numbers: matching at IoU > 0.5, VOID and crowd handling,
Things / Stuff averages, per-class numbers, accumulation, errors, PNG + json folders."""
import json

import numpy as np
import pytest

from detr_jax.errors import DataError
from detr_jax.evaluation.panoptic_quality import (
    accumulate, empty_stats, evaluate_folders, format_table, id2rgb, image_stats, read_id_map, rgb2id,
    summarize, write_id_map)

PERSON, CAR, SKY, ROAD = 1, 2, 3, 4
CATEGORIES = [{"id": PERSON, "name": "person", "isthing": 1}, {"id": CAR, "name": "car", "isthing": 1},
              {"id": SKY, "name": "sky", "isthing": 0}, {"id": ROAD, "name": "road", "isthing": 0}]


def seg(seg_id, category_id, iscrowd=0):
    return {"id": seg_id, "category_id": category_id, "iscrowd": iscrowd}


def row(*runs):
    """A [1, W] id map from (id, length) runs: row((1, 3), (0, 2)) -> [[1, 1, 1, 0, 0]]."""
    return np.array([[i for i, n in runs for _ in range(n)]])


def evaluate(gt_map, gt_segments, pred_map, pred_segments):
    stats = accumulate(empty_stats(CATEGORIES), gt_map, gt_segments, pred_map, pred_segments, CATEGORIES)
    return summarize(stats, CATEGORIES)


def counts(results, category_id):
    c = results["per_class"][category_id]
    return c["tp"], c["fp"], c["fn"]


def test_perfect_prediction():
    gt = np.array([[1, 1, 2, 2]] * 4)
    pred = np.where(gt == 1, 7, 9)  # other ids, same segments
    results = evaluate(gt, [seg(1, PERSON), seg(2, SKY)], pred, [seg(7, PERSON), seg(9, SKY)])
    for group, n in (("All", 2), ("Things", 1), ("Stuff", 1)):
        assert results[group] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}


def test_missed_segment_is_a_false_negative():
    # 2 people, 1 predicted exactly: TP 1 (IoU 1), FN 1 -> RQ = 1 / (1 + 0.5) = 2/3, SQ = 1, PQ = 2/3
    gt = row((1, 5), (2, 5))
    pred = row((8, 5), (0, 5))
    results = evaluate(gt, [seg(1, PERSON), seg(2, PERSON)], pred, [seg(8, PERSON)])
    assert counts(results, PERSON) == (1, 0, 1)
    assert results["All"]["rq"] == pytest.approx(2 / 3)
    assert results["All"]["sq"] == pytest.approx(1.0)
    assert results["All"]["pq"] == pytest.approx(2 / 3)
    assert results["All"]["n"] == 1


def test_false_positive():
    # all 16 pixels sky; predicted sky on 12 (IoU 12/16 = 0.75) and a car on the other 4 (FP)
    # sky: PQ = 0.75 / 1 = 0.75, SQ 0.75, RQ 1; car: TP 0, FP 1 -> PQ = SQ = RQ = 0
    # All over 2 categories: PQ = SQ = 0.375, RQ = 0.5
    gt = np.full((4, 4), 5)
    pred = np.full((4, 4), 1)
    pred[3] = 2
    results = evaluate(gt, [seg(5, SKY)], pred, [seg(1, SKY), seg(2, CAR)])
    assert counts(results, SKY) == (1, 0, 0) and counts(results, CAR) == (0, 1, 0)
    assert results["per_class"][SKY]["sq"] == pytest.approx(0.75)
    assert results["All"]["pq"] == pytest.approx(0.375)
    assert results["All"]["sq"] == pytest.approx(0.375)
    assert results["All"]["rq"] == pytest.approx(0.5)
    assert results["All"]["n"] == 2


def test_iou_of_exactly_half_does_not_match():
    # gt person 20 px; prediction on 10 of them, nothing else: IoU = 10 / 20 = 0.5, not > 0.5
    # -> the prediction is FP (none of it on VOID) and the gt FN: PQ = RQ = 0
    gt = np.full((2, 10), 1)
    pred = np.zeros((2, 10), int)
    pred[0] = 3
    results = evaluate(gt, [seg(1, PERSON)], pred, [seg(3, PERSON)])
    assert counts(results, PERSON) == (0, 1, 1)
    assert results["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}


def test_iou_just_above_half_matches():
    # one more pixel: IoU = 11 / 20 = 0.55 -> TP with SQ = 0.55, RQ = 1, PQ = 0.55
    gt = np.full((2, 10), 1)
    pred = np.zeros((2, 10), int)
    pred[0] = 3
    pred[1, 0] = 3
    results = evaluate(gt, [seg(1, PERSON)], pred, [seg(3, PERSON)])
    assert counts(results, PERSON) == (1, 0, 0)
    assert results["All"]["sq"] == pytest.approx(0.55)
    assert results["All"]["rq"] == 1.0
    assert results["All"]["pq"] == pytest.approx(0.55)


def test_predicted_pixels_on_void_leave_the_union():
    # gt person on 6 px, 4 px VOID; prediction on the 6 + 2 VOID px:
    # IoU = 6 / (8 + 6 - 6 - 2) = 1.0 (it would be 6 / 8 = 0.75 with the VOID pixels counted)
    gt = row((1, 6), (0, 4))
    pred = row((4, 8), (0, 2))
    results = evaluate(gt, [seg(1, PERSON)], pred, [seg(4, PERSON)])
    assert counts(results, PERSON) == (1, 0, 0)
    assert results["All"]["sq"] == 1.0


def test_prediction_mostly_on_void_is_ignored_and_half_on_void_is_a_false_positive():
    # gt: sky 4 px, then 6 px VOID. pred: sky on 3 px (IoU 3/4, TP) and a car on 1 sky px + 6 VOID px:
    # 6/7 of the car on VOID > 0.5 -> ignored, no FP
    gt = row((1, 4), (0, 6))
    results = evaluate(gt, [seg(1, SKY)], row((5, 3), (6, 7)), [seg(5, SKY), seg(6, CAR)])
    assert counts(results, SKY) == (1, 0, 0) and counts(results, CAR) == (0, 0, 0)
    assert results["All"]["n"] == 1
    assert results["All"]["pq"] == pytest.approx(0.75)
    # the car on 1 sky px + 1 VOID px: 1/2 on VOID is not > 0.5 -> FP
    results = evaluate(gt, [seg(1, SKY)], row((5, 3), (6, 2), (0, 5)), [seg(5, SKY), seg(6, CAR)])
    assert counts(results, CAR) == (0, 1, 0)
    assert results["All"]["n"] == 2


def test_crowd_region_is_neither_fn_nor_fp_of_its_category():
    # gt: person crowd on 4 px, sky on 6 px. pred: a person on 3 crowd px + 1 sky px (3/4 on the
    # crowd of its category -> ignored), sky on 5 px (IoU 5/6, TP). Person: no TP, FP, FN -> absent.
    gt = row((5, 4), (6, 6))
    gt_segments = [seg(5, PERSON, iscrowd=1), seg(6, SKY)]
    results = evaluate(gt, gt_segments, row((1, 3), (0, 1), (1, 1), (2, 5)), [seg(1, PERSON), seg(2, SKY)])
    assert counts(results, PERSON) == (0, 0, 0)
    assert counts(results, SKY) == (1, 0, 0)
    assert results["All"]["n"] == 1
    assert results["All"]["pq"] == pytest.approx(5 / 6)
    # the same pixels predicted as a car: the crowd is a person's, so the car is FP
    results = evaluate(gt, gt_segments, row((1, 3), (0, 1), (1, 1), (2, 5)), [seg(1, CAR), seg(2, SKY)])
    assert counts(results, CAR) == (0, 1, 0)


def test_crowd_never_matches_and_stays_in_the_union():
    # gt: person 6 px, person crowd 4 px; pred: one person on all 10 px. As panopticapi, only VOID is
    # removed from the union: IoU = 6 / (10 + 6 - 6) = 0.6 (1.0 if the crowd pixels were removed).
    # The crowd segment is not FN.
    gt = row((1, 6), (2, 4))
    results = evaluate(gt, [seg(1, PERSON), seg(2, PERSON, iscrowd=1)], row((9, 10)), [seg(9, PERSON)])
    assert counts(results, PERSON) == (1, 0, 0)
    assert results["All"]["sq"] == pytest.approx(0.6)
    # a prediction only on the crowd: not a match (crowd never matches), not FP (all on the crowd)
    results = evaluate(gt, [seg(1, PERSON), seg(2, PERSON, iscrowd=1)], row((0, 6), (9, 4)), [seg(9, PERSON)])
    assert counts(results, PERSON) == (0, 0, 1)


def test_things_stuff_and_per_class():
    # gt: person 8 px, car 4 px, sky 8 px, road 4 px (4 x 6 map)
    # pred: person exact; car on its 4 px + 2 road px; sky on 6 of its 8 px, its other 2 px predicted
    # as road (no road gt pixel among them); the road gt's 4 px are predicted car (2) and VOID (2).
    gt = np.array([[1, 1, 1, 1, 2, 2],
                   [1, 1, 1, 1, 2, 2],
                   [3, 3, 3, 3, 4, 4],
                   [3, 3, 3, 3, 4, 4]])
    pred = np.array([[11, 11, 11, 11, 12, 12],
                     [11, 11, 11, 11, 12, 12],
                     [13, 13, 13, 13, 12, 0],
                     [13, 13, 14, 14, 12, 0]])
    gt_segments = [seg(1, PERSON), seg(2, CAR), seg(3, SKY), seg(4, ROAD)]
    pred_segments = [seg(11, PERSON), seg(12, CAR), seg(13, SKY), seg(14, ROAD)]
    results = evaluate(gt, gt_segments, pred, pred_segments)
    # person TP (1.0); car TP (IoU 4 / (6 + 4 - 4) = 2/3); sky TP (6 / 8 = 0.75); road FP 1 + FN 1
    assert counts(results, PERSON) == (1, 0, 0)
    assert counts(results, CAR) == (1, 0, 0)
    assert counts(results, SKY) == (1, 0, 0)
    assert counts(results, ROAD) == (0, 1, 1)
    assert results["per_class"][CAR] == pytest.approx({"pq": 2 / 3, "sq": 2 / 3, "rq": 1.0, "tp": 1, "fp": 0,
                                                       "fn": 0})
    assert results["per_class"][ROAD] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 1, "fn": 1}
    # Things = mean(person, car): PQ = SQ = (1 + 2/3) / 2 = 5/6, RQ = 1
    assert results["Things"] == pytest.approx({"pq": 5 / 6, "sq": 5 / 6, "rq": 1.0, "n": 2})
    # Stuff = mean(sky, road): PQ = SQ = (0.75 + 0) / 2 = 0.375, RQ = (1 + 0) / 2 = 0.5
    assert results["Stuff"] == pytest.approx({"pq": 0.375, "sq": 0.375, "rq": 0.5, "n": 2})
    # All = mean of 4: PQ = SQ = (1 + 2/3 + 0.75 + 0) / 4 = 29/48, RQ = 3/4
    assert results["All"] == pytest.approx({"pq": 29 / 48, "sq": 29 / 48, "rq": 0.75, "n": 4})


def test_categories_absent_from_both_are_not_averaged():
    # only person present (perfect): car, sky, road have TP + FP + FN = 0 -> n = 1, no Stuff
    results = evaluate(row((1, 4)), [seg(1, PERSON)], row((2, 4)), [seg(2, PERSON)])
    assert results["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert results["Things"]["n"] == 1
    assert results["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert results["per_class"][ROAD] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}


def random_image(rng, first_id):
    """An [8, 12] image of 4 x 4 blocks, ids from first_id; the prediction is the gt with its block
    boundaries shifted and some categories changed, so TP, FP and FN all occur."""
    gt = np.repeat(np.repeat(np.arange(6).reshape(2, 3), 4, 0), 4, 1)
    gt[:, 10:] = -1  # VOID strip
    pred = np.roll(gt, rng.integers(-2, 3, size=2), axis=(0, 1))
    gt_cats = rng.integers(1, 5, size=6)
    pred_cats = np.where(rng.random(6) < 0.3, rng.integers(1, 5, size=6), gt_cats)
    crowd = rng.random(6) < 0.2
    gt_segments = [seg(first_id + k, int(gt_cats[k]), int(crowd[k])) for k in range(6)]
    pred_segments = [seg(first_id + 10 + k, int(pred_cats[k])) for k in np.unique(pred[pred >= 0]).tolist()]
    return (np.where(gt >= 0, gt + first_id, 0), gt_segments,
            np.where(pred >= 0, pred + first_id + 10, 0), pred_segments)


def assert_same_stats(a, b):
    assert a.category_ids == b.category_ids
    np.testing.assert_array_equal(a.tp, b.tp)
    np.testing.assert_array_equal(a.fp, b.fp)
    np.testing.assert_array_equal(a.fn, b.fn)
    np.testing.assert_allclose(a.iou, b.iou, rtol=1e-12)


def test_two_images_add_up_to_their_union():
    rng = np.random.default_rng(0)
    totals = np.zeros(3, int)
    for _ in range(20):
        a, b = random_image(rng, 1), random_image(rng, 100)  # ids don't clash
        stats_a, stats_b = image_stats(*a, CATEGORIES), image_stats(*b, CATEGORIES)
        side_by_side = image_stats(np.hstack([a[0], b[0]]), a[1] + b[1], np.hstack([a[2], b[2]]), a[3] + b[3],
                                   CATEGORIES)
        assert_same_stats(stats_a + stats_b, side_by_side)
        assert_same_stats(accumulate(stats_a, *b, CATEGORIES), side_by_side)
        totals += [side_by_side.tp.sum(), side_by_side.fp.sum(), side_by_side.fn.sum()]
    assert (totals > 0).all()  # the images exercise TP, FP and FN


def test_stats_addition_is_associative_and_checks_categories():
    rng = np.random.default_rng(1)
    a, b, c = (image_stats(*random_image(rng, 1), CATEGORIES) for _ in range(3))
    assert_same_stats((a + b) + c, a + (b + c))
    assert_same_stats(empty_stats(CATEGORIES) + a, a)
    with pytest.raises(ValueError, match="different categories"):
        a + empty_stats(CATEGORIES[:2])


@pytest.mark.parametrize("gt_segments, pred_map, pred_segments, message", [
    ([seg(1, PERSON)], row((7, 2), (8, 2)), [seg(7, PERSON)],
     r"image 42: predicted segment ids \[8\] are in the id map but not in its segments_info"),
    ([], row((7, 4)), [seg(7, PERSON)],
     r"image 42: ground-truth segment ids \[1\] are in the id map but not in its segments_info"),
    ([seg(1, PERSON)], row((7, 4)), [seg(7, 99)], "image 42: predicted segment 7 has unknown category_id 99"),
    ([seg(1, 77)], row((7, 4)), [seg(7, PERSON)], "image 42: ground-truth segment 1 has unknown category_id 77"),
    ([seg(1, PERSON)], row((7, 4)), [seg(7, PERSON), seg(8, CAR)],
     r"image 42: predicted segment ids \[8\] are in segments_info but not in the id map"),
    ([seg(1, PERSON)], row((7, 4)), [seg(7, PERSON), seg(7, CAR)], "image 42: predicted segment id 7 is listed twice"),
    ([seg(1, PERSON)], row((7, 3)), [seg(7, PERSON)], r"image 42: .* \(1, 4\) .* \(1, 3\) differ in shape"),
])
def test_errors_name_the_image_and_segment(gt_segments, pred_map, pred_segments, message):
    with pytest.raises(DataError, match=message):
        image_stats(row((1, 4)), gt_segments, pred_map, pred_segments, CATEGORIES, image_id=42)


def test_rgb_ids_round_trip():
    ids = np.array([[0, 1, 255, 256], [65536, 123456, 256 ** 3 - 1, 7]])
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert rgb[1, 1].tolist() == [123456 % 256, 123456 // 256 % 256, 123456 // 65536]  # R + 256 G + 256^2 B
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    with pytest.raises(ValueError):
        id2rgb([256 ** 3])


def write_folder(tmp_path, name, images, categories=None):
    """images: [(image_id, id map, segments_info)] -> tmp_path/name.json + tmp_path/name/*.png."""
    (tmp_path / name).mkdir()
    annotations = []
    for image_id, id_map, segments in images:
        write_id_map(tmp_path / name / f"{image_id:012d}.png", id_map)
        annotations.append({"image_id": image_id, "file_name": f"{image_id:012d}.png", "segments_info": segments})
    dataset = {"annotations": annotations, **({"categories": categories} if categories else {})}
    (tmp_path / f"{name}.json").write_text(json.dumps(dataset))
    return tmp_path / f"{name}.json"


def test_png_round_trip(tmp_path):
    ids = np.array([[0, 1, 300], [70000, 256 ** 3 - 1, 5]])
    write_id_map(tmp_path / "a.png", ids)
    np.testing.assert_array_equal(read_id_map(tmp_path / "a.png"), ids)


def test_folders_give_the_numbers_of_the_arrays(tmp_path):
    rng = np.random.default_rng(2)
    images = [random_image(rng, 1 + 1000 * k) for k in range(3)]
    gt_json = write_folder(tmp_path, "gt", [(k, im[0], im[1]) for k, im in enumerate(images)], CATEGORIES)
    pred_json = write_folder(tmp_path, "pred", [(k, im[2], im[3]) for k, im in enumerate(images)])
    stats = empty_stats(CATEGORIES)
    for im in images:
        stats = accumulate(stats, *im, CATEGORIES)
    assert evaluate_folders(gt_json, pred_json) == summarize(stats, CATEGORIES)


def test_folders_need_a_prediction_per_image(tmp_path):
    gt_json = write_folder(tmp_path, "gt", [(1, row((1, 4)), [seg(1, PERSON)]), (2, row((1, 4)), [seg(1, PERSON)])],
                           CATEGORIES)
    pred_json = write_folder(tmp_path, "pred", [(1, row((1, 4)), [seg(1, PERSON)])])
    with pytest.raises(DataError, match="no prediction for the image with id 2"):
        evaluate_folders(gt_json, pred_json)


def test_table_prints_percent_like_panopticapi():
    results = evaluate(row((1, 5), (2, 5)), [seg(1, PERSON), seg(2, PERSON)], row((8, 5), (0, 5)), [seg(8, PERSON)])
    lines = format_table(results).splitlines()
    assert lines[0] == "          |    PQ     SQ     RQ     N"
    assert lines[1] == "-" * 38
    assert lines[2] == "All       |  66.7  100.0   66.7     1"
    assert lines[3] == "Things    |  66.7  100.0   66.7     1"
    assert lines[4] == "Stuff     |   0.0    0.0    0.0     0"
