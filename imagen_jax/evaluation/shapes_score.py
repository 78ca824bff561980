"""Scores generated images against their shapes-dataset captions (imagen_jax/data/shapes.py), exactly.

Four attributes are read back from each image and compared with the caption:

* colour:      `shapes.dominant_color` (the palette colour most of the non-background pixels blend
               towards) is the caption's colour.
* background:  the median border pixel is nearest (RGB) to the caption's `BACKGROUNDS` colour.
* position:    the centroid of the shape is nearest to the caption's `POSITIONS` centre (i.e. it
               lies in that centre's Voronoi region of the five).
* shape:       template matching: each of the six `SHAPES` is drawn by the dataset's own renderer at
               the shape's centroid, scaled to its area, at rotations -10..10 degrees (the
               dataset's jitter); the shape whose template overlaps it best (soft IoU) must be the
               caption's shape.

"The shape" is the largest connected blob of the foreground (`shape_mask`): a caption draws one
shape, so isolated speckle a sampler leaves in the background is not part of it (on a render it
is the whole foreground). Read from the whole foreground instead, scattered speckle pulled the
centroid towards the image centre (2 of 16 demo samples changed region, issue 15).

Beside the four, `background_noise` measures the speckle a sampler leaves: the mean absolute
deviation (0-255, averaged over RGB) of the pixels away from the shape (outside its blob grown by
3 pixels) from the median border colour. A render of the dataset is flat there, i.e. 0.

Chance levels are 1 / (number of choices). A caption that does not name an attribute leaves that
attribute out for that image (e.g. "a red circle" has no position or background).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

from imagen_jax.data import shapes

ATTRIBUTES = ("color", "background", "position", "shape")
CHANCE = {"color": 1.0 / len(shapes.COLORS), "background": 1.0 / len(shapes.BACKGROUNDS),
          "position": 1.0 / len(shapes.POSITIONS), "shape": 1.0 / len(shapes.SHAPES)}
_ROTATIONS = (-10.0, -5.0, 0.0, 5.0, 10.0)
_MIN_CONTRAST = 32.0      # RGB distance below which a pixel counts as background (as shapes.dominant_color)
_MIN_FOREGROUND = 0.002   # share of the image the foreground must cover for position/shape to be read


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a shapes caption names: a subset of {color, background, position, shape, size}."""
    text = caption.lower()
    out: dict[str, str] = {}
    color = shapes.caption_color(caption)
    if color is not None:
        out["color"] = color
    m = re.search(r"\bon (?:a )?(" + "|".join(shapes.BACKGROUNDS) + r")\b(?: background)?", text)
    if m:
        out["background"] = m.group(1)
    for name, phrase in shapes.POSITION_PHRASES.items():
        if phrase in text:
            out["position"] = name
    words = set(re.findall(r"[a-z]+", shapes._QUOTED.sub(" ", text)))
    named = [s for s in shapes.SHAPES if s in words]
    if len(named) == 1:
        out["shape"] = named[0]
    for size in shapes.SIZES:
        if size in words:
            out["size"] = size
    return out


def background_of(image: np.ndarray) -> tuple[str, np.ndarray]:
    """(nearest `BACKGROUNDS` name, median border RGB) of a uint8 [H, W, 3] image."""
    img = _check(image).astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    names = tuple(shapes.BACKGROUNDS)
    dist = [np.linalg.norm(bg - np.asarray(shapes.BACKGROUNDS[n], np.float32)) for n in names]
    return names[int(np.argmin(dist))], bg


def foreground(image: np.ndarray) -> np.ndarray:
    """float32 [H, W] in [0, 1]: how far each pixel has blended from the background towards the
    palette colour it is closest to (1 inside a shape, fractional on anti-aliased edges)."""
    img = _check(image).astype(np.float32)
    _, bg = background_of(image)
    d = img.reshape(-1, 3) - bg
    v = np.asarray(list(shapes.COLORS.values()), np.float32) - bg            # [K, 3]
    t = np.clip(d @ v.T / np.maximum((v * v).sum(-1), 1.0), 0.0, 1.0)       # [N, K]
    resid = np.linalg.norm(d[:, None, :] - t[..., None] * v[None], axis=-1)
    k = resid.argmin(axis=1)
    frac = t[np.arange(len(k)), k]
    frac[np.linalg.norm(d, axis=-1) <= _MIN_CONTRAST] = 0.0
    return frac.reshape(img.shape[:2])


