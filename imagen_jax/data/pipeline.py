"""Training input pipelines for every cascade stage: per-host batches of numpy arrays.

    it = make_iterator(config, global_batch=2048, process_index=jax.process_index(),
                       process_count=jax.process_count(), start_step=step)
    batch = next(it)   # {"image": f32 [b, S, S, 3], "lowres": f32 [b, s, s, 3], "captions": str [b]}

Stages differ only by config (`config.data.*`, `config.diffusion.lowres_size`, `config.seed`):
* base:   `image` is the picture resized (centre crop to a square, then PIL bicubic) to
          S = data.image_size; no `lowres`.
* SR:     also `lowres`, the same picture resized to s = diffusion.lowres_size.
* SR1024: (data.full_size > 0) the picture is resized to full_size, `image` is a random
          image_size crop of it and `lowres` the matching crop (image_size * s / full_size) of the
          full picture resized to s. Crop offsets are multiples of full_size / s so both crops cover
          exactly the same region.
Pixels are float32 in [-1, 1]. Records with precomputed text embeddings (tfrecord source) add
`embeddings` f32 [b, L, D] and `mask` bool [b, L].

Sources (data.source):
* "shapes":   the embedded `ShapesDataset` (no download, no TensorFlow). Batch k on host p is
              dataset indices [k * global_batch + p * b, ... + b), so resuming at start_step=k
              is exact and O(1); crops are seeded by (seed, index).
* "tfds":     any TFDS image-text dataset (data.name / data_dir / split / image_key /
              caption_key, '/' descending into nested features like 'captions/text'; one caption
              picked at random per example when there are several); see below for how it is read.
* "tfrecord": local or gs:// TFRecord files (data.files glob) of tf.train.Example with 'image'
              (encoded bytes) and 'caption' (one or more byte strings), optionally 'embedding'
              (float, flattened [L * D]) and 'mask' (int, [L]); see `write_tfrecords`. Read by random
              access (records.RecordSource; offsets from the .offsets.npy sidecar `write_tfrecords`
              writes, else from a scan of the record headers at start-up). Example g of the global
              stream (step k, host p, row j: g = k * global_batch + p * b + j) is record
              index_shuffle(g mod n, n, (seed, epoch g div n)): a fresh seeded permutation every epoch,
              hosts disjoint within it, and resuming at start_step is exact and O(1), reading nothing
              it skips. The global batch does not depend on the number of hosts. data.shuffle_buffer
              <= 1 reads in file order instead of permuting.
* "tfds":     a prepared split stored as TFRecord (TFDS's default) is read like "tfrecord" above, from
              the split's own files (SplitInfo.filepaths, decoded by the builder's features): O(1)
              resume. ArrayRecord-format datasets and split expressions ('train[:90%]') keep the
              tf.data path: each host reads its `tfds.split_for_jax_process` share, a pure function of
              (seed, process_index, process_count), and resuming skips start_step * b records before
              decoding: exact, but O(steps) reads.

TensorFlow and TFDS are imported inside the tfds/tfrecord branches only (tfrecord: only to parse
tf.train.Example), and TensorFlow is kept off the GPUs, so models and samplers run where TensorFlow is absent.
"""
from __future__ import annotations

import atexit
import glob as _glob
import io
import queue
import threading
import weakref
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from imagen_jax import paths
from imagen_jax.data import records
from imagen_jax.data.shapes import ShapesDataset

__all__ = ["DatasetError", "make_iterator", "write_tfrecords", "resize_with_crop", "StageSizes"]

_CROP_STREAM = 1   # shapes source: rng stream of an example's crop, apart from its content (stream 0)


class DatasetError(ValueError):
    """The configured dataset does not exist or cannot be read as configured."""


# --------------------------------------------------------------------------- sizes and pixels


