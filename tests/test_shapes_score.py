"""The demo's scorer (imagen_jax/evaluation/shapes_score.py) on the renderer's own images: a render of
its caption scores 1 on every attribute; a render that changes one attribute scores 0 on that one only."""
import numpy as np
import pytest

from imagen_jax.data import shapes
from imagen_jax.evaluation import shapes_score as ss

SIZE = 32


def _items(n=12):
    ds = shapes.ShapesDataset(seed=0, size=SIZE)
    return [ds.held_out_item(i) for i in range(n)]


def _changed(attrs, key):
    """The same example with attribute `key` set to a different value."""
    a = dict(attrs)
    if key == "color":
        a["color"] = next(c for c in shapes.COLORS if c != attrs["color"])
    elif key == "background":
        a["background"] = next(b for b in shapes.BACKGROUNDS if b != attrs["background"])
    elif key == "position":
        a["position"] = "left" if attrs["position"] != "left" else "right"
        jx, jy = (attrs["center"][i] - shapes.POSITIONS[attrs["position"]][i] for i in (0, 1))
        cx, cy = shapes.POSITIONS[a["position"]]
        a["center"] = (cx + jx, cy + jy)
    elif key == "shape":
        a["shape"] = {"circle": "triangle", "square": "star", "triangle": "circle", "star": "square",
                      "diamond": "hexagon", "hexagon": "diamond"}[attrs["shape"]]
    return a


def test_parse_caption():
    got = ss.parse_caption("a small orange square on the left, on a black background")
    assert got == dict(color="orange", background="black", position="left", shape="square", size="small")
    assert ss.parse_caption("a red circle") == dict(color="red", shape="circle")
    assert ss.parse_caption("a large blue star on gray")["background"] == "gray"


def test_true_renders_score_one():
    items = _items()
    s = ss.score([x[0] for x in items], [x[1] for x in items])
    assert s.right == {a: 1.0 for a in ss.ATTRIBUTES}, s.per_image
    assert s.all_right == 1.0
    assert s.counts == {a: len(items) for a in ss.ATTRIBUTES}
    assert len(s.lines()) == 6 and "chance 14%" in s.lines()[0]
    assert s.noise == 0.0 and "speckle" in s.lines()[-1]


@pytest.mark.parametrize("key", ss.ATTRIBUTES)
def test_one_wrong_attribute_scores_zero_on_it_only(key):
    items = _items()
    images = [shapes.render(_changed(attrs, key), SIZE) for _, _, attrs in items]
    s = ss.score(images, [caption for _, caption, _ in items])
    assert s.right[key] == 0.0, s.per_image
    assert all(s.right[a] == 1.0 for a in ss.ATTRIBUTES if a != key), s.per_image
    assert s.all_right == 0.0


def test_blank_and_mismatched_inputs():
    blank = np.full((SIZE, SIZE, 3), 255, np.uint8)
    got = ss.read_image(blank)
    assert got == dict(color=None, background="white", position=None, shape=None, noise=0.0)
    with pytest.raises(ValueError, match="2 captions"):
        ss.score([blank], ["a red circle", "a blue star"])
    with pytest.raises(ValueError, match="uint8"):
        ss.read_image(blank.astype(np.float32))
    s = ss.score([blank], ["a red circle"])     # names no position or background: those are left out
    assert s.counts == dict(color=1, background=0, position=0, shape=1)
    assert s.right["color"] == 0.0 and s.right["shape"] == 0.0 and np.isnan(s.right["position"])


def test_speckle_does_not_move_the_shape():
    # Issue 15: isolated speckle pixels (a sampler's leftover noise) must not pull the centroid, the
    # area or the template match away from the one shape drawn; read from the whole foreground,
    # 50 speckles on the far side moved this small shape on the left to the centre.
    ds = shapes.ShapesDataset(seed=0, size=SIZE)
    i = next(i for i in range(200) if ds.held_out_item(i)[2]["position"] == "left"
             and ds.held_out_item(i)[2]["size"] == "small")
    image, caption, attrs = ds.held_out_item(i)
    noisy = image.copy()
    rng = np.random.default_rng(0)
    colours = np.asarray(list(shapes.COLORS.values()), np.uint8)
    ys, xs = np.mgrid[1:SIZE - 1:3, SIZE // 2 + 2:SIZE - 1:3]           # a lattice: no two speckles touch
    for y, x in zip(ys.ravel(), xs.ravel()):
        noisy[y, x] = colours[rng.integers(len(colours))]
    assert len(ys.ravel()) == 50
    assert ss.position_of(ss.foreground(noisy)) != "left"                # what the whole foreground says
    got = ss.read_image(noisy)
    assert got["position"] == "left" and got["shape"] == attrs["shape"], (got, caption)
    np.testing.assert_array_equal(ss.shape_mask(ss.foreground(image)), ss.foreground(image))


def test_background_noise_reads_the_speckle_level():
    """Gaussian speckle of std 12 on a flat background reads as its mean absolute deviation,
    12 * sqrt(2 / pi) = 9.57 (away from the clipping at 0 and 255: a gray background)."""
    rng = np.random.default_rng(0)
    items = [x for x in _items(40) if x[2]["background"] == "gray"][:4]
    assert items
    for image, _, _ in items:
        noisy = np.clip(image + rng.normal(0.0, 12.0, image.shape), 0, 255).round().astype(np.uint8)
        assert ss.background_noise(image) == 0.0
        assert abs(ss.background_noise(noisy) - 12.0 * np.sqrt(2 / np.pi)) < 0.6