def shape_mask(mask: np.ndarray) -> np.ndarray:
    """The [H, W] foreground weights of the shape: the largest (by weight) 8-connected component of
    the pixels at least half-way to their colour, grown by one pixel to keep its anti-aliased rim;
    all zeros when no pixel is."""
    from scipy import ndimage

    labels, n = ndimage.label(mask >= 0.5, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros_like(mask)
    weight = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    blob = ndimage.binary_dilation(labels == 1 + int(np.argmax(weight)), structure=np.ones((3, 3)))
    return np.where(blob, mask, 0.0).astype(mask.dtype)


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """(x, y) as fractions of the image side of a [H, W] weight map; None when it is (nearly) empty."""
    h, w = mask.shape
    total = float(mask.sum())
    if total < _MIN_FOREGROUND * h * w:
        return None
    ys, xs = np.mgrid[0:h, 0:w]
    return (float((mask * (xs + 0.5)).sum() / total / w), float((mask * (ys + 0.5)).sum() / total / h))


def position_of(mask: np.ndarray) -> str | None:
    """The `POSITIONS` name whose centre is nearest the mask's centroid; None without a foreground."""
    c = centroid(mask)
    if c is None:
        return None
    names = tuple(shapes.POSITIONS)
    return names[int(np.argmin([math.dist(c, shapes.POSITIONS[n]) for n in names]))]


def _template(shape: str, size: int, center: tuple[float, float], radius: float, rotation: float) -> np.ndarray:
    attrs = dict(kind="shape", shape=shape, color="red", background="black", center=center,
                 radius=radius, rotation=rotation)
    return shapes.render(attrs, size)[..., 0].astype(np.float32) / shapes.COLORS["red"][0]


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Best soft IoU of the [S, S] foreground mask with each shape's template (centred on the
    mask's centroid, scaled to its area, best rotation); {} when there is no foreground."""
    size = mask.shape[0]
    c = centroid(mask)
    if c is None:
        return {}
    area = float(mask.sum()) / size ** 2    # fraction of the image
    out = {}
    for shape in shapes.SHAPES:
        # Unit-radius template area and centroid offset, measured on the renderer itself.
        ref = _template(shape, size, (0.5, 0.5), 0.25, 0.0)
        radius = 0.25 * math.sqrt(area / max(float(ref.sum()) / size ** 2, 1e-6))
        best = 0.0
        for rot in _ROTATIONS if shape != "circle" else (0.0,):
            probe = _template(shape, size, (0.5, 0.5), radius, rot)
            pc = centroid(probe) or (0.5, 0.5)
            tmpl = _template(shape, size, (c[0] + 0.5 - pc[0], c[1] + 0.5 - pc[1]), radius, rot)
            inter = np.minimum(tmpl, mask).sum()
            union = np.maximum(tmpl, mask).sum()
            best = max(best, float(inter / max(union, 1e-6)))
        out[shape] = best
    return out


def shape_of(mask: np.ndarray) -> str | None:
    scores = shape_scores(mask)
    return max(scores, key=scores.get) if scores else None


def background_noise(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean |pixel - background colour| (0-255, mean over RGB) away from the shape; `mask` is the
    image's `shape_mask` (computed when not given)."""
    from scipy import ndimage

    img = _check(image).astype(np.float32)
    if mask is None:
        mask = shape_mask(foreground(image))
    near = ndimage.binary_dilation(mask > 0, structure=np.ones((3, 3)), iterations=3)
    if near.all():
        return float("nan")
    _, bg = background_of(image)
    return float(np.abs(img[~near] - bg).mean())


def read_image(image: np.ndarray) -> dict[str, Any]:
    """Every attribute read back from one uint8 [H, W, 3] image (None where unreadable)."""
    mask = shape_mask(foreground(image))
    return {"color": shapes.dominant_color(image), "background": background_of(image)[0],
            "position": position_of(mask), "shape": shape_of(mask), "noise": background_noise(image, mask)}


@dataclasses.dataclass
class Scores:
    """Share of images right per attribute (NaN where no caption names it), with counts."""
    right: dict[str, float]
    counts: dict[str, int]
    all_right: float            # share of images with every named attribute right
    per_image: list[dict[str, Any]]
    noise: float = float("nan")  # mean `background_noise` (0-255) over the images

    def lines(self) -> list[str]:
        """Human-readable report lines, each with its chance level."""
        what = {"color": "shape colour is the prompt's colour",
                "background": "background is the prompt's (white/black/gray)",
                "position": "shape's centroid is in the prompt's region (left/right/top/bottom/center)",
                "shape": "template matching picks the prompt's shape (of 6)"}
        out = []
        for a in ATTRIBUTES:
            if self.counts[a]:
                out.append(f"  {a:<10} {self.right[a]:4.0%} right (chance {CHANCE[a]:.0%}): {what[a]}")
        out.append(f"  {'all four':<10} {self.all_right:4.0%} of images have every named attribute right")
        out.append(f"  {'speckle':<10} {self.noise:4.1f}/255 mean deviation of the background away from the shape "
                   f"(a flat render: 0)")
        return out


def score(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> Scores:
    """Scores uint8 images [N, H, W, 3] against their captions."""
    if len(images) != len(captions):
        raise ValueError(f"shapes_score.score got {len(images)} images but {len(captions)} captions")
    hits = {a: 0 for a in ATTRIBUTES}
    counts = {a: 0 for a in ATTRIBUTES}
    per_image, all_ok, noise = [], 0, []
    for image, caption in zip(images, captions):
        want, got = parse_caption(caption), read_image(image)
        ok = True
        row = {"caption": caption, "noise": got["noise"]}
        noise.append(got["noise"])
        for a in ATTRIBUTES:
            if a not in want:
                continue
            counts[a] += 1
            hit = got[a] == want[a]
            hits[a] += hit
            ok &= hit
            row[a] = {"want": want[a], "got": got[a], "right": bool(hit)}
        all_ok += ok
        per_image.append(row)
    right = {a: hits[a] / counts[a] if counts[a] else float("nan") for a in ATTRIBUTES}
    return Scores(right=right, counts=counts, all_right=all_ok / max(len(captions), 1), per_image=per_image,
                  noise=float(np.nanmean(noise)) if np.isfinite(noise).any() else float("nan"))


def _check(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"shapes_score expects a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
    return img[..., :3]
