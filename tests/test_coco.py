"""COCO val2014 reader on a tiny COCO-format fixture made here: captions,
deterministic sampling, reference preprocessing, cached reference statistics."""

import json
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from imagen_jax.evaluation import coco, fid, inception

# image id -> (size (W, H), mode, format, captions)
_IMAGES = {
    42: ((30, 10), "RGB", "PNG", ["A red, green and blue flag. ", "Three stripes"]),
    7: ((20, 40), "RGB", "PNG", ["A tall picture\n"]),
    9: ((16, 16), "L", "PNG", ["grey square", "a gray tile", "noise"]),
    100: ((25, 18), "RGBA", "PNG", ["with alpha"]),
    3: ((33, 21), "RGB", "JPEG", ["last one", "final"]),
}


def _make_image(image_id, size, mode):
    w, h = size
    if image_id == 42:  # thirds: red | green | blue, so the centre crop is pure green
        a = np.zeros((h, w, 3), np.uint8)
        a[:, :10, 0] = 255
        a[:, 10:20, 1] = 255
        a[:, 20:, 2] = 255
        return Image.fromarray(a)
    rng = np.random.default_rng(image_id)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a.squeeze(-1) if channels == 1 else a, mode)


@pytest.fixture
def coco_dir(tmp_path):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    images, annotations = [], []
    ann_id = 1000
    for image_id, (size, mode, fmt, captions) in _IMAGES.items():
        name = f"COCO_val2014_{image_id:012d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        _make_image(image_id, size, mode).save(root / "val2014" / name, format=fmt)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        for c in captions:
            annotations.append({"id": ann_id, "image_id": image_id, "caption": c})
            ann_id += 1
    annotations.reverse()  # file order must not matter
    (root / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(root)


def test_load_captions(coco_dir):
    caps = coco.load_captions(coco_dir)
    assert len(caps) == sum(len(v[3]) for v in _IMAGES.values())
    assert [c.image_id for c in caps] == sorted(c.image_id for c in caps)
    first = [c for c in caps if c.image_id == 42]
    assert [c.caption for c in first] == ["A red, green and blue flag.", "Three stripes"]
    assert first[0].file_name == "COCO_val2014_000000000042.png"
    assert coco.list_images(coco_dir)[0] == (3, "COCO_val2014_000000000003.jpg")


def test_annotations_folder_layout(coco_dir):
    os.makedirs(os.path.join(coco_dir, "annotations"))
    os.rename(os.path.join(coco_dir, "captions_val2014.json"),
              os.path.join(coco_dir, "annotations", "captions_val2014.json"))
    assert len(coco.load_captions(coco_dir)) == 9


def test_sample_captions_deterministic(coco_dir, tmp_path):
    caps = coco.load_captions(coco_dir)
    a = coco.sample_captions(caps, 4, seed=123)
    assert a == coco.sample_captions(caps, 4, seed=123)
    assert a.seed == 123 and len(a.texts) == 4 and list(a.indices) == sorted(a.indices)
    assert any(coco.sample_captions(caps, 4, seed=s).indices != a.indices for s in range(5))
    d = coco.sample_captions(caps, 5, seed=0, distinct_images=True)
    assert sorted(c.image_id for c in d.captions) == sorted(_IMAGES)
    path = tmp_path / "prompts.json"
    a.save(path)
    assert coco.CaptionSample.load(path) == a
    with pytest.raises(ValueError, match="asked for 10 captions, but only 9"):
        coco.sample_captions(caps, 10, seed=0)
    with pytest.raises(ValueError, match="only 5 images"):
        coco.sample_captions(caps, 6, seed=0, distinct_images=True)


def test_reference_images_preprocessed(coco_dir):
    imgs = list(coco.iter_reference_images(coco_dir, size=12))
    assert len(imgs) == 5
    assert all(x.shape == (12, 12, 3) and x.dtype == np.uint8 for x in imgs)
    # Sorted by id: 3, 7, 9, 42, 100. Image 42 (30x10) crops to its green middle third.
    flag = list(coco.iter_reference_images(coco_dir, size=10, image_ids=[42]))[0]
    assert flag.shape == (10, 10, 3)
    assert np.all(flag == np.array([0, 255, 0], np.uint8))
    # Same crop + BICUBIC as done by hand with PIL.
    with Image.open(os.path.join(coco_dir, "val2014", "COCO_val2014_000000000007.png")) as im:
        expected = np.asarray(im.convert("RGB").crop((0, 10, 20, 30)).resize((12, 12), Image.BICUBIC))
    np.testing.assert_array_equal(imgs[1], expected)
    # count + seed picks a deterministic subset.
    some = list(coco.iter_reference_images(coco_dir, size=8, count=2, seed=5))
    again = list(coco.iter_reference_images(coco_dir, size=8, count=2, seed=5))
    assert len(some) == 2 and all(np.array_equal(x, y) for x, y in zip(some, again))


def test_bad_sources(coco_dir, tmp_path):
    with pytest.raises(ValueError, match=r"has only 5 reference images, but count=6"):
        list(coco.iter_reference_images(coco_dir, size=8, count=6))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        coco.load_captions(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        coco.load_captions(str(tmp_path / "empty"))
    os.remove(os.path.join(coco_dir, "val2014", "COCO_val2014_000000000009.png"))
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000009.png"):
        list(coco.iter_reference_images(coco_dir, size=8))


def _fake_features(calls):
    def features(params, images, **kw):
        calls.append(len(images))
        x = images.astype(np.float32).reshape(len(images), -1)
        return np.concatenate([x.mean(1, keepdims=True), x.std(1, keepdims=True), x[:, :2]], axis=1)
    return features


def test_reference_statistics_cached(coco_dir, tmp_path, monkeypatch):
    # The Inception itself is tested in test_inception.py; a cheap stand-in keeps this fast.
    calls = []
    monkeypatch.setattr(inception, "features", _fake_features(calls))
    params = {"w": np.ones(3, np.float32)}
    cache = tmp_path / "cache"
    mu, sigma = coco.reference_statistics(coco_dir, params, cache, count=4, size=8, batch_size=3)
    assert calls == [3, 1] and mu.shape == (4,) and sigma.shape == (4, 4)
    feats = np.concatenate([_fake_features([])(None, np.stack(list(
        coco.iter_reference_images(coco_dir, size=8, count=4, seed=0))))])
    np.testing.assert_allclose(mu, fid.statistics(feats)[0])

    again = coco.reference_statistics(coco_dir, params, cache, count=4, size=8, batch_size=3)
    assert calls == [3, 1]  # served from the cache
    assert np.array_equal(again[0], mu)
    (file,) = [f for f in os.listdir(cache) if f.endswith(".npz")]  # and its features, kept beside it
    meta = fid.load_statistics_meta(cache / file)
    assert meta["count"] == "4" and meta["size"] == "8" and meta["num_images"] == "4"

    coco.reference_statistics(coco_dir, params, cache, count=None, size=8)  # another key
    coco.reference_statistics(coco_dir, params, cache, count=4, size=16)
    coco.reference_statistics(coco_dir, {"w": np.zeros(3, np.float32)}, cache, count=4, size=8)
    assert len([f for f in os.listdir(cache) if f.endswith(".npz")]) == 4

    calls.clear()
    with pytest.raises(ValueError, match=r"coco.*has only 5 reference images, but count=50"):
        coco.reference_statistics(coco_dir, params, cache, count=50, size=8)
    assert calls == []  # failed before computing anything


def _fake_tfds(coco_dir):
    """A stand-in for tensorflow_datasets' coco_captions with our fixture's content."""
    data = json.load(open(os.path.join(coco_dir, "captions_val2014.json")))
    by_id = {}
    for a in data["annotations"]:
        by_id.setdefault(a["image_id"], []).append(a)
    examples = []
    for im in sorted(data["images"], key=lambda im: -im["id"]):
        with Image.open(os.path.join(coco_dir, "val2014", im["file_name"])) as pil:
            arr = np.asarray(pil.convert("RGB"))
        anns = sorted(by_id[im["id"]], key=lambda a: a["id"])
        examples.append({
            "image": arr, "image/id": np.int64(im["id"]),
            "image/filename": im["file_name"].encode(),
            "captions": {"id": np.array([a["id"] for a in anns]),
                         "text": np.array([a["caption"].encode() for a in anns], dtype=object)},
        })
    splits = {"val": examples[:2], "test": examples[2:3], "restval": examples[3:], "train": []}
    seen = []

    def load(name, split, data_dir=None, shuffle_files=False, decoders=None):
        seen.append((name, split, data_dir))
        if decoders:
            return [{**ex, "image": b"<encoded>"} for ex in splits[split]]
        return splits[split]

    mod = types.SimpleNamespace(load=load, as_numpy=lambda ds: iter(ds),
                                decode=types.SimpleNamespace(SkipDecoding=lambda: "skip"))
    return mod, seen


def test_tfds_source(coco_dir, monkeypatch):
    fake, seen = _fake_tfds(coco_dir)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    src = "tfds:coco_captions"
    assert coco.load_captions(src, data_dir="/d") == coco.load_captions(coco_dir)
    assert {s for _, s, _ in seen} == {"val", "test", "restval"} and seen[0][2] == "/d"
    assert coco.list_images(src) == coco.list_images(coco_dir)
    ours = {tuple(x.ravel()[:8]) for x in coco.iter_reference_images(src, size=8)}
    direct = {tuple(x.ravel()[:8]) for x in coco.iter_reference_images(coco_dir, size=8)}
    assert ours == direct


def test_tfds_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="tensorflow-datasets"):
        coco.load_captions("tfds:coco_captions")
