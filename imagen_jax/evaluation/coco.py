"""COCO 2014 validation set for zero-shot FID: captions, reference images, statistics.

Sources (the `source` argument everywhere):
  * a directory (local or gs://) laid out as COCO ships it:
        <root>/captions_val2014.json   (or <root>/annotations/captions_val2014.json)
        <root>/val2014/COCO_val2014_000000000042.jpg ...
    The JSON is COCO's: {"images": [{"id", "file_name", ...}],
    "annotations": [{"image_id", "caption", ...}]}.
  * "tfds:coco_captions" (optionally "tfds:coco_captions/2014"): TensorFlow
    Datasets' Karpathy re-split of COCO 2014; its val + test + restval splits
    together are the 40,504 val2014 images. TensorFlow is imported only here,
    and only when such a source is used.

Reference image preprocessing (the documented protocol): convert to RGB,
centre-crop to a square of side min(H, W) (offsets floor((W - side) / 2),
floor((H - side) / 2)), resize to size x size with PIL's BICUBIC filter
(PIL antialiases when shrinking), uint8 [size, size, 3]. Generated images
are compared at the same size.

Caption text is stripped of surrounding whitespace; nothing else is changed.
Which captions/images are used is decided by a seeded NumPy Generator
(`np.random.default_rng(seed)`), and the seed is stored with the sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from imagen_jax import paths

TFDS_PREFIX = "tfds:"
ANNOTATIONS_FILE = "captions_val2014.json"
IMAGE_DIR = "val2014"
TFDS_SPLITS = ("val", "test", "restval")  # together: all of COCO val2014
RESAMPLE = Image.BICUBIC
PREPROCESSING = "rgb,center-crop-square,resize-PIL-BICUBIC"


@dataclasses.dataclass(frozen=True)
class Caption:
    """One caption: the COCO image id, the text, and the image file name ('' if unknown)."""

    image_id: int
    caption: str
    file_name: str = ""


@dataclasses.dataclass(frozen=True)
class CaptionSample:
    """Captions drawn by `sample_captions`, with what it takes to draw them again."""

    seed: int
    indices: tuple[int, ...]  # positions in the caption list it was drawn from
    captions: tuple[Caption, ...]
    distinct_images: bool = False

    @property
    def texts(self) -> list[str]:
        return [c.caption for c in self.captions]

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON (atomically), so a run's prompts can be audited and reused."""
        data = {
            "seed": self.seed, "n": len(self.captions), "distinct_images": self.distinct_images,
            "indices": list(self.indices),
            "captions": [dataclasses.asdict(c) for c in self.captions],
        }
        paths.write_text(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CaptionSample":
        data = json.loads(paths.read_text(path))
        return cls(
            seed=int(data["seed"]),
            indices=tuple(int(i) for i in data["indices"]),
            captions=tuple(Caption(**c) for c in data["captions"]),
            distinct_images=bool(data.get("distinct_images", False)),
        )


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


def _is_tfds(source) -> bool:
    return isinstance(source, str) and source.startswith(TFDS_PREFIX)


def _tfds_name(source: str) -> str:
    name = source[len(TFDS_PREFIX):] or "coco_captions"
    return name


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # lazy: only TFDS sources need TensorFlow
    except ImportError as e:
        raise ImportError(
            "a 'tfds:' COCO source needs tensorflow-datasets (pip install tensorflow-cpu "
            "tensorflow-datasets); or pass a local directory with captions_val2014.json "
            "and val2014/") from e
    return tfds


def _annotations_path(root: str) -> str:
    for cand in (paths.join(root, ANNOTATIONS_FILE), paths.join(root, "annotations", ANNOTATIONS_FILE)):
        if paths.isfile(cand):
            return cand
    raise FileNotFoundError(
        f"COCO source {root!r}: no {ANNOTATIONS_FILE} in it or in its annotations/ folder")


def _read_json(root: str) -> dict:
    if not paths.isdir(root):
        raise FileNotFoundError(
            f"COCO source {root!r} is not a directory (nor a '{TFDS_PREFIX}...' TFDS name)")
    path = _annotations_path(root)
    data = json.loads(paths.read_text(path))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path!r} is not a COCO captions file: expected keys 'images' and 'annotations'")
    return data


def _tfds_examples(source: str, data_dir, decode_images: bool) -> Iterator[dict]:
    tfds = _import_tfds()
    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    for split in TFDS_SPLITS:
        ds = tfds.load(_tfds_name(source), split=split, data_dir=data_dir,
                       shuffle_files=False, decoders=decoders)
        yield from tfds.as_numpy(ds)


def _text(x) -> str:
    return (x.decode("utf-8") if isinstance(x, bytes) else str(x)).strip()