class StageSizes:
    """The pixel sizes a stage trains on, validated: image S, full F (0: no crop), lowres s (0: none)."""

    def __init__(self, image_size: int, lowres_size: int = 0, full_size: int = 0):
        self.image_size, self.lowres_size, self.full_size = int(image_size), int(lowres_size), int(full_size)
        if self.image_size < 1:
            raise ValueError(f"config.data.image_size must be positive, got {image_size}")
        if self.lowres_size < 0 or self.full_size < 0:
            raise ValueError(f"config.diffusion.lowres_size ({lowres_size}) and config.data.full_size "
                             f"({full_size}) must be >= 0")
        if self.full_size:
            if not self.lowres_size:
                raise ValueError(f"config.data.full_size={full_size} (random crops) needs "
                                 f"config.diffusion.lowres_size > 0")
            if self.image_size > self.full_size:
                raise ValueError(f"config.data.image_size={image_size} is larger than "
                                 f"config.data.full_size={full_size}: cannot crop")
            if self.full_size % self.lowres_size or (self.image_size * self.lowres_size) % self.full_size:
                raise ValueError(
                    f"crops need full_size ({full_size}) divisible by lowres_size ({lowres_size}) and "
                    f"image_size * lowres_size ({image_size} * {lowres_size}) divisible by full_size, "
                    f"so the low-res crop covers whole pixels")

    @classmethod
    def from_config(cls, config) -> "StageSizes":
        return cls(config.data.image_size, config.diffusion.lowres_size, config.data.get("full_size", 0))

    @property
    def source_size(self) -> int:
        """Side the whole picture is resized to before any crop."""
        return self.full_size or self.image_size

    @property
    def lowres_out(self) -> int:
        """Side of the `lowres` array in the batch (0: none)."""
        if self.full_size:
            return self.image_size * self.lowres_size // self.full_size
        return self.lowres_size


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def resize_with_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: centre crop to a square, then PIL bicubic
    (anti-aliased when shrinking)."""
    h, w = image.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    return _resize(np.ascontiguousarray(image[top:top + m, left:left + m]), size)


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 127.5 - 1.0


def _stage_arrays(image: np.ndarray, sizes: StageSizes, rng: np.random.Generator):
    """Square uint8 [source_size, source_size, 3] -> (image f32 [S, S, 3], lowres f32 or None)."""
    if sizes.full_size:
        f = sizes.full_size // sizes.lowres_size
        positions = (sizes.full_size - sizes.image_size) // f + 1
        ky, kx = (int(k) for k in rng.integers(positions, size=2))
        y, x, n = ky * f, kx * f, sizes.lowres_out
        low = _resize(image, sizes.lowres_size)[ky:ky + n, kx:kx + n]
        image = image[y:y + sizes.image_size, x:x + sizes.image_size]
        return _to_float(image), _to_float(low)
    if sizes.lowres_size:
        return _to_float(image), _to_float(_resize(image, sizes.lowres_size))
    return _to_float(image), None


def _decode(value: Any, size: int) -> np.ndarray:
    """Encoded image bytes or a uint8 array -> uint8 [size, size, 3] (resize-with-crop)."""
    if isinstance(value, (bytes, np.bytes_)) or (isinstance(value, np.ndarray) and value.dtype.kind in "SO"):
        data = value.item() if isinstance(value, np.ndarray) else value
        pil = Image.open(io.BytesIO(data))
        pil.draft("RGB", (size, size))   # JPEG: decode at a reduced scale still >= size
        image = np.asarray(pil.convert("RGB"))
    else:
        image = np.asarray(value)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        image = image[..., :3].astype(np.uint8)
    return resize_with_crop(image, size)


def _choose_caption(captions: Any, rng: np.random.Generator) -> bytes:
    captions = np.asarray(captions)
    if captions.ndim == 0:
        return captions.item()
    if captions.size == 0:
        return b""
    return captions.reshape(-1)[int(rng.integers(captions.size))]


# --------------------------------------------------------------------------- entry point


def make_iterator(config, *, global_batch: int, process_index: int = 0, process_count: int = 1,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless per-host batches (see the module docstring) starting at batch `start_step`.

    config: a stage ConfigDict (config.data.*, config.diffusion.lowres_size, config.seed).
    Each host gets b = global_batch / process_count examples per step.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count); got process_index={process_index}, "
                         f"process_count={process_count}")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                         f"process_count={process_count}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    sizes = StageSizes.from_config(config)
    per_host = global_batch // process_count
    source = config.data.source
    if source == "shapes":
        batches = _shapes_batches(int(config.seed), sizes, global_batch, per_host, process_index, start_step)
        return _background(batches, int(config.data.get("prefetch", 2)))
    if source == "tfrecord":
        batches = _tfrecord_batches(config, sizes, global_batch, per_host, process_index, start_step)
        return _background(batches, int(config.data.get("prefetch", 2)))
    if source == "tfds":
        tf = _import_tf()
        builder = _tfds_builder(tf, config, process_count)
        indexed = _tfds_indexed(builder, config)
        if indexed is not None:
            batches = _indexed_batches(*indexed, config, sizes, global_batch, per_host, process_index, start_step)
            return _background(batches, int(config.data.get("prefetch", 2)))
        ds = _tfds_examples(tf, builder, config, process_index, process_count)
        return _tf_batches(tf, ds, config, sizes, per_host, process_index, process_count, start_step)
    raise DatasetError(f"unknown config.data.source {source!r}; expected 'shapes', 'tfds' or 'tfrecord'")


# --------------------------------------------------------------------------- shapes source


def _shapes_batches(seed, sizes, global_batch, per_host, process_index, start_step):
    dataset = ShapesDataset(seed=seed, size=sizes.source_size)
    step = start_step
    while True:
        first = step * global_batch + process_index * per_host
        images, lows, captions = [], [], []
        for index in range(first, first + per_host):
            image, caption, _ = dataset[index]
            hi, low = _stage_arrays(image, sizes, np.random.default_rng([seed, index, _CROP_STREAM]))
            images.append(hi)
            lows.append(low)
            captions.append(caption)
        batch = {"image": np.stack(images), "captions": np.array(captions)}
        if sizes.lowres_size:
            batch["lowres"] = np.stack(lows)
        yield batch
        step += 1


def _background(iterator: Iterator, size: int) -> Iterator:
    """Runs `iterator` in a daemon thread, `size` items ahead; stops it when the consumer closes."""
    if size <= 0:
        yield from iterator
        return
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in iterator:
                if not put((True, item)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put((False, e))

    threading.Thread(target=work, daemon=True, name="shapes-prefetch").start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            yield item
    finally:
        stop.set()


# --------------------------------------------------------------------------- TensorFlow sources


def _import_tf():
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError("config.data.source 'tfds' and 'tfrecord' need TensorFlow "
                          "(pip install tensorflow-cpu tensorflow-datasets); 'shapes' does not") from e
    try:   # the accelerators belong to JAX
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:   # TF already initialised its devices (then the caller has decided)
        pass
    return tf


def _get(example: dict, key: str):
    value = example
    for part in key.split("/"):
        value = value[part]
    return value


def _feature_at(features, key: str):
    """The TFDS feature at a '/' path, or None."""
    import tensorflow_datasets as tfds
    feature = features
    try:
        for part in key.split("/"):
            while isinstance(feature, tfds.features.Sequence):
                feature = feature.feature
            feature = feature[part]
    except (KeyError, TypeError):
        return None
    return feature


def _skip_image_decoding(features, key: str):
    """Decoders that keep the (encoded) image bytes, so skipped and dropped records cost no decode."""
    import tensorflow_datasets as tfds
    if not isinstance(_feature_at(features, key), tfds.features.Image):
        return None
    decoder: Any = tfds.decode.SkipDecoding()
    for part in reversed(key.split("/")):
        decoder = {part: decoder}
    return decoder


def _tfds_builder(tf, config, process_count):
    """The prepared TFDS builder of config.data, its split and features checked."""
    import tensorflow_datasets as tfds
    data = config.data
    name, data_dir = data.name, data.data_dir or None
    if not name:
        raise DatasetError("config.data.source='tfds' needs config.data.name (a TFDS dataset name)")
    if data_dir and not tf.io.gfile.isdir(data_dir):
        raise DatasetError(f"config.data.data_dir {data_dir!r} does not exist")
    if name.split("/")[0].split(":")[0] == "imagen_shapes":
        from imagen_jax.data import shapes_tfds  # noqa: F401  (registers the builder)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetError(f"unknown TFDS dataset config.data.name={name!r}: {e}") from e
    if not builder.is_prepared():
        if process_count > 1:   # several hosts would race to write the same files
            raise DatasetError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; prepare it "
                               f"once before a multi-host run (tfds build {name} --data_dir ...)")
        builder.download_and_prepare()
    try:
        builder.info.splits[data.split]
    except (KeyError, ValueError) as e:
        raise DatasetError(f"TFDS dataset {name!r} has no split config.data.split={data.split!r}; "
                           f"splits are {sorted(builder.info.splits)}") from e
    for what, key in (("image_key", data.image_key), ("caption_key", data.caption_key)):
        if key and _feature_at(builder.info.features, key) is None:
            raise DatasetError(f"TFDS dataset {name!r} has no feature config.data.{what}={key!r}; "
                               f"features are {sorted(builder.info.features.keys())}")
    return builder


def _tfds_examples(tf, builder, config, process_index, process_count):
    """This host's share of a TFDS split as (image bytes or uint8, captions) records, one epoch."""
    import tensorflow_datasets as tfds
    data = config.data
    host_split = tfds.split_for_jax_process(data.split, process_index=process_index,
                                            process_count=process_count, drop_remainder=True)
    ds = builder.as_dataset(
        split=host_split, shuffle_files=True,
        decoders=_skip_image_decoding(builder.info.features, data.image_key),
        read_config=tfds.ReadConfig(shuffle_seed=int(config.seed), try_autocache=False))
    image_key, caption_key = data.image_key, data.caption_key

    def select(example):
        captions = _get(example, caption_key) if caption_key else tf.constant(b"")
        return {"image": _get(example, image_key), "captions": captions}

    return ds.map(select)


