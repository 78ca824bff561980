"""Input pipelines and the embedded shapes dataset (imagen_jax/data)."""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import pipeline, shapes
from imagen_jax.data.pipeline import DatasetError, make_iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(stage, **data):
    c = importlib.import_module(f"configs.{stage}").get_config("tiny")
    c.data.update(data)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def to_uint8(x):
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- shapes dataset


def test_shapes_items_are_deterministic_and_any_size():
    a, b = shapes.ShapesDataset(seed=0, size=32), shapes.ShapesDataset(seed=0, size=32)
    for i in (0, 7, 123456):
        img, cap, attrs = a[i]
        img2, cap2, attrs2 = b[i]
        assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
        np.testing.assert_array_equal(img, img2)
        assert cap == cap2 and attrs == attrs2
    assert a[1][1] != shapes.ShapesDataset(seed=1, size=32)[1][1] or \
        not np.array_equal(a[1][0], shapes.ShapesDataset(seed=1, size=32)[1][0])
    assert shapes.ShapesDataset(size=37)[3][0].shape == (37, 37, 3)
    # The same example at two sizes is the same picture.
    big = shapes.ShapesDataset(size=64)[5][0]
    small = np.asarray(Image.fromarray(big).resize((16, 16), Image.BOX))
    assert np.abs(small.astype(int) - shapes.ShapesDataset(size=16)[5][0]).mean() < 4
    with pytest.raises(IndexError):
        a[-1]


def test_shapes_captions_state_the_attributes():
    ds = shapes.ShapesDataset()
    kinds = set()
    for i in range(400):
        attrs, cap = ds.attributes(i)
        kinds.add(attrs["kind"])
        assert attrs["color"] in cap and cap in shapes.all_captions(attrs)
        if attrs["kind"] == "text":
            assert f'"{attrs["word"]}"' in cap
        else:
            assert attrs["shape"] in cap
    assert kinds == {"shape", "text"}
    text_share = np.mean([ds.attributes(i)[0]["kind"] == "text" for i in range(2000)])
    assert 0.07 < text_share < 0.13
    assert ds.captions(3, start=10) == [ds.attributes(i)[1] for i in (10, 11, 12)]


def test_held_out_pairs_never_in_training():
    ds = shapes.ShapesDataset()
    seen = set()
    for i in range(5000):
        attrs, _ = ds.attributes(i)
        if attrs["kind"] == "shape":
            seen.add((attrs["shape"], attrs["color"]))
    held = set(shapes.HELD_OUT)
    assert not seen & held
    assert len(seen) == len(shapes.SHAPES) * len(shapes.COLORS) - len(held)   # every other pair occurs
    prompts = shapes.held_out_prompts(12)
    assert len(prompts) == 12 and len(set(prompts)) > 6
    for k, p in enumerate(prompts):
        shape, color = shapes.HELD_OUT[k % len(shapes.HELD_OUT)]
        assert shape in p and shapes.caption_color(p) == color
    img, cap, attrs = ds.held_out_item(2)
    assert (attrs["shape"], attrs["color"]) == shapes.HELD_OUT[2] and cap == prompts[2]


@pytest.mark.parametrize("size", [16, 32, 64])
def test_color_scorer_is_exact_on_dataset_images(size):
    ds = shapes.ShapesDataset(seed=3, size=size)
    items = [ds[i] for i in range(300)] + [ds.held_out_item(i) for i in range(30)]
    images, captions = [it[0] for it in items], [it[1] for it in items]
    assert any(it[2]["kind"] == "text" for it in items)
    assert shapes.color_alignment(images, captions) == 1.0
    # It is a real test: pairing images with other captions scores near chance.
    assert shapes.color_alignment(images, captions[1:] + captions[:1]) < 0.4