def load_captions(source, *, data_dir: str | None = None) -> list[Caption]:
    """All captions of COCO val2014, sorted by (image_id, caption id).

    source: a COCO directory or 'tfds:coco_captions' (see module docstring);
    data_dir: TFDS data directory (TFDS sources only).
    """
    caps: list[tuple[int, int, Caption]] = []
    if _is_tfds(source):
        for ex in _tfds_examples(source, data_dir, decode_images=False):
            image_id = int(ex["image/id"])
            fname = _text(ex.get("image/filename", b""))
            ids = ex["captions"].get("id", None)
            for j, t in enumerate(ex["captions"]["text"]):
                order = int(ids[j]) if ids is not None else j
                caps.append((image_id, order, Caption(image_id, _text(t), fname)))
    else:
        root = os.fspath(source)
        data = _read_json(root)
        names = {int(im["id"]): im.get("file_name", "") for im in data["images"]}
        for j, ann in enumerate(data["annotations"]):
            image_id = int(ann["image_id"])
            order = int(ann.get("id", j))
            caps.append((image_id, order, Caption(image_id, _text(ann["caption"]), names.get(image_id, ""))))
    caps.sort(key=lambda t: (t[0], t[1]))
    return [c for _, _, c in caps]


def list_images(source, *, data_dir: str | None = None) -> list[tuple[int, str]]:
    """[(image_id, file name)] of every val2014 image, sorted by id."""
    if _is_tfds(source):
        out = [(int(ex["image/id"]), _text(ex.get("image/filename", b"")))
               for ex in _tfds_examples(source, data_dir, decode_images=False)]
    else:
        out = [(int(im["id"]), str(im["file_name"])) for im in _read_json(os.fspath(source))["images"]]
    return sorted(out)


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------


def sample_captions(
    captions: Sequence[Caption], n: int, seed: int, *, distinct_images: bool = False
) -> CaptionSample:
    """Draw n captions without replacement, deterministically from `seed`.

    distinct_images=False: n captions uniformly from all captions (the usual
    "30k random prompts"). True: n distinct images, then one of each image's
    captions. The result is sorted by position in `captions`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    if distinct_images:
        by_image: dict[int, list[int]] = {}
        for i, c in enumerate(captions):
            by_image.setdefault(c.image_id, []).append(i)
        ids = sorted(by_image)
        if n > len(ids):
            raise ValueError(f"asked for {n} captions of distinct images, but there are only {len(ids)} images")
        chosen = rng.choice(len(ids), size=n, replace=False)
        idx = [by_image[ids[k]][int(rng.integers(len(by_image[ids[k]])))] for k in chosen]
    else:
        if n > len(captions):
            raise ValueError(f"asked for {n} captions, but only {len(captions)} are available")
        idx = rng.choice(len(captions), size=n, replace=False).tolist()
    idx = sorted(int(i) for i in idx)
    return CaptionSample(seed=int(seed), indices=tuple(idx),
                         captions=tuple(captions[i] for i in idx), distinct_images=distinct_images)


def select_reference_ids(image_ids: Sequence[int], count: int | None, seed: int, source: Any = "") -> list[int]:
    """All ids (count=None) or `count` of them drawn with `seed`; sorted.

    Raises ValueError naming the source if fewer than `count` exist.
    """
    ids = sorted(int(i) for i in image_ids)
    if count is None:
        return ids
    if count < 1:
        raise ValueError(f"count must be >= 1 or None, got {count}")
    if count > len(ids):
        raise ValueError(
            f"COCO source {source!r} has only {len(ids)} reference images, but count={count} were asked")
    rng = np.random.default_rng(seed)
    return sorted(ids[i] for i in rng.choice(len(ids), size=count, replace=False))


# ----------------------------------------------------------------------------
# Reference images
# ----------------------------------------------------------------------------


def preprocess_reference(image, size: int = 256) -> np.ndarray:
    """PIL image or uint8 [H, W, C] array -> uint8 [size, size, 3]: RGB, centre square crop, BICUBIC resize."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).squeeze())
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), resample=RESAMPLE)
    return np.asarray(img, dtype=np.uint8)


def iter_reference_images(
    source,
    size: int = 256,
    *,
    count: int | None = None,
    seed: int = 0,
    image_ids: Sequence[int] | None = None,
    data_dir: str | None = None,
) -> Iterator[np.ndarray]:
    """Yield preprocessed reference images, uint8 [size, size, 3].

    Which images: `image_ids` if given, else all (count=None) or `count` drawn
    with `seed` (see `select_reference_ids`). Directory sources yield in id
    order; TFDS sources in the dataset's order.
    """
    if image_ids is None:
        all_ids = [i for i, _ in list_images(source, data_dir=data_dir)]
        image_ids = select_reference_ids(all_ids, count, seed, source)
    wanted = set(int(i) for i in image_ids)
    if _is_tfds(source):
        for ex in _tfds_examples(source, data_dir, decode_images=True):
            if int(ex["image/id"]) in wanted:
                yield preprocess_reference(ex["image"], size)
        return
    root = os.fspath(source)
    names = dict(list_images(root))
    unknown = sorted(wanted - set(names))
    if unknown:
        raise ValueError(f"COCO source {root!r} has no images with ids {unknown[:5]}")
    for image_id in sorted(wanted):
        path = paths.join(root, IMAGE_DIR, names[image_id])
        if not paths.isfile(path):
            raise FileNotFoundError(f"COCO image {image_id} listed in {ANNOTATIONS_FILE} is missing: {path!r}")
        with Image.open(io.BytesIO(paths.read_bytes(path))) as im:
            yield preprocess_reference(im, size)


