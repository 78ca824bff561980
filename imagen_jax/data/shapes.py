"""The embedded "shapes" dataset: captioned images generated on the fly, no download.

Example `i` is a pure function of `(seed, i)`: a numpy Generator seeded with `[seed, i, stream]`
draws the attributes, the caption template and small jitters, and PIL draws the picture at 4x
the requested side (at least 64 px; 2x above 256 px) and box-filters it down, so edges are anti-aliased and every
edge pixel is an exact blend of the shape colour and the background.

* 90% are one coloured shape: kind (circle, square, triangle, star, diamond, hexagon), colour
  (`COLORS`: red, orange, yellow, green, cyan, blue, purple), size (small, large), position (left,
  right, top, bottom, center), plain background (white, black, gray), e.g.
  "a large red circle on the left, on a white background".
* 10% are a rendered word in PIL's built-in default font, e.g.
  'the word "HI" in blue on a white background' (a tiny text-in-image test).

Held out (for compositional generalisation tests): the (shape, colour) pairs in `HELD_OUT`
(purple circle, orange square, cyan triangle, blue star, red diamond, green hexagon) never occur
at any training index; `held_out_prompts(n)` captions them and `ShapesDataset.held_out_item(i)`
renders them. Every shape and every colour still occurs in training with the other partners.

Text alignment can be scored exactly on this data: `dominant_color` estimates the background
from the image border and assigns each other pixel to the palette colour whose
background->colour blend line passes closest, weighted by the blend fraction;
`color_alignment` is the share of images whose dominant colour is the caption's colour.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLORS", "BACKGROUNDS", "SHAPES", "SIZES", "POSITIONS", "WORDS", "HELD_OUT",
    "ShapesDataset", "all_captions", "render", "held_out_prompts", "dominant_color", "caption_color", "color_alignment",
]

# Shape / text colours; far apart in RGB and from every background (the scorer relies on it).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "orange": (255, 130, 0),
    "yellow": (240, 220, 0),
    "green": (20, 160, 40),
    "cyan": (0, 190, 210),
    "blue": (20, 50, 220),
    "purple": (130, 30, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SIZES = {"small": 0.12, "large": 0.24}            # half-extent, as a fraction of the image side
POSITIONS = {                                     # centre (x, y), fractions of the image side
    "left": (0.30, 0.50), "right": (0.70, 0.50), "top": (0.50, 0.30), "bottom": (0.50, 0.70),
    "center": (0.50, 0.50),
}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
# No colour names among the words, so a caption's colour is never ambiguous.
WORDS = ("HI", "OK", "GO", "UP", "YES", "NO", "CAT", "DOG", "SUN", "JAX", "ART", "FUN", "ZOO",
         "BOX", "MAP", "KEY")
# (shape, colour) pairs never produced at training indices: one per shape, each colour at most once.
HELD_OUT = (("circle", "purple"), ("square", "orange"), ("triangle", "cyan"), ("star", "blue"),
            ("diamond", "red"), ("hexagon", "green"))

TEXT_FRACTION = 0.1
_TRAIN_STREAM, _HELD_OUT_STREAM = 0, 1
_SHAPE_TEMPLATES = (
    "a {size} {color} {shape} {pos}, on a {bg} background",
    "a {color} {shape} {pos} on a {bg} background",
    "a {size} {color} {shape} on {bg}",
    "a {color} {shape}",
)
_SHAPE_TEMPLATE_P = (0.4, 0.2, 0.2, 0.2)
_TEXT_TEMPLATES = (
    'the word "{word}" in {color} on a {bg} background',
    'the text "{word}" in {color} letters on {bg}',
)
_AN = re.compile(r"\ba (?=[aeiou])")   # "a orange star" -> "an orange star"
_ALLOWED = {s: tuple(c for c in COLORS if (s, c) not in HELD_OUT) for s in SHAPES}


# --------------------------------------------------------------------------- sampling


def _shape_attrs(rng: np.random.Generator, shape: str, color: str) -> dict[str, Any]:
    size = ("small", "large")[rng.integers(2)]
    position = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    cx, cy = POSITIONS[position]
    jx, jy = rng.uniform(-0.03, 0.03, size=2)
    return dict(kind="shape", shape=shape, color=color, size=size, position=position,
                background=background, center=(float(cx + jx), float(cy + jy)),
                radius=float(SIZES[size] * rng.uniform(0.92, 1.08)),
                rotation=0.0 if shape == "circle" else float(rng.uniform(-10.0, 10.0)))


def _text_attrs(rng: np.random.Generator) -> dict[str, Any]:
    word = WORDS[rng.integers(len(WORDS))]
    color = tuple(COLORS)[rng.integers(len(COLORS))]
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    jx, jy = rng.uniform(-0.04, 0.04, size=2)
    return dict(kind="text", word=word, color=color, background=background,
                center=(float(0.5 + jx), float(0.5 + jy)))


def all_captions(attrs: dict[str, Any]) -> list[str]:
    """Every caption template filled in for one example's attributes (the first is the fullest)."""
    if attrs["kind"] == "text":
        return [t.format(word=attrs["word"], color=attrs["color"], bg=attrs["background"])
                for t in _TEXT_TEMPLATES]
    fields = dict(size=attrs["size"], color=attrs["color"], shape=attrs["shape"],
                  pos=POSITION_PHRASES[attrs["position"]], bg=attrs["background"])
    return [_AN.sub("an ", t.format(**fields)) for t in _SHAPE_TEMPLATES]


