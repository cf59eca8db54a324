"""Detect and explain: attention maps sown by the model, drawn detections, python -m detr_jax.detect on
synthetic images, convergence plots from (partial) histories, python -m detr_jax.plot_runs."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tiny_config
from detr_jax import build_model
from detr_jax.evaluation.inference import predictor
from detr_jax.models.layers import MultiHeadAttention
from detr_jax.visualize import attention, draw
from detr_jax.data.image_files import find_images
from detr_jax.visualize.detect import (class_names, coco_class_names, detect_checkpoint, original_pixels, output_names,
                                      parse_pixels, select_detections)
from detr_jax.visualize.plots import curves_figure, load_runs, plot_runs, read_history, summary_table
from test_eval_cli import SAVED_NAMES, tiny_run  # noqa: F401  (a fixture: a workdir with training checkpoints)
from test_eval_pipeline import numpy_variables
from test_model import canvas

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_module(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        image.verify()


# --- attention maps -------------------------------------------------------------------------------

def test_attention_sows_weights_that_reproduce_its_output():
    """The sown weights are the softmax the module uses: [B, heads, Lq, Lk], rows sum to 1 over the
    keys kept, exactly 0 on padded keys, and weights @ v_proj(value) -> out_proj is the output."""
    rng = np.random.default_rng(0)
    q, kv = rng.standard_normal((2, 3, 8)).astype(np.float32), rng.standard_normal((2, 5, 8)).astype(np.float32)
    mask = np.array([[False] * 5, [False, False, False, True, True]])
    mha = MultiHeadAttention(num_heads=2)
    variables = mha.init(jax.random.PRNGKey(0), q, kv, kv, mask, False)
    assert set(variables) == {"params"}  # init sows nothing
    out, sown = mha.apply(variables, q, kv, kv, mask, False, mutable=["attention"])
    weights = np.asarray(sown["attention"]["weights"][0])
    assert weights.shape == (2, 2, 3, 5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert (weights[1, :, :, 3:] == 0).all() and (weights[1, :, :, :3] > 0).all()
    params = variables["params"]
    v = (kv @ params["v_proj"]["kernel"] + params["v_proj"]["bias"]).reshape(2, 5, 2, 4)
    mixed = np.einsum("bhqk,bkhc->bqhc", weights, v).reshape(2, 3, 8)
    np.testing.assert_allclose(out, mixed @ params["out_proj"]["kernel"] + params["out_proj"]["bias"], atol=1e-5)
    assert mha.apply(variables, q, kv, kv, mask, False).shape == (2, 3, 8)  # not asked: plain output


@pytest.fixture(scope="module")
def attention_run():
    """The tiny DETR on a full 128x128 image and a 64x96 one padded to 128x128, through the
    Predictor with attention maps, every query kept."""
    model = build_model(tiny_config(dropout=0.0))
    variables = numpy_variables(model, seed=2)
    images, mask = canvas([(128, 128), (64, 96)], (128, 128))
    orig_size = np.array([[128, 128], [64, 96]], np.int32)
    maps = jax.device_get(predictor(model, 0, True)(variables, images, mask, orig_size))
    return model, variables, (images, mask, orig_size), maps


def test_decoder_attention_sums_to_one_over_the_image_and_is_zero_on_padding(attention_run):
    model, _, _, maps = attention_run
    feature_mask = maps["feature_mask"]  # [2, h, w]
    b, h, w = feature_mask.shape
    assert maps["decoder_attention"].shape == (2, model.num_queries, h * w)
    assert attention.valid_region(feature_mask[0]) == (h, w) and attention.valid_region(feature_mask[1]) == (h // 2,
                                                                                                         w * 3 // 4)
    padding = feature_mask.reshape(b, 1, h * w)
    for name in ("decoder_attention", "encoder_attention"):
        weights = maps[name]
        np.testing.assert_allclose(np.where(padding, 0, weights).sum(-1), 1.0, atol=1e-5)
        assert (weights[np.broadcast_to(padding, weights.shape)] == 0).all()
        assert (weights[~np.broadcast_to(padding, weights.shape)] > 0).all()


def test_encoder_map_of_a_pixel_has_the_feature_map_shape(attention_run):
    maps = attention_run[-1]
    feature_shape = maps["feature_mask"].shape[1:]
    assert feature_shape == (4, 4)  # the tiny backbone's stride is 32
    cell = attention.feature_cell((90, 40), (64, 96), (64, 96), (32, 32), attention.valid_region(maps["feature_mask"][1]))
    assert cell == (1, 2)  # row 40 // 32, col 90 // 32
    encoder_map = attention.encoder_map(maps["encoder_attention"][1], feature_shape, cell)
    assert encoder_map.shape == feature_shape
    np.testing.assert_array_equal(encoder_map.ravel(), maps["encoder_attention"][1][1 * 4 + 2])
    assert encoder_map.sum() == pytest.approx(1.0, abs=1e-5) and (encoder_map[2:] == 0).all()
    assert (encoder_map[:, 3:] == 0).all() and (encoder_map[:2, :3] > 0).all()


def test_feature_cell_hand_computed():
    """A 200x400 original resized to 100x200 on a 128x224 canvas (stride 32, 4x7 cells for the image)."""
    cell = lambda xy: attention.feature_cell(xy, (200, 400), (100, 200), (32.0, 32.0), (4, 7))
    assert cell((0, 0)) == (0, 0)
    assert cell((390, 150)) == (2, 6)  # resized (195, 75): row 75 // 32, col 195 // 32
    assert cell((127, 63)) == (0, 1) and cell((128, 64)) == (1, 2)  # resized (64, 32): cell edges
    assert cell((1000, -5)) == (0, 6)  # beyond the image: clamped to its border cells


def test_predictor_attention_is_optional_and_follows_the_kept_queries(attention_run):
    """With topk, the maps are those of the kept queries; the detections are those of the plain
    Predictor; not asked, the model sows nothing."""
    model, variables, inputs, maps = attention_run
    plain = jax.device_get(predictor(model, 3)(variables, *inputs))
    explained = jax.device_get(predictor(model, 3, True)(variables, *inputs))
    assert set(plain) == {"scores", "labels", "boxes", "queries"}
    for key in plain:
        np.testing.assert_allclose(explained[key], plain[key], rtol=1e-5, atol=1e-5)
    for b in range(2):
        best = np.argsort(-maps["scores"][b], kind="stable")[:3]
        np.testing.assert_array_equal(plain["queries"][b], best)
        np.testing.assert_allclose(explained["decoder_attention"][b], maps["decoder_attention"][b][best], atol=1e-6)
    np.testing.assert_allclose(explained["encoder_attention"], maps["encoder_attention"], atol=1e-6)
    _, sown = jax.eval_shape(lambda: model.apply(variables, *inputs[:2], mutable=["intermediates"]))
    assert "attention" not in sown


# --- detections: selection, names, drawing --------------------------------------------------------

def test_select_detections_thresholds_and_sorts():
    prediction = {"scores": np.array([0.5, 0.9, 0.7, 0.9]), "labels": np.array([1, 0, 2, 1]),
                  "boxes": np.arange(16, dtype=np.float32).reshape(4, 4), "queries": np.array([7, 3, 5, 9])}
    got = select_detections(prediction, ["a", "b", "c"], threshold=0.7)
    assert [(d["class"], d["score"], d["query"]) for d in got] == [("a", 0.9, 3), ("b", 0.9, 9), ("c", 0.7, 5)]
    assert got[0]["box"] == [4.0, 5.0, 6.0, 7.0] and got[0]["label"] == 0
    json.dumps(got)  # json-ready


def test_class_names():
    coco = coco_class_names()
    assert len(coco) == 91 and coco[1] == "person" and coco[90] == "toothbrush" and coco[12] == "N/A"
    assert class_names(91) == coco
    assert class_names(3) == ["class 0", "class 1", "class 2"]
    assert class_names(2, override=["cat", "dog"]) == ["cat", "dog"]
    assert class_names(2, saved=("red", "")) == ["red", "class 1"]  # a training checkpoint's, before COCO's
    assert class_names(91, saved=["x"] * 91) == ["x"] * 91
    assert class_names(2, override=["cat", "dog"], saved=("red", "blue")) == ["cat", "dog"]
    with pytest.raises(ValueError, match="3 names; the model has 2 classes"):
        class_names(2, override=["a", "b", "c"])
    assert output_names(["x/a.jpg", "y/a.png", "b.jpg"]) == ["a", "a_2", "b"]


def test_pictures_are_drawn_on_the_pixels_the_model_saw(tmp_path):
    """A 16-bit PNG (and a grayscale one) is drawn scaled to 8 bits, as decoded for the model; PIL's
    convert("RGB") made the 16-bit one all white."""
    import tensorflow as tf

    deep, gray = tmp_path / "deep.png", tmp_path / "gray.png"
    deep.write_bytes(tf.io.encode_png(np.full((6, 5, 3), (100 * 257, 150 * 257, 200 * 257), np.uint16)).numpy())
    gray.write_bytes(tf.io.encode_png(np.full((6, 5, 1), 77, np.uint8)).numpy())
    assert (np.asarray(original_pixels(deep)) == (100, 150, 200)).all()
    assert (np.asarray(original_pixels(gray)) == 77).all() and original_pixels(gray).mode == "RGB"


def test_drawn_box_lies_where_the_detection_says():
    """A box [20, 30, 70, 90] on a grey 120x100 image: a 2-px ring in the class colour on exactly
    the pixels 20..69 x 30..89, the caption band above it, nothing else touched."""
    grey = (90, 90, 90)
    image = Image.new("RGB", (120, 100), grey)
    detection = {"class": "square", "label": 2, "score": 0.93, "box": [20.0, 30.0, 70.0, 90.0], "query": 4}
    pixels = np.asarray(draw.draw_detections(image, [detection]))
    assert pixels.shape == (100, 120, 3) and (np.asarray(image) == grey).all()  # drawn on a copy
    coloured = (pixels == draw.colour(2)).all(-1)
    ring = np.zeros((100, 120), bool)
    ring[30:90, 20:70] = True
    ring[32:88, 22:68] = False
    np.testing.assert_array_equal(coloured[30:], ring[30:])  # the box: exactly the ring
    assert (pixels[30:][~ring[30:]] == grey).all()
    band = coloured[:30]  # the caption band: above the box, from its left edge
    assert band[29, 20] and band[20:30, 20:40].mean() > 0.5 and not band[:, :20].any()


def test_find_images_and_what_detect_refuses(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.JPEG").write_bytes(b"x")
    assert find_images(str(tmp_path / "b.png")) == [str(tmp_path / "b.png")]
    assert find_images(str(tmp_path)) == [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]
    assert find_images(str(tmp_path / "**" / "*")) == [str(tmp_path / n) for n in ("a.jpg", "b.png", "sub/c.JPEG")]
    with pytest.raises(FileNotFoundError, match="no image file there"):
        find_images(str(tmp_path / "*.gif"))
    with pytest.raises(ValueError, match="pass --workdir"):
        detect_checkpoint(None, str(tmp_path), tmp_path / "out")
    assert parse_pixels(["3,4.5"]) == [(3.0, 4.5)]
    with pytest.raises(ValueError, match="--encoder_pixel='3'"):
        parse_pixels(["3"])


# --- python -m detr_jax.detect --------------------------------------------------------------------

def test_detect_help():
    result = run_module("detr_jax.detect", "--help")
    assert result.returncode == 1 and not result.stderr, result.stderr  # absl's --help convention
    for flag in ("--images", "--output", "--workdir", "--checkpoint", "--config", "--threshold", "--topk",
                 "--[no]draw", "--[no]decoder_attention", "--encoder_pixel", "--class_names", "--batch_size",
                 "--[no]masks", "--panoptic_threshold"):
        assert f"  {flag}:" in result.stdout, flag


def test_detect_on_synthetic_images(tiny_run, tmp_path):  # noqa: F811
    """A training workdir's latest checkpoint on its synthetic val folder: detections.json, with the
    class names saved with the checkpoint, the drawn images (each box where the json says), both
    attention figures."""
    workdir, _, _ = tiny_run
    out = tmp_path / "out"
    result = run_module("detr_jax.detect", f"--workdir={workdir}", f"--images={workdir / 'data' / 'val'}",
                        f"--output={out}", "--threshold=0", "--topk=1", "--batch_size=4", "--draw",
                        "--decoder_attention", "--encoder_pixel=10,20", "--encoder_pixel=40,30")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "detect: 6/6 images" in result.stdout
    found = json.loads((out / "detections.json").read_text())
    assert found["class_names"] == list(SAVED_NAMES)  # the checkpoint's, not those of the config's dataset
    assert len(found["images"]) == 6 and found["topk"] == 1
    for entry in found["images"]:
        name = entry["file"].rsplit("/", 1)[1].rsplit(".", 1)[0]
        (det,) = entry["detections"]
        assert det["class"] == found["class_names"][det["label"]] and 0 <= det["score"] <= 1
        for suffix in ("", "_decoder_attention", "_encoder_attention"):
            assert_png(out / f"{name}{suffix}.png")
        drawn = np.asarray(Image.open(out / f"{name}.png"))
        assert drawn.shape == (entry["height"], entry["width"], 3)
        left, top, right, bottom = draw.box_pixels(det["box"], entry["height"], entry["width"])
        for x, y in ((left, bottom), (right, bottom), (right, top)):
            assert tuple(drawn[y, x]) == draw.colour(det["label"]), (name, x, y)


# --- convergence plots ----------------------------------------------------------------------------

def write_history(workdir, train_rows, eval_rows, partial=""):
    history = workdir / "history"
    history.mkdir(parents=True)
    (history / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows) + partial)
    if eval_rows is not None:
        (history / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))


def ap_row(step, ap):
    return {"step": step, "epoch": step / 10, "AP": ap, "AP50": ap + 0.2, "AP75": ap + 0.1, "APs": ap / 2,
            "APm": ap, "APl": ap * 1.5}


@pytest.fixture
def two_runs(tmp_path):
    """Run a: 3 logged steps, 3 evaluations (best in the middle), a half-written last line; run b:
    2 logged steps, no evaluation yet."""
    train = lambda step, loss: {"step": step, "epoch": step / 10, "loss": loss, "loss_ce": loss / 4,
                                "loss_bbox": loss / 10, "loss_giou": loss / 5, "class_error": 50.0}
    write_history(tmp_path / "a", [train(10, 9.0), train(20, 6.0), train(30, 4.0)],
                  [ap_row(10, 0.1), ap_row(20, 0.3), ap_row(30, 0.25)], partial='{"step": 40, "loss": 3.')
    write_history(tmp_path / "b", [train(10, 8.0), train(20, 7.0)], None)
    return tmp_path


def test_read_history_tolerates_a_partial_last_line_only(two_runs, tmp_path):
    assert [r["step"] for r in read_history(two_runs / "a" / "history" / "train.jsonl")] == [10, 20, 30]
    assert read_history(two_runs / "b" / "history" / "eval.jsonl") == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not a json object"):
        read_history(bad)


def test_summary_table_best_and_final_ap(two_runs):
    table = summary_table(load_runs([two_runs / "a", two_runs / "b"]))
    assert "| a | 3 | 0.3000 | 20 | 0.2500 | 0.4500 | 0.3500 | 30 |" in table
    assert "| b | 0 | - | - | - | - | - | - |" in table


def test_curves_share_axes_and_mark_val_terms(two_runs):
    # what evaluation writes: the val terms prefixed (an unprefixed name is no val term)
    (two_runs / "a" / "history" / "eval.jsonl").write_text(
        json.dumps({"step": 30, "epoch": 3.0, "val_loss": 5.0, "loss_giou": 1.0}) + "\n")
    runs = load_runs([two_runs / "a", two_runs / "b"], labels=["base", "new"])
    fig = curves_figure(runs, ("loss", "loss_giou", "AP"), x="epoch")
    loss_ax, giou_ax = fig.axes[:2]
    assert [line.get_label() for line in loss_ax.lines] == ["base (train)", "base (val)", "new"]
    np.testing.assert_array_equal(loss_ax.lines[0].get_xdata(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(loss_ax.lines[1].get_ydata(), [5.0])
    assert [line.get_label() for line in giou_ax.lines] == ["base", "new"]
    assert len(fig.axes) == 2  # no run has AP any more: no AP panel


def test_plot_runs_writes_pngs_and_table(two_runs, tmp_path):
    out = tmp_path / "plots"
    table = plot_runs([two_runs / "a", two_runs / "b"], out, log=lambda *a: None)
    for name in ("losses.png", "ap.png"):
        assert_png(out / name)
    assert (out / "summary.md").read_text() == table
    with pytest.raises(FileNotFoundError, match="no train.jsonl or eval.jsonl"):
        plot_runs([tmp_path / "nothing"], out)


def test_plot_runs_command(two_runs, tmp_path):
    result = run_module("detr_jax.plot_runs", "--help")
    assert result.returncode == 1 and all(f"  --{f}:" in result.stdout for f in ("workdirs", "output", "labels", "x"))
    result = run_module("detr_jax.plot_runs", f"--workdirs={two_runs / 'a'},{two_runs / 'b'}",
                        f"--output={tmp_path / 'p'}", "--x=epoch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| a | 3 | 0.3000 | 20 |" in result.stdout
    assert_png(tmp_path / "p" / "losses.png")
