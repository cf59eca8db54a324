"""COCO panoptic folders: a ``panoptic_*.json``, a folder of panoptic PNGs and a folder of images.

The official layout (``source="coco_panoptic"``): ``DATA_DIR/annotations/panoptic_train2017.json``,
``DATA_DIR/panoptic_train2017/*.png``, ``DATA_DIR/train2017/*.jpg`` (val alike), or explicit files
per split (data_config.{train,val}_{panoptic_annotations,panoptic_masks,images}); the synthetic
dataset with stuff classes uses the same format. As official ``CocoPanoptic``, every segment of an
image's 'segments_info' is a target, crowd ones too (``clean_targets(panoptic=True)``), labelled by
its category_id (``label_mapping``), its box the ``masks_to_boxes`` of its mask. Records keep
iscrowd, area and the segment id (the PNG's R + 256 G + 256^2 B) for evaluation.

Checked at load (cheap: no PNG is decoded): every field (a DataError names the file and field),
segment ids (1..2^24 - 1, unique within an image), every image has one annotation entry and its PNG
exists (a missing PNG is an error naming it). Checked at decode: the PNG reads and holds every
target's segment id (otherwise the image is a filler, counted as unreadable_image).
"""
import os

from detr_jax.data.coco_json import (Checker, JsonSource, layout_paths, load_json, present_files, present_images,
                                     unknown_categories)
from detr_jax.data.records import build_records, clean_targets, make_info
from detr_jax.data.report import Report
from detr_jax.errors import DataError

MAX_SEGMENT_ID = 256 ** 3 - 1  # an RGB colour; 0 is void


def read_panoptic(path: str, png_dir: str, image_dir: str, unknown_category: str, report: Report):
    """A COCO panoptic json -> (Records of every image listed, with panoptic_path and segment ids,
    categories [(id, name, isthing)]).

    ann_id is the segment's position in the file (1, 2, ...: segment ids repeat across images).
    Segments whose category id is not in 'categories': an error (``unknown_category='error'``) or
    left out and counted (``'skip'``; their pixels are then void in ``panoptic_ground_truth``).
    """
    check = Checker(path)
    images, annotations, categories = check.top_level(load_json(path))
    cats = check.categories(categories, "isthing")
    rows, image_rows = check.images(images, image_dir)

    pngs, segments, unknown = {}, [], []
    for k, a in enumerate(annotations):
        iid = check.field(a, "image_id", f"annotations[{k}]", "int")
        where = f"annotations[{k}] (image id {iid})"
        if iid not in image_rows:
            check.fail(f"{where}.image_id", f"= {iid}: no image has this id")
        row = image_rows[iid]
        if row in pngs:
            check.fail(f"{where}.image_id", f"= {iid} repeats the image of an earlier annotation entry")
        pngs[row] = os.path.join(png_dir, check.field(a, "file_name", where, "str"))
        seen = set()
        for j, seg in enumerate(check.field(a, "segments_info", where, "list")):
            at = f"{where}.segments_info[{j}]"
            sid = check.field(seg, "id", at, "int")
            if not 0 < sid <= MAX_SEGMENT_ID or sid in seen:
                check.fail(f"{at}.id", f"= {sid}: expected an id in 1..{MAX_SEGMENT_ID} (an RGB colour, 0 is void), "
                           "unique within the image")
            seen.add(sid)
            cid = check.field(seg, "category_id", at, "int")
            box = check.field(seg, "bbox", at, "bbox")
            crowd = check.field(seg, "iscrowd", at, "int", default=0)
            area = check.field(seg, "area", at, "number", default=box[2] * box[3])
            if cid not in cats:
                unknown.append(f"{rows[row][1]} (image id {iid}) segment id {sid}: category_id {cid}")
                continue
            segments.append((row, len(segments) + 1, box, cid, bool(crowd), area, sid))
    without = [k for k in range(len(rows)) if k not in pngs]
    if without:
        check.fail(f"images[{without[0]}] (id {rows[without[0]][0]})",
                   f"has no entry in 'annotations' (nor have {len(without) - 1} other images): its panoptic PNG "
                   "is unknown")
    unknown_categories(path, unknown, cats, unknown_category, report)
    records = build_records([(*r, pngs[k]) for k, r in enumerate(rows)], segments)
    return records, sorted((cid, name, bool(thing)) for cid, (name, thing) in cats.items())


def check_pngs(records, path: str, png_dir: str) -> None:
    """A DataError naming the first missing panoptic PNG of records (listed in annotation file path)."""
    present = present_files(records.panoptic_path)
    if not present.all():
        i = int((~present).argmax())
        raise DataError(f"{path}: the panoptic PNG {records.panoptic_path[i]} of {records.file_name[i]} (image id "
                         f"{records.image_id[i]}; its annotation entry's file_name) is not in {png_dir}, nor are "
                         f"{int((~present).sum()) - 1} other PNGs; check data_config's panoptic_masks folder")


def load(data_config, split: str, process_index: int, process_count: int, layout: str = "coco_panoptic") -> JsonSource:
    """The panoptic JsonSource of a split (``coco_json.layout_paths`` says where it is read from)."""
    paths = layout_paths(data_config, split, layout)
    annotation_file, png_dir, image_dir = (paths[k] for k in ("panoptic_annotations", "panoptic_masks", "images"))
    report = Report(f"{split} split of {annotation_file}")
    records, categories = read_panoptic(annotation_file, png_dir, image_dir, data_config.unknown_category, report)
    check_pngs(records, annotation_file, png_dir)
    records = present_images(records, image_dir, annotation_file, split, report)
    info = make_info(categories, data_config.label_mapping, len(records))
    targets = clean_targets(records, info, data_config.max_boxes, data_config.max_boxes_policy, report, panoptic=True)
    return JsonSource(annotation_file, data_config=data_config, split=split, info=info, records=records,
                      targets=targets, report=report, process_index=process_index, process_count=process_count,
                      panoptic=True)