def _sample(seed: int, index: int, stream: int) -> tuple[dict[str, Any], str]:
    if index < 0:
        raise IndexError(f"shapes index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index, stream])
    if stream == _HELD_OUT_STREAM:
        shape, color = HELD_OUT[index % len(HELD_OUT)]
        attrs = _shape_attrs(rng, shape, color)
        return attrs, all_captions(attrs)[0]
    if rng.uniform() < TEXT_FRACTION:
        attrs = _text_attrs(rng)
        captions = all_captions(attrs)
        return attrs, captions[rng.integers(len(captions))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    allowed = _ALLOWED[shape]
    color = allowed[rng.integers(len(allowed))]
    attrs = _shape_attrs(rng, shape, color)
    caption = all_captions(attrs)[rng.choice(len(_SHAPE_TEMPLATES), p=_SHAPE_TEMPLATE_P)]
    return attrs, caption


# --------------------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, r: float, rotation_deg: float) -> list[tuple[float, float]]:
    """Vertices in pixels of a shape whose bounding half-extent is about r."""
    if shape == "square":
        pts = [(-0.88, -0.88), (0.88, -0.88), (0.88, 0.88), (-0.88, 0.88)]
    elif shape == "triangle":   # equilateral, pointing up, vertically centred on its bounding box
        pts = [(math.cos(a), math.sin(a) + 0.25) for a in np.deg2rad([-90.0, 30.0, 150.0])]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.48) * math.cos(a), (1.0 if k % 2 == 0 else 0.48) * math.sin(a))
               for k, a in enumerate(np.deg2rad(-90.0 + 36.0 * np.arange(10)))]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad(60.0 * np.arange(6))]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    return [(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in pts]


def _text_mask(word: str, canvas: int, center: tuple[float, float]) -> Image.Image:
    """'L' mask of the word, about 80% of the canvas wide, drawn with PIL's built-in font."""
    mask = Image.new("L", (canvas, canvas), 0)
    try:   # Pillow >= 10.1 with FreeType: the bundled scalable default font
        probe = ImageFont.load_default(size=100)
        x0, y0, x1, y1 = probe.getbbox(word)
        size = max(4, int(100 * min(0.8 * canvas / (x1 - x0), 0.5 * canvas / (y1 - y0))))
        font = ImageFont.load_default(size=size)
        x0, y0, x1, y1 = font.getbbox(word)
        ImageDraw.Draw(mask).text((center[0] * canvas - (x0 + x1) / 2, center[1] * canvas - (y0 + y1) / 2),
                                  word, fill=255, font=font)
        return mask
    except (TypeError, ImportError, OSError, AttributeError):
        pass
    # Bitmap fallback: draw at the font's native size and scale the mask up.
    font = ImageFont.load_default()
    x0, y0, x1, y1 = ImageDraw.Draw(mask).textbbox((0, 0), word, font=font)
    small = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 0)
    ImageDraw.Draw(small).text((1 - x0, 1 - y0), word, fill=255, font=font)
    scale = min(0.8 * canvas / small.width, 0.5 * canvas / small.height)
    big = small.resize((max(1, round(small.width * scale)), max(1, round(small.height * scale))),
                       Image.BILINEAR)
    mask.paste(big, (round(center[0] * canvas - big.width / 2), round(center[1] * canvas - big.height / 2)))
    return mask


