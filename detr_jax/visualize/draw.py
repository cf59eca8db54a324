"""Pictures of detections: boxes and labels drawn on the image (PIL), and the attention figures of
the DETR paper (matplotlib, Agg backend: no display needed).

A detection here is a dict as ``detect`` writes it: {"class": name, "label": int, "score": float,
"box": [x0, y0, x1, y1] original pixels, "query": int}.
"""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

# matplotlib's tab10, as RGB bytes: the colour of a class is PALETTE[label % 10]
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
MAX_PANELS = 8  # detections shown in a decoder-attention figure (the best-scoring ones)


def colour(label: int) -> tuple[int, int, int]:
    return PALETTE[label % len(PALETTE)]


def line_width(h: int, w: int) -> int:
    """Box outline width for an image of h x w pixels: 2 px up to 300 px, then ~1/150 of the short side."""
    return max(2, round(min(h, w) / 150))


def box_pixels(box, h: int, w: int) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1] in pixel units (edges) -> the inclusive pixel rectangle it covers, inside
    the h x w image: (left, top, right, bottom) for ``ImageDraw.rectangle``."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    left, top = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    return left, top, min(max(x1 - 1, left), w - 1), min(max(y1 - 1, top), h - 1)


def caption(detection: dict) -> str:
    return f"{detection['class']} {detection['score']:.2f}"


def draw_detections(image: Image.Image, detections) -> Image.Image:
    """A copy of ``image`` (RGB) with each detection's box outlined in its class colour and its
    class name and score written on a filled band above the box (inside it at the top border)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = line_width(h, w)
    font = ImageFont.load_default(size=max(10, round(min(h, w) / 24)))
    for det in detections:
        left, top, right, bottom = box_pixels(det["box"], h, w)
        fill = colour(det["label"])
        draw.rectangle((left, top, right, bottom), outline=fill, width=width)
        text = caption(det)
        tl, tt, tr, tb = draw.textbbox((0, 0), text, font=font)
        text_h, text_w = tb - tt + 2, tr - tl + 2
        band_top = top - text_h if top - text_h >= 0 else top
        draw.rectangle((left, band_top, left + text_w, band_top + text_h - 1), fill=fill)
        draw.text((left + 1 - tl, band_top + 1 - tt), text, fill=(255, 255, 255), font=font)
    return out


def _show_image(ax, image, title: str = ""):
    ax.imshow(image)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _outline(ax, detection: dict):
    x0, y0, x1, y1 = detection["box"]
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=2,
                           edgecolor=np.asarray(colour(detection["label"])) / 255))


def decoder_attention_figure(image, detections, maps) -> plt.Figure:
    """The paper's decoder figure: for each detection (the best ``MAX_PANELS``), its query's
    cross-attention over the image's feature cells (top) above the image with its box (bottom).

    image [H, W, 3] uint8; detections: sorted by score, descending; maps [K, rows, cols] (the
    valid feature cells, ``attention.valid_region``), one per detection.
    """
    shown = list(zip(detections, maps))[:MAX_PANELS]
    fig, axes = plt.subplots(2, len(shown), figsize=(2.4 * len(shown), 4.8), squeeze=False)
    for col, (det, attention_map) in enumerate(shown):
        _show_image(axes[0, col], attention_map, f"query {det['query']}")
        _show_image(axes[1, col], image, caption(det))
        _outline(axes[1, col], det)
    fig.tight_layout()
    return fig


def encoder_attention_figure(image, pixels_xy, maps) -> plt.Figure:
    """The paper's encoder figure: the image with the chosen pixels marked and numbered, then each
    pixel's self-attention over the feature cells (last encoder layer).

    image [H, W, 3] uint8; pixels_xy: (x, y) original pixels; maps [P, rows, cols], one per pixel.
    """
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.6 * (len(maps) + 1), 2.8), squeeze=False)
    _show_image(axes[0, 0], image, "pixels")
    for i, ((x, y), attention_map) in enumerate(zip(pixels_xy, maps), start=1):
        axes[0, 0].plot(x, y, "o", markersize=8, markerfacecolor="none", markeredgecolor="red", markeredgewidth=2)
        axes[0, 0].annotate(str(i), (x, y), xytext=(6, -6), textcoords="offset points", color="red", fontsize=9)
        _show_image(axes[0, i], attention_map, f"{i}: ({x:g}, {y:g})")
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path, dpi: int = 100) -> None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def draw_panoptic(image: Image.Image, ids: np.ndarray, segments, names, alpha: float = 0.55) -> Image.Image:
    """A copy of ``image`` (RGB, H x W) with each panoptic segment filled in a colour (things: one per
    segment; stuff: its class's) blended at ``alpha``, its boundary darkened and its class name at
    its centre. ids [H, W] int: segment id per pixel (0: none); segments: [{"id", "label", "isthing"}]."""
    base = np.asarray(image.convert("RGB"), np.float32)
    colours = np.zeros((int(ids.max(initial=0)) + 1, 3), np.float32)
    for k, segment in enumerate(segments):
        colours[segment["id"]] = colour(k if segment["isthing"] else segment["label"] + 5)
    painted = np.where((ids > 0)[..., None], (1 - alpha) * base + alpha * colours[ids], base)
    edge = np.zeros(ids.shape, bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    painted[edge] *= 0.3
    out = Image.fromarray(painted.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(9, round(min(ids.shape) / 20)))
    for segment in segments:
        ys, xs = np.nonzero(ids == segment["id"])
        if len(ys):
            k = np.argmin((ys - np.median(ys)) ** 2 + (xs - np.median(xs)) ** 2)  # a pixel of the segment
            draw.text((int(xs[k]), int(ys[k])), names[segment["label"]], fill=(255, 255, 255), font=font,
                      anchor="mm", stroke_width=1, stroke_fill=(0, 0, 0))
    return out


def grid(rows, gap: int = 4) -> Image.Image:
    """Pictures (PIL, any sizes) in a grid, rows [[image, ...], ...], each cell as large as the
    largest picture, on white."""
    cell_w = max(im.size[0] for row in rows for im in row)
    cell_h = max(im.size[1] for row in rows for im in row)
    out = Image.new("RGB", (len(rows[0]) * (cell_w + gap) - gap, len(rows) * (cell_h + gap) - gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            out.paste(im.convert("RGB"), (c * (cell_w + gap), r * (cell_h + gap)))
    return out