def test_caption_color_and_scorer_edge_cases():
    assert shapes.caption_color('the word "HI" in blue on a white background') == "blue"
    assert shapes.caption_color('the word "RED" in green') == "green"       # quoted text is not the colour
    assert shapes.caption_color("a large purple circle at the top") == "purple"
    assert shapes.caption_color("a cat on a white background") is None
    blank = np.full((16, 16, 3), 255, np.uint8)
    assert shapes.dominant_color(blank) is None
    blank[4:12, 4:12] = shapes.COLORS["green"]
    assert shapes.dominant_color(blank) == "green"
    assert np.isnan(shapes.color_alignment([blank], ["a photo"]))
    with pytest.raises(ValueError, match="uint8"):
        shapes.dominant_color(blank.astype(np.float32))


# --------------------------------------------------------------------------- pipeline, shapes source


@pytest.mark.parametrize("stage,size,low", [("base64", 16, 0), ("sr256", 64, 16), ("sr1024", 32, 8)])
def test_batch_shapes_ranges_dtypes(stage, size, low):
    batch = next(make_iterator(tiny(stage), global_batch=8))
    assert set(batch) == ({"image", "captions", "lowres"} if low else {"image", "captions"})
    assert batch["image"].shape == (8, size, size, 3) and batch["image"].dtype == np.float32
    assert batch["captions"].shape == (8,) and batch["captions"].dtype.kind == "U"
    arrays = [batch["image"]] + ([batch["lowres"]] if low else [])
    if low:
        assert batch["lowres"].shape == (8, low, low, 3) and batch["lowres"].dtype == np.float32
    for x in arrays:
        assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.5 and x.max() > 0.5


def test_determinism_and_exact_resume():
    c = tiny("sr1024")
    run = take(make_iterator(c, global_batch=8), 4)
    again = take(make_iterator(c, global_batch=8), 4)
    for a, b in zip(run, again):
        assert_batches_equal(a, b)
    resumed = take(make_iterator(c, global_batch=8, start_step=2), 2)
    assert_batches_equal(resumed[0], run[2])
    assert_batches_equal(resumed[1], run[3])
    assert not np.array_equal(run[0]["image"], run[1]["image"])
    c.seed = 1
    assert not np.array_equal(next(make_iterator(c, global_batch=8))["image"], run[0]["image"])


def test_hosts_split_the_global_batch():
    c = tiny("sr256")
    whole = take(make_iterator(c, global_batch=8), 2)
    hosts = [take(make_iterator(c, global_batch=8, process_index=p, process_count=2, start_step=0), 2)
             for p in (0, 1)]
    for step in range(2):
        h0, h1 = hosts[0][step], hosts[1][step]
        assert h0["image"].shape[0] == h1["image"].shape[0] == 4
        for k in whole[step]:
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), whole[step][k])
        assert not any(np.array_equal(a, b) for a in h0["image"] for b in h1["image"])


def test_sr_lowres_is_the_downsampled_image():
    batch = next(make_iterator(tiny("sr256"), global_batch=4))
    for hi, low in zip(batch["image"], batch["lowres"]):
        ref = np.asarray(Image.fromarray(to_uint8(hi)).resize((16, 16), Image.BICUBIC))
        assert np.abs(ref.astype(int) - to_uint8(low)).max() <= 1