def render(attrs: dict[str, Any], size: int) -> np.ndarray:
    """Draws one example's attributes as uint8 [size, size, 3] (anti-aliased by box filtering)."""
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    factor = max(4, -(-64 // size)) if size <= 256 else 2   # 2x suffices at 512+ and is 4x cheaper
    canvas = size * factor
    img = Image.new("RGB", (canvas, canvas), BACKGROUNDS[attrs["background"]])
    color = COLORS[attrs["color"]]
    cx, cy = attrs["center"][0] * canvas, attrs["center"][1] * canvas
    if attrs["kind"] == "text":
        img.paste(color, (0, 0, canvas, canvas), _text_mask(attrs["word"], canvas, attrs["center"]))
    elif attrs["shape"] == "circle":
        r = attrs["radius"] * canvas
        ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        pts = _polygon(attrs["shape"], cx, cy, attrs["radius"] * canvas, attrs["rotation"])
        ImageDraw.Draw(img).polygon(pts, fill=color)
    return np.asarray(img.reduce(factor), dtype=np.uint8)


class ShapesDataset:
    """Unbounded deterministic dataset: `ds[i] -> (image uint8 [size, size, 3], caption, attributes)`.

    `seed` picks the whole sequence; any `i >= 0` is valid (there is no length).
    """

    def __init__(self, seed: int = 0, size: int = 64):
        if size < 1:
            raise ValueError(f"ShapesDataset size must be positive, got {size}")
        self.seed = int(seed)
        self.size = int(size)

    def attributes(self, index: int) -> tuple[dict[str, Any], str]:
        """(attributes, caption) of training example `index`, without drawing it."""
        return _sample(self.seed, int(index), _TRAIN_STREAM)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, dict[str, Any]]:
        attrs, caption = self.attributes(index)
        return render(attrs, self.size), caption, attrs

    def captions(self, n: int, start: int = 0) -> list[str]:
        """Captions of training examples [start, start + n)."""
        return [self.attributes(i)[1] for i in range(start, start + n)]

    def held_out_item(self, index: int) -> tuple[np.ndarray, str, dict[str, Any]]:
        """Example `index` of the held-out stream: a `HELD_OUT` (shape, colour) pair, never trained on."""
        attrs, caption = _sample(self.seed, int(index), _HELD_OUT_STREAM)
        return render(attrs, self.size), caption, attrs

    def held_out_prompts(self, n: int) -> list[str]:
        return [_sample(self.seed, i, _HELD_OUT_STREAM)[1] for i in range(n)]


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    """n captions of (shape, colour) pairs that training never shows (cycling through `HELD_OUT`)."""
    return ShapesDataset(seed).held_out_prompts(n)


# --------------------------------------------------------------------------- text alignment scorer

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], np.float32)   # [K, 3]
_MIN_CONTRAST = 32.0   # RGB distance below which a pixel counts as background


def dominant_color(image: np.ndarray) -> str | None:
    """Name of the dominant non-background `COLORS` colour of a uint8 [H, W, 3] image.

    The background is the median of the border pixels. Each pixel at least `_MIN_CONTRAST` away
    from it is assigned to the colour whose background->colour blend line passes closest, with
    weight its blend fraction (so anti-aliased edges count partially); the colour with the largest
    total weight wins. None when no pixel stands out from the background.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"dominant_color expects a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
    img = img[..., :3].astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    d = img.reshape(-1, 3) - bg                                   # [N, 3]
    d = d[np.linalg.norm(d, axis=-1) > _MIN_CONTRAST]
    v = _PALETTE - bg                                             # [K, 3]
    usable = np.linalg.norm(v, axis=-1) > _MIN_CONTRAST           # colours distinguishable from bg
    if d.shape[0] == 0 or not usable.any():
        return None
    t = np.clip(d @ v.T / np.maximum((v * v).sum(-1), 1.0), 0.0, 1.0)       # [N, K]
    resid = np.linalg.norm(d[:, None, :] - t[..., None] * v[None], axis=-1)  # [N, K]
    resid[:, ~usable] = np.inf
    k = resid.argmin(axis=1)
    scores = np.bincount(k, weights=t[np.arange(len(k)), k], minlength=len(_NAMES))
    return _NAMES[int(scores.argmax())]


_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")


def caption_color(caption: str) -> str | None:
    """First `COLORS` name in the caption outside quotes (quoted text is the word drawn), or None."""
    for word in re.findall(r"[a-z]+", _QUOTED.sub(" ", caption.lower())):
        if word in COLORS:
            return word
    return None


def color_alignment(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> float:
    """Share of images (uint8 [N, H, W, 3]) whose dominant colour is their caption's colour.

    Captions naming no colour are left out; NaN when none names one.
    """
    if len(images) != len(captions):
        raise ValueError(f"color_alignment got {len(images)} images but {len(captions)} captions")
    hits = total = 0
    for image, caption in zip(images, captions):
        want = caption_color(caption)
        if want is None:
            continue
        total += 1
        hits += dominant_color(image) == want
    return hits / total if total else float("nan")