def _batches(it: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def _params_fingerprint(params) -> str:
    import jax

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda t: jax.tree_util.keystr(t[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()[:16]


def _canonical_source(source) -> str:
    return source if _is_tfds(source) else paths.absolute(source)


REFERENCE_SHARD = 1000  # reference images per resumable feature shard


def reference_features_dir(cache_file) -> str:
    """Where `reference_statistics` keeps the features behind a statistics file (for KID, resuming)."""
    return os.fspath(cache_file)[:-len(".npz")] + "_features"


def reference_cache_file(cache_path, source, count: int | None, size: int, seed: int, params) -> tuple[str, dict]:
    """(file, key): where `reference_statistics` caches, and the key stored in it."""
    key = {
        "source": _canonical_source(source), "count": "all" if count is None else int(count),
        "size": int(size), "seed": int(seed) if count is not None else "-",
        "preprocessing": PREPROCESSING, "inception": _params_fingerprint(params),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    tag = "all" if count is None else str(count)
    return paths.join(cache_path, f"coco_ref_{tag}_{size}px_{digest}.npz"), key


def reference_statistics(
    source,
    params,
    cache_path: str | os.PathLike,
    *,
    count: int | None = None,
    size: int = 256,
    seed: int = 0,
    batch_size: int = 50,
    data_dir: str | None = None,
    mesh=None,
    progress: bool = False,
    shard_size: int = REFERENCE_SHARD,
) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu [2048], sigma [2048, 2048], float64) of COCO val2014 images.

    Computed once and cached under the directory `cache_path`, in a file keyed
    by source, count, size, seed and the Inception weights. count=None uses
    every image; a count larger than the source holds raises ValueError.
    The features are kept beside it (`reference_features_dir`, shards of `shard_size`
    images, for KID), and an interrupted pass resumes from its finished shards.
    """
    from imagen_jax.evaluation import fid, inception
    from imagen_jax.evaluation.features import FeatureStore

    cache_file, key = reference_cache_file(cache_path, source, count, size, seed, params)
    if paths.isfile(cache_file):
        return fid.load_statistics(cache_file)
    all_ids = [i for i, _ in list_images(source, data_dir=data_dir)]
    ids = select_reference_ids(all_ids, count, seed, source)  # fails fast if too few
    # Place the weights once; `features` then finds them already on device.
    import jax
    from tqdm import tqdm

    replicated = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                  if mesh is not None else None)
    params = jax.device_put(params, replicated)
    fdir = reference_features_dir(cache_file)
    store = None
    if paths.isfile(paths.join(fdir, "store.json")):  # an interrupted pass: its feature width
        dim = json.loads(paths.read_text(paths.join(fdir, "store.json")))["dim"]
        store = FeatureStore(fdir, len(ids), shard_size, dim)
    num_shards = -(-len(ids) // shard_size)
    shard_range = lambda i: (i * shard_size, min((i + 1) * shard_size, len(ids)))  # noqa: E731
    missing = set(store.missing()) if store else set(range(num_shards))
    done = len(ids) - sum(b - a for a, b in map(shard_range, missing))
    bar = tqdm(total=len(ids), initial=done, desc="reference images", unit="img", disable=not progress)

    def finish(index, images):
        nonlocal store
        feats = np.concatenate([inception.features(params, b, batch_size=batch_size, mesh=mesh)
                                for b in _batches(iter(images), batch_size)])
        if store is None:
            store = FeatureStore(fdir, len(ids), shard_size, feats.shape[1])
        store.write(index, feats)
        bar.update(len(images))

    if _is_tfds(source):  # one pass in the dataset's order; finished shards' images are skipped
        buf, pos = [], 0
        for image in iter_reference_images(source, size, image_ids=ids, data_dir=data_dir):
            index = pos // shard_size
            pos += 1
            if index in missing:
                buf.append(image)
                if len(buf) == shard_range(index)[1] - shard_range(index)[0]:
                    finish(index, buf)
                    buf = []
        if pos != len(ids):
            raise ValueError(f"COCO source {source!r} yielded {pos} reference images, expected {len(ids)}")
    else:  # directory: id order, so each missing shard reads only its own files
        order = sorted(int(i) for i in ids)
        for index in sorted(missing):
            a, b = shard_range(index)
            images = list(iter_reference_images(source, size, image_ids=order[a:b], data_dir=data_dir))
            if len(images) != b - a:
                raise ValueError(f"COCO source {source!r} yielded {len(images)} reference images "
                                 f"for shard {index}, expected {b - a}")
            finish(index, images)
    bar.close()
    feats = store.concatenate()
    mu, sigma = fid.statistics(feats)
    fid.save_statistics(cache_file, mu, sigma, meta={**key, "num_images": len(ids)})
    return mu, sigma


__all__ = [
    "Caption", "CaptionSample", "iter_reference_images", "list_images", "load_captions",
    "preprocess_reference", "reference_cache_file", "reference_statistics", "sample_captions",
    "select_reference_ids",
]