def test_sr1024_lowres_crop_matches_the_image_crop():
    """Find each crop inside an independently rendered 256 image; its lowres must be the same
    region of that image resized to 64, and look like the crop downsampled."""
    c = tiny("sr1024")
    batch = next(make_iterator(c, global_batch=8))
    ds = shapes.ShapesDataset(seed=c.seed, size=256)
    offsets = set()
    for i, (hi, low) in enumerate(zip(batch["image"], batch["lowres"])):
        full = ds[i][0]
        crop = to_uint8(hi)
        hits = [(y, x) for y in range(0, 256 - 32 + 1, 4) for x in range(0, 256 - 32 + 1, 4)
                if np.array_equal(full[y:y + 32, x:x + 32], crop)]
        assert hits, f"example {i}: the crop is not a 4-aligned window of the full image"
        small = np.asarray(Image.fromarray(full).resize((64, 64), Image.BICUBIC))
        assert any(np.array_equal(small[y // 4:y // 4 + 8, x // 4:x // 4 + 8], to_uint8(low)) for y, x in hits)
        offsets.update(hits)
        down = np.asarray(Image.fromarray(crop).resize((8, 8), Image.BICUBIC)).astype(float)
        assert np.abs(down - to_uint8(low)).mean() < 12
    assert len(offsets) > 2   # crops are random


def test_shapes_source_needs_no_tensorflow():
    code = ("import sys, importlib; from imagen_jax.data import make_iterator; "
            "c = importlib.import_module('configs.sr256').get_config('tiny'); "
            "next(make_iterator(c, global_batch=2)); assert 'tensorflow' not in sys.modules, 'tf imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="global_batch=6.*process_count=4"):
        make_iterator(tiny("base64"), global_batch=6, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        make_iterator(tiny("base64"), global_batch=8, process_index=2, process_count=2)
    with pytest.raises(DatasetError, match="'nope'"):
        make_iterator(tiny("base64", source="nope"), global_batch=8)
    bad = tiny("sr1024")
    bad.diffusion.lowres_size = 48
    with pytest.raises(ValueError, match="full_size"):
        make_iterator(bad, global_batch=8)


def test_missing_datasets_raise_dataset_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DatasetError, match="no_such_dataset_xyz"):
        make_iterator(tiny("base64", source="tfds", name="no_such_dataset_xyz", data_dir=str(tmp_path)),
                      global_batch=8)
    missing = str(tmp_path / "missing")
    with pytest.raises(DatasetError, match="missing"):
        make_iterator(tiny("base64", source="tfds", name="imagen_shapes/tiny", data_dir=missing), global_batch=8)
    pattern = str(tmp_path / "none-*.tfrecord")
    with pytest.raises(DatasetError, match="none-"):
        make_iterator(tiny("base64", source="tfrecord", files=pattern), global_batch=8)
    assert issubclass(DatasetError, ValueError)


# --------------------------------------------------------------------------- tfrecord source


def test_tfrecord_round_trip(tmp_path):
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    examples = []
    for i in range(12):
        img = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)   # not square: centre crop
        examples.append({"image": img, "caption": [f"caption {i}", f"other {i}"],
                         "embedding": np.full((5, 3), i, np.float32), "mask": np.arange(5) < i % 5})
    paths = pipeline.write_tfrecords(str(tmp_path / "train.tfrecord"), examples, num_shards=3)
    assert len(paths) == 3 and all(os.path.exists(p) for p in paths)
    c = tiny("sr256", source="tfrecord", files=str(tmp_path / "train.tfrecord-*"), shuffle_buffer=1)
    c.data.image_size, c.diffusion.lowres_size = 16, 8
    batches = take(make_iterator(c, global_batch=4), 3)       # one epoch (no shuffle buffer)
    seen = set()
    for batch in batches:
        assert batch["embeddings"].shape == (4, 5, 3) and batch["mask"].dtype == bool
        for k, cap in enumerate(batch["captions"]):
            i = int(cap.split()[-1])
            seen.add(i)
            ref = pipeline.resize_with_crop(examples[i]["image"], 16)
            np.testing.assert_allclose(batch["image"][k], ref / 127.5 - 1.0, atol=1e-6)
            assert batch["lowres"][k].shape == (8, 8, 3)
            np.testing.assert_array_equal(batch["embeddings"][k], examples[i]["embedding"])
            np.testing.assert_array_equal(batch["mask"][k], examples[i]["mask"])
    assert seen == set(range(12))
    c.data.shuffle_buffer = 8
    batches = take(make_iterator(c, global_batch=4), 3)
    again = take(make_iterator(c, global_batch=4, start_step=1), 2)
    assert_batches_equal(again[0], batches[1])
    assert_batches_equal(again[1], batches[2])
    # Two hosts read disjoint files.
    host_caps = [[cap for b in take(make_iterator(c, global_batch=4, process_index=p, process_count=2), 3)
                  for cap in b["captions"]] for p in (0, 1)]
    ids = [{int(x.split()[-1]) for x in h} for h in host_caps]
    assert not ids[0] & ids[1]


# --------------------------------------------------------------------------- tfds source


@pytest.fixture(scope="module")
def shapes_tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    from imagen_jax.data import shapes_tfds  # noqa: F401  (registers imagen_shapes)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("imagen_shapes/tiny", data_dir=data_dir).download_and_prepare()
    return data_dir


def test_tfds_source_over_the_shapes_builder(shapes_tfds_dir):
    c = tiny("sr256", source="tfds", name="imagen_shapes/tiny", data_dir=shapes_tfds_dir,
             caption_key="captions/text", shuffle_buffer=16)
    run = take(make_iterator(c, global_batch=8), 3)
    assert run[0]["image"].shape == (8, 64, 64, 3) and run[0]["lowres"].shape == (8, 16, 16, 3)
    assert run[0]["image"].dtype == np.float32 and -1.0 <= run[0]["image"].min() < run[0]["image"].max() <= 1.0
    # Every caption is one of the templates of a training example, chosen per example.
    ds = shapes.ShapesDataset(size=64)
    templates = {cap for i in range(64) for cap in shapes.all_captions(ds.attributes(i)[0])}
    assert all(cap in templates for b in run for cap in b["captions"])
    # The images are the dataset's (PNG round trip is lossless) and the colours match.
    images = [to_uint8(x) for b in run for x in b["image"]]
    assert shapes.color_alignment(images, [cap for b in run for cap in b["captions"]]) == 1.0
    resumed = take(make_iterator(c, global_batch=8, start_step=1), 2)
    assert_batches_equal(resumed[0], run[1])
    assert_batches_equal(resumed[1], run[2])


def test_tfds_hosts_read_disjoint_shares(shapes_tfds_dir):
    c = tiny("base64", source="tfds", name="imagen_shapes/tiny", data_dir=shapes_tfds_dir,
             caption_key="caption", shuffle_buffer=1)
    c.data.image_size = 64                      # no resize: images compare exactly
    keys = []
    for p in (0, 1):
        batches = take(make_iterator(c, global_batch=8, process_index=p, process_count=2), 8)   # 32 each
        keys.append({x.tobytes() for b in batches for x in b["image"]})
    assert len(keys[0]) == len(keys[1]) == 32
    assert not keys[0] & keys[1]
    ds = shapes.ShapesDataset(size=64)
    train = {(ds[i][0].astype(np.float32) / 127.5 - 1.0).tobytes() for i in range(64)}
    assert keys[0] | keys[1] == train


# --------------------------------------------------------------------------- O(1) resume (issue 14)


def test_index_shuffle_is_a_bijection_for_any_size():
    from imagen_jax.data.records import index_shuffle
    for n in (1, 2, 3, 12, 1000, 4097):
        perm = index_shuffle(np.arange(n), n, [0, 1])
        assert sorted(perm.tolist()) == list(range(n))
    a, b = index_shuffle(np.arange(1000), 1000, [0, 1]), index_shuffle(np.arange(1000), 1000, [0, 2])
    assert (a != np.arange(1000)).mean() > 0.9 and (a != b).mean() > 0.9  # shuffled, and anew each epoch
    big = index_shuffle(np.array([0, 10**11]), 2 * 10**12, [0, 0])  # no table: O(1) per index
    assert big.max() < 2 * 10**12


@pytest.fixture(scope="module")
def record_set(tmp_path_factory):
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(1)
    examples = [{"image": rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8), "caption": [f"caption {i}"]}
                for i in range(12)]
    root = tmp_path_factory.mktemp("records")
    pipeline.write_tfrecords(str(root / "train.tfrecord"), examples, num_shards=3)
    c = tiny("base64", source="tfrecord", files=str(root / "train.tfrecord-*"), prefetch=0)
    c.data.image_size = 8
    return c


def _ids(batch):
    return [int(c.split()[-1]) for c in batch["captions"]]


def test_tfrecord_resumes_at_a_late_step_in_constant_time(record_set, monkeypatch):
    import time

    from imagen_jax.data import records
    reads = []
    original = records.RecordSource.read
    monkeypatch.setattr(records.RecordSource, "read", lambda self, i: reads.append(i) or original(self, i))
    # Uninterrupted: three epochs of 12 records at 4 a step; each epoch is a fresh permutation.
    straight = take(make_iterator(record_set, global_batch=4), 9)
    epochs = [sum((_ids(b) for b in straight[e * 3:(e + 1) * 3]), []) for e in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs) and epochs[0] != epochs[1] != epochs[2]
    for k in (1, 5, 8):  # resumed at any step: the same batches
        assert_batches_equal(next(make_iterator(record_set, global_batch=4, start_step=k)), straight[k])

    late = 10**6 - 1  # an epoch starts here (10^6 - 1 steps x 4 = 333,333 epochs of 12)
    reads.clear()
    t0 = time.perf_counter()
    it = make_iterator(record_set, global_batch=4, start_step=late)
    first = next(it)
    seconds = time.perf_counter() - t0
    assert len(reads) == 1 + 4  # the format probe + this batch's 4 records: nothing skipped is read
    assert seconds < 5.0, seconds
    resumed = [first] + take(it, 2)
    assert sorted(sum((_ids(b) for b in resumed), [])) == list(range(12))  # a whole epoch, once each
    # Exactly the batches an uninterrupted run yields there (one started a few steps before and run on).
    before = take(make_iterator(record_set, global_batch=4, start_step=late - 3), 6)
    for a, b in zip(resumed, before[3:]):
        assert_batches_equal(a, b)

    # Two processes read disjoint halves of that global batch, whatever the host count.
    hosts = [next(make_iterator(record_set, global_batch=4, process_index=p, process_count=2, start_step=late))
             for p in (0, 1)]
    assert not set(_ids(hosts[0])) & set(_ids(hosts[1]))
    assert _ids(hosts[0]) + _ids(hosts[1]) == _ids(first)
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in hosts]), first["image"])