def _tfrecord_files(pattern):
    if not pattern:
        raise DatasetError("config.data.source='tfrecord' needs config.data.files (a glob of TFRecord files)")
    if "://" in pattern:
        root, _, glob_part = pattern.rpartition("/")
        files = sorted(str(p) for p in paths.path(root).glob(glob_part)) if paths.exists(root) else []
    else:
        files = sorted(_glob.glob(pattern))
    files = [f for f in files if not f.endswith(records.SIDECAR)]
    if not files:
        raise DatasetError(f"no files match config.data.files={pattern!r}")
    return files


def tfrecord_positions(n, step, global_batch, per_host, process_index, seed, shuffle=True):
    """Record indices (int64 [per_host]) and global positions of host `process_index`'s rows at `step`:
    O(per_host), whatever the step."""
    g = np.arange(per_host, dtype=np.int64) + step * global_batch + process_index * per_host
    epoch, within = g // n, g % n
    if not shuffle:
        return within, g
    out = np.empty(per_host, np.int64)
    for e in np.unique(epoch):  # a batch spans at most two epochs
        sel = epoch == e
        out[sel] = records.index_shuffle(within[sel], n, [seed, int(e)]).astype(np.int64)
    return out, g


def _tfds_indexed(builder, config):
    """(RecordSource, parse) over a prepared TFDS split stored as TFRecord, or None (ArrayRecord files, or a
    split expression like 'train[:90%]': those keep the tf.data path, which resumes by skipping)."""
    import tensorflow_datasets as tfds
    split = config.data.split
    if builder.info.file_format != tfds.core.FileFormat.TFRECORD or split not in builder.info.splits:
        return None
    files = [str(f) for f in builder.info.splits[split].filepaths]
    features, image_key, caption_key = builder.info.features, config.data.image_key, config.data.caption_key
    decoders = _skip_image_decoding(features, image_key)

    def parse(raw):
        ex = features.deserialize_example_np(raw, decoders=decoders)
        captions = _get(ex, caption_key) if caption_key else b""
        return _get(ex, image_key), np.asarray(captions, dtype=object), {}

    return records.RecordSource(files), parse