def test_tfrecord_source_without_sidecar_scans_headers(record_set, tmp_path):
    import glob
    import shutil

    from imagen_jax.data import records
    for f in glob.glob(record_set.data.files):
        if not f.endswith(records.SIDECAR):
            shutil.copy(f, tmp_path)
    c = record_set.copy_and_resolve_references()
    c.data.files = str(tmp_path / "train.tfrecord-*")
    assert_batches_equal(next(make_iterator(c, global_batch=4, start_step=7)),
                         next(make_iterator(record_set, global_batch=4, start_step=7)))
    f = sorted(glob.glob(c.data.files))[0]
    np.testing.assert_array_equal(records.scan_offsets(f), np.load(os.path.join(
        os.path.dirname(record_set.data.files), os.path.basename(f) + records.SIDECAR)))


def test_tfds_resumes_at_a_late_step_without_reading_skipped_records(shapes_tfds_dir, monkeypatch):
    from imagen_jax.data import records
    c = tiny("base64", source="tfds", name="imagen_shapes/tiny", data_dir=shapes_tfds_dir, caption_key="caption",
             prefetch=0)
    reads = []
    original = records.RecordSource.read
    monkeypatch.setattr(records.RecordSource, "read", lambda self, i: reads.append(i) or original(self, i))
    late = 10**6
    resumed = next(make_iterator(c, global_batch=8, start_step=late))
    assert len(reads) == 8  # this batch's records only
    straight = take(make_iterator(c, global_batch=8, start_step=late - 2), 3)
    assert_batches_equal(resumed, straight[2])
    hosts = [next(make_iterator(c, global_batch=8, process_index=p, process_count=2, start_step=late))
             for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in hosts]), resumed["image"])