def _tfrecord_batches(config, sizes: StageSizes, global_batch, per_host, process_index, start_step):
    try:
        from tensorflow.core.example import example_pb2  # the tf.train.Example message; no tf.data
    except ImportError as e:
        raise ImportError("config.data.source 'tfrecord' needs TensorFlow to parse tf.train.Example "
                          "(pip install tensorflow-cpu); 'shapes' does not") from e

    source = records.RecordSource(_tfrecord_files(config.data.files))
    n = len(source)
    if n == 0:
        raise DatasetError(f"config.data.files={config.data.files!r}: the files hold no records")
    first = example_pb2.Example.FromString(source.read(0)).features.feature
    if not {"image", "caption"} <= set(first):
        raise DatasetError(f"{source.files[0]}: tf.train.Example needs 'image' and 'caption' features, "
                           f"has {sorted(first)}")
    shape = None
    if "embedding" in first:
        if "mask" not in first:
            raise DatasetError(f"{source.files[0]}: an 'embedding' feature needs a 'mask' feature ([L] ints)")
        length = len(first["mask"].int64_list.value)
        shape = (length, len(first["embedding"].float_list.value) // max(length, 1))

    def parse(raw):
        f = example_pb2.Example.FromString(raw).features.feature
        extra = {}
        if shape is not None:
            extra["embeddings"] = np.asarray(f["embedding"].float_list.value, np.float32).reshape(shape)
            extra["mask"] = np.asarray(f["mask"].int64_list.value).astype(bool)
        return f["image"].bytes_list.value[0], np.array(list(f["caption"].bytes_list.value), dtype=object), extra

    return _indexed_batches(source, parse, config, sizes, global_batch, per_host, process_index, start_step)


def _indexed_batches(source, parse, config, sizes: StageSizes, global_batch, per_host, process_index, start_step):
    """Batches of the global stream over a random-access source (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    seed, n = int(config.seed), len(source)
    if n == 0:
        raise DatasetError(f"the input files hold no records ({source.files[:1]}...)")
    shuffle = int(config.data.get("shuffle_buffer", 10_000)) > 1

    def example(index, position):
        image, captions, extra = parse(source.read(int(index)))
        # Seeded by the global position: the same example whatever the host count or restart.
        rng = np.random.default_rng([seed, int(position), _CROP_STREAM])
        caption = _choose_caption(captions, rng)
        hi, low = _stage_arrays(_decode(image, sizes.source_size), sizes, rng)
        out = {"image": hi, "captions": caption.decode("utf-8") if isinstance(caption, bytes) else str(caption),
               **extra}
        if low is not None:
            out["lowres"] = low
        return out

    def batches():  # a generator of its own: the checks above run when make_iterator is called
        with ThreadPoolExecutor(max_workers=int(config.data.get("workers", 8))) as pool:
            step = start_step
            while True:
                index, position = tfrecord_positions(n, step, global_batch, per_host, process_index, seed, shuffle)
                rows = list(pool.map(example, index, position))
                batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "captions"}
                batch["captions"] = np.array([r["captions"] for r in rows])
                yield batch
                step += 1

    return batches()


def _tf_batches(tf, ds, config, sizes: StageSizes, per_host, process_index, process_count, start_step):
    """Repeat, shuffle, skip start_step batches, decode + resize/crop (PIL), batch, prefetch."""
    seed = int(config.seed)
    buffer = int(config.data.get("shuffle_buffer", 10_000))
    ds = ds.repeat()
    if buffer > 1:
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.enumerate().skip(start_step * per_host)

    def py_process(index, image, captions):
        rng = np.random.default_rng([seed, process_index, process_count, int(index)])
        caption = _choose_caption(captions, rng)
        hi, low = _stage_arrays(_decode(image, sizes.source_size), sizes, rng)
        return (hi, low, caption) if low is not None else (hi, caption)

    def process(index, example):
        out = dict(example)
        args = [index, out.pop("image"), out.pop("captions")]
        if sizes.lowres_size:
            hi, low, caption = tf.numpy_function(py_process, args, [tf.float32, tf.float32, tf.string],
                                                 stateful=False)
            n = sizes.lowres_out
            out["lowres"] = tf.ensure_shape(low, [n, n, 3])
        else:
            hi, caption = tf.numpy_function(py_process, args, [tf.float32, tf.string], stateful=False)
        out["image"] = tf.ensure_shape(hi, [sizes.image_size, sizes.image_size, 3])
        out["captions"] = tf.ensure_shape(caption, [])
        return out

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_host, drop_remainder=True)
    ds = ds.prefetch(max(1, int(config.data.get("prefetch", 2))))
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
    return _NumpyBatches(ds)


class _NumpyBatches:
    """Iterator over a tf.data pipeline's batches as numpy, captions decoded to str.

    Live instances are closed at interpreter exit: a tf.data iterator destroyed during
    finalisation waits for its numpy_function workers, which can no longer take the GIL (hang).
    """
    _live: "weakref.WeakSet[_NumpyBatches]" = weakref.WeakSet()

    def __init__(self, ds):
        self._it = ds.as_numpy_iterator()
        _NumpyBatches._live.add(self)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise StopIteration
        batch = next(self._it)
        batch["captions"] = np.array([c.decode("utf-8") for c in batch["captions"]])
        return batch

    def close(self) -> None:
        """Releases the TF iterator (its threads and buffers); later `next` calls stop."""
        self._it = None

    @classmethod
    def close_all(cls) -> None:
        for it in list(cls._live):
            it.close()


atexit.register(_NumpyBatches.close_all)


# --------------------------------------------------------------------------- writer


def write_tfrecords(path: str, examples: Iterable[dict[str, Any]], *, num_shards: int = 1) -> list[str]:
    """Writes examples as tf.train.Example records readable by the "tfrecord" source.

    Each example: 'image' (uint8 [H, W, 3], stored as PNG, or already-encoded bytes), 'caption'
    (str or a list of str), optionally 'embedding' (float [L, D]) with 'mask' ([L]).
    One file at `path`, or `num_shards` files `path-00000-of-0000N` filled round-robin, each with its
    `.offsets.npy` sidecar (record offsets, for random access). Returns the TFRecord paths written.
    """
    tf = _import_tf()
    if num_shards < 1:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    out = [path] if num_shards == 1 else [f"{path}-{k:05d}-of-{num_shards:05d}" for k in range(num_shards)]
    writers = [tf.io.TFRecordWriter(p) for p in out]
    try:
        for i, ex in enumerate(examples):
            writers[i % num_shards].write(_to_example(tf, ex).SerializeToString())
    finally:
        for w in writers:
            w.close()
    for p in out:  # random access for the "tfrecord" source without a scan at start-up
        records.write_offsets(p)
    return out


def _to_example(tf, ex: dict[str, Any]):
    image = ex["image"]
    if not isinstance(image, (bytes, np.bytes_)):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"'image' must be uint8 [H, W, C] or encoded bytes, got {image.dtype} {image.shape}")
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        image = buf.getvalue()
    captions = ex["caption"]
    captions = [captions] if isinstance(captions, (str, bytes)) else list(captions)
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(image)])),
        "caption": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[c.encode("utf-8") if isinstance(c, str) else c for c in captions])),
    }
    if "embedding" in ex:
        emb = np.asarray(ex["embedding"], np.float32)
        mask = np.asarray(ex["mask"]).astype(np.int64)
        if emb.ndim != 2 or mask.shape != emb.shape[:1]:
            raise ValueError(f"'embedding' must be [L, D] and 'mask' [L], got {emb.shape} and {mask.shape}")
        feature["embedding"] = tf.train.Feature(float_list=tf.train.FloatList(value=emb.reshape(-1)))
        feature["mask"] = tf.train.Feature(int64_list=tf.train.Int64List(value=mask))
    return tf.train.Example(features=tf.train.Features(feature=feature))
