"""Zero-shot FID on COCO 2014 validation captions: the protocol, guidance sweeps, CLIP score.

The protocol (COCO FID-30K of Imagen, Saharia et al. 2022, as in GLIDE and DALL-E 2):
  1. captions: `num_samples` (30,000) captions drawn uniformly, without replacement, from all
     COCO val2014 captions by a seeded NumPy Generator (`coco.sample_captions`); the draw is
     saved as EVAL_DIR/captions.json.
  2. reference: FID statistics of all val2014 images (or `reference_count` of them, drawn with
     the caption seed), preprocessed as coco.py documents (RGB, centre square crop, PIL BICUBIC
     resize to the evaluation resolution), computed once and cached.
  3. samples: one image per caption through the cascade (`cascade.run_cascade`, data-parallel
     over the mesh). If the last stage's side is not the evaluation resolution, its uint8 images
     are resized with PIL's BICUBIC filter, the reference images' filter (PIL antialiases when
     shrinking, e.g. 1024 -> 256; it interpolates when enlarging, e.g. 64 -> 256).
  4. FID: Frechet distance between Gaussians fitted to the FID Inception's pool3 features of the
     samples and of the reference images (`fid.frechet_distance`, pytorch-fid's definition).
  Optionally, CLIP score: the mean over samples of 100 * cos(CLIP image embedding, CLIP text
  embedding of its caption), from a local Hugging Face CLIP model (not clamped at 0).

Resuming: samples are made shard by shard (`FeatureStore`): shard i holds the features of
captions [i * shard_size, (i + 1) * shard_size) and is written atomically once its images,
features (and CLIP scores) are done. Caption n's noise comes from its own key (seed, stage, n)
(`cascade.run_cascade`'s image_ids), so a rerun computes only the missing shards and, with any
batch size or device count, draws the noise an uninterrupted run would have drawn (the images
agree up to float round-off, which does depend on the per-device batch). Each shard's uint8
images are kept (samples/image_shards/, R*R*3 bytes an image: 5.9 GB for 30K at 256), so adding
--clip to a finished run scores the stored images instead of sampling again; beside each, a
.json of what sampled it (batch size, devices, jax), listed in fid.json's shards_made_with.
Each samples directory keeps a run.json of everything that decides its images and features
(captions, seed, noise scheme, stages and their settings, resolution, Inception weights); a
rerun with other settings is refused, naming them. Batch sizes are not among them.

EVAL_DIR layout:
  captions.json                 the caption draw (seed, indices, texts)
  cache/                        reference statistics, converted Inception weights (or cache_dir)
  samples/                      feature shards of the main run, run.json, clip/, image_shards/, images/
  folder/                       feature shards of --images FOLDER (no model), run.json
  fid.json                      FID, CLIP score, every setting and seed, software versions
  sweep/captions.json           the sweep's caption draw (same seed, sweep_samples captions)
  sweep/guidance_<w>/           feature shards per guidance weight
  sweep.json, sweep.md, sweep.png, sweep.svg   the sweep: table and plot of FID (and CLIP) vs guidance

Several hosts (a pod, jax.distributed): each host samples every P-th of the missing shards on its
own devices (a mesh of jax.local_devices()) and writes those shards' files; after a barrier process
0 reads every host's shards and writes the results (fid.json, sweep.*). The workdir must be one that
every host reads and writes (gs://). No host's choice of work depends on what another has written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import subprocess
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image

from imagen_jax import cascade, parallel, paths
from imagen_jax.evaluation import coco, fid, inception
from imagen_jax.evaluation.features import FeatureStore

NOISE_SCHEME = "per image: keys.per_image(seed, stage, caption index)"
RESIZE_FILTER = "PIL BICUBIC (antialiased when shrinking), the reference images' filter"
VERSION_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "scipy", "pillow", "orbax-checkpoint",
                    "torch", "transformers", "tensorflow-datasets")


class ProtocolError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The settings that decide which captions, reference images and samples a run uses."""

    coco: str                      # a COCO directory or 'tfds:coco_captions' (see coco.py)
    num_samples: int = 30000       # captions (one image each) of the main run; 0 = sweep only
    caption_seed: int = 0          # caption draw (and reference subset, with reference_count)
    seed: int = 0                  # sampling noise; image i's noise is keyed by (seed, i)
    shard_size: int = 1000         # images per resumable shard
    batch_size: int = 0            # images per sampling batch (0: cascade.run_cascade's default)
    resolution: int = 256          # side of the images compared (reference and samples)
    reference_count: int | None = None  # None: every val2014 image
    inception_batch: int = 50      # images per Inception batch (rounded up to the device count)
    save_images: bool = False      # also write each sample as a PNG
    tfds_data_dir: str | None = None
    distinct_images: bool = False  # captions of n distinct images (one caption each), not n captions
    reference_stats: str | None = None  # precomputed pytorch-fid / clean-fid .npz (mu, sigma) instead

    def __post_init__(self):
        if self.num_samples < 0:
            raise ProtocolError(f"num_samples must be >= 0, got {self.num_samples}")
        for name in ("shard_size", "resolution", "inception_batch"):
            if getattr(self, name) < 1:
                raise ProtocolError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 0:
            raise ProtocolError(f"batch_size must be >= 0, got {self.batch_size}")
        if self.reference_count is not None and self.reference_count < 2:
            raise ProtocolError(f"reference_count must be >= 2 (a covariance needs two images), "
                                f"got {self.reference_count}")


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, H, 3] -> uint8 [N, size, size, 3] with PIL BICUBIC; unchanged if H == size."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise ProtocolError(f"expected square uint8 images [N, H, H, 3], got {images.dtype} {images.shape}")
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), resample=coco.RESAMPLE))
                     for x in images]) if len(images) else np.zeros((0, size, size, 3), np.uint8)


def software_versions() -> dict[str, str]:
    """Python, platform and the installed versions of the packages that shape the numbers."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        out["imagen_jax_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def fid_to_reference(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of features [N, 2048] against reference statistics mu [2048], sigma [2048, 2048]."""
    return fid.frechet_distance(*fid.statistics(features), mu, sigma)


# Every EVAL_DIR file goes through the path layer (local or gs://), each write atomic.
def _write_json(path: str, data: Any) -> None:
    paths.write_text(path, json.dumps(data, indent=2))


def _atomic_npy(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    paths.write_bytes(path, buf.getvalue())


def _load_npy(path: str) -> np.ndarray:
    return np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)


def _write_text(path: str, text: str) -> None:
    paths.write_text(path, text)


def _check_run_file(directory: str, settings: dict) -> None:
    """Write directory/run.json, or refuse if it holds other settings (a resumed run must match)."""
    paths.makedirs(directory)
    path = os.path.join(directory, "run.json")
    settings = json.loads(json.dumps(settings))  # normalise tuples, ints-as-floats etc.
    if paths.exists(path):
        found = json.loads(paths.read_text(path))
        if found != settings:
            diff = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            raise ProtocolError(
                f"{directory} holds samples made with other settings ({', '.join(diff)} differ: "
                f"{ {k: found.get(k) for k in diff} } there, { {k: settings.get(k) for k in diff} } now); "
                "use a fresh --workdir or the original settings")
    else:
        _write_json(path, settings)


# ----------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------


class ClipScorer:
    """CLIP score of (image, caption) pairs: 100 * cos(image embedding, text embedding).

    path: a Hugging Face CLIP directory (local, or gs:// staged to a local copy) (config.json, weights, tokenizer and preprocessor
    files, as `save_pretrained` writes them), read by transformers' CLIPModel/CLIPProcessor with
    local_files_only=True. Runs in torch (float32) on `device` ('auto': CUDA if available).
    """

    def __init__(self, path: str, *, device: str = "auto", batch_size: int = 32):
        if not paths.isdir(path):
            raise FileNotFoundError(
                f"CLIP model directory {path!r} does not exist; expected a Hugging Face CLIP "
                "directory (e.g. openai/clip-vit-large-patch14 saved with save_pretrained)")
        try:
            import torch
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as e:
            raise ImportError("--clip needs torch and transformers (pip install torch transformers)") from e
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch, self.device, self.batch_size, self.source = torch, device, int(batch_size), path
        local = paths.local_dir(path)  # transformers reads local directories only
        self.model = CLIPModel.from_pretrained(local, local_files_only=True).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(local, local_files_only=True)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def __call__(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """uint8 [N, H, W, 3] and N captions -> float64 [N] scores (captions cut to CLIP's context)."""
        if len(images) != len(texts):
            raise ProtocolError(f"{len(images)} images but {len(texts)} captions")
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.processor(
                text=list(texts[start:start + self.batch_size]),
                images=list(images[start:start + self.batch_size]),
                return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.torch.no_grad():
                res = self.model(**batch)  # image_embeds / text_embeds come L2-normalised
            cos = (res.image_embeds * res.text_embeds).sum(-1)
            out.append(100.0 * cos.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0,), np.float64)


# ----------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------


class Evaluator:
    """Samples captions through a cascade and scores the samples against COCO val2014.

    samplers: cascade.StageSampler per stage (base first), built on `mesh`; cond: the text
    conditioner (captions -> (embeddings, mask)); inception_params: `inception.load(...)`;
    clip: an optional ClipScorer. Everything is written under `workdir` (see module docstring).
    """

    def __init__(self, workdir: str, protocol: Protocol, *, samplers: Sequence[cascade.StageSampler],
                 cond: Callable, inception_params, mesh, clip: ClipScorer | None = None,
                 cache_dir: str | None = None, progress: bool = True, log: Callable = print):
        self.process, self.processes = jax.process_index(), jax.process_count()
        self.primary = self.process == 0
        if self.processes > 1 and mesh is not None and any(
                d.process_index != self.process for d in mesh.devices.flat):
            raise ProtocolError("on several hosts each host evaluates on its own devices: build the mesh "
                                "from jax.local_devices()")
        self.workdir, self.protocol = paths.absolute(workdir), protocol
        self.samplers, self.cond, self.mesh, self.clip = list(samplers), cond, mesh, clip
        self.cache_dir = paths.absolute(cache_dir or os.path.join(self.workdir, "cache"))
        self.progress, self.log = progress, log or (lambda *a, **k: None)
        paths.makedirs(self.workdir)
        # Placed once; inception.features then finds the weights already on the devices.
        self.inception_params = jax.device_put(inception_params, parallel.replicated(mesh))
        self._captions: list[coco.Caption] | None = None
        self._reference = None
        self._reference_features = None
        self._inception_id = None

    # -- inputs ------------------------------------------------------------------

    def all_captions(self) -> list[coco.Caption]:
        if self._captions is None:
            self._captions = coco.load_captions(self.protocol.coco, data_dir=self.protocol.tfds_data_dir)
            if not self._captions:
                raise ProtocolError(f"COCO source {self.protocol.coco!r} has no captions")
        return self._captions

    def draw_captions(self, n: int, path: str) -> coco.CaptionSample:
        """`n` captions drawn with the caption seed; saved to `path`, or checked against it."""
        caps = self.all_captions()
        if n > len(caps):
            raise ProtocolError(f"asked for {n} captions, but COCO source {self.protocol.coco!r} "
                                f"has only {len(caps)}")
        sample = coco.sample_captions(caps, n, self.protocol.caption_seed,
                                      distinct_images=self.protocol.distinct_images)
        if paths.exists(path):
            if coco.CaptionSample.load(path) != sample:
                raise ProtocolError(f"{path} holds another caption draw (other seed, count or COCO "
                                    "source); use a fresh --workdir")
        else:
            paths.makedirs(os.path.dirname(path))
            sample.save(path)
        return sample

    def inception_id(self) -> str:
        """A fingerprint of the Inception weights (as keyed in the reference cache)."""
        if self._inception_id is None:
            _, key = coco.reference_cache_file(self.cache_dir, self.protocol.coco, None,
                                               self.protocol.resolution, 0, self.inception_params)
            self._inception_id = key["inception"]
        return self._inception_id

    def reference(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """(mu, sigma, info) of the reference images; computed once, then read from the cache."""
        if self._reference is None and self.protocol.reference_stats:
            path = self.protocol.reference_stats
            try:
                mu, sigma = fid.load_statistics(path)
            except (OSError, ValueError) as e:
                raise ProtocolError(f"--reference_stats {path}: {e}") from None
            if mu.shape != (inception.FEATURE_DIM,):
                raise ProtocolError(f"--reference_stats {path} holds {mu.shape[0]}-dim statistics, "
                                    f"expected the FID Inception's {inception.FEATURE_DIM}")
            digest = hashlib.sha256(paths.read_bytes(path)).hexdigest()
            self._reference = (mu, sigma, {
                "statistics_file": paths.absolute(path), "sha256": digest, "precomputed": True,
                "note": "precomputed statistics (pytorch-fid --save-stats / clean-fid): their images and "
                        "resizing are whatever made them, not this protocol's; no KID (needs features)"})
            self._reference_features = None
        if self._reference is None:
            p = self.protocol
            path, _ = coco.reference_cache_file(self.cache_dir, p.coco, p.reference_count, p.resolution,
                                                p.caption_seed, self.inception_params)
            if not paths.exists(path):
                self.log(f"reference statistics: computing from {p.coco} "
                         f"({'all' if p.reference_count is None else p.reference_count} images, "
                         f"{p.resolution}px) into {path}")
            mu, sigma = coco.reference_statistics(
                p.coco, self.inception_params, self.cache_dir, count=p.reference_count,
                size=p.resolution, seed=p.caption_seed, batch_size=p.inception_batch,
                data_dir=p.tfds_data_dir, mesh=self.mesh, progress=self.progress)
            meta = fid.load_statistics_meta(path)
            info = {"source": p.coco, "num_images": int(meta.get("num_images", -1)),
                    "count": "all" if p.reference_count is None else p.reference_count,
                    "subset_seed": p.caption_seed if p.reference_count is not None else None,
                    "preprocessing": coco.PREPROCESSING, "resolution": p.resolution,
                    "statistics_file": path}
            self._reference = (mu, sigma, info)
        return self._reference

    def reference_features(self) -> np.ndarray | None:
        """The reference images' features [M, 2048] (for KID); None for precomputed statistics or a
        cache made before features were kept."""
        if self._reference_features is None and not self.protocol.reference_stats:
            cache_file = self.reference()[2]["statistics_file"]
            d = coco.reference_features_dir(cache_file)
            store_file = os.path.join(d, "store.json")
            if paths.exists(store_file):
                layout = json.loads(paths.read_text(store_file))
                store = FeatureStore(d, layout["total"], layout["shard_size"], layout["dim"])
                if store.is_complete():
                    self._reference_features = store.concatenate()
        return self._reference_features

    # -- sampling -------------------------------------------------------------------

    def stage_records(self) -> list[dict]:
        return [{"source": paths.absolute(s.stage.source), "step": int(s.stage.step),
                 "resolution": int(s.stage.image_size), **dataclasses.asdict(s.settings)}
                for s in self.samplers]

    def made_with(self) -> dict:
        """What a shard's images were sampled on. The noise does not depend on it, but the float
        round-off does (XLA sums reductions in a shape-dependent order; in the tests one uint8 level
        on a few values of an SR stage), so each shard records it and fid.json lists it."""
        devices = jax.devices()
        dp = parallel.data_parallel_size(self.mesh) if self.mesh is not None else None
        return {"batch_size": self.protocol.batch_size, "data_parallel": dp,
                "devices": len(devices), "device_kind": devices[0].device_kind, "jax": jax.__version__}

    def generate(self, texts: Sequence[str], seed: int, ids: Sequence[int] | None = None) -> np.ndarray:
        """Captions -> uint8 [N, R, R, 3] at the evaluation resolution R, through the cascade; the
        noise of image n comes from (seed, ids[n]) alone (cascade.run_cascade's image_ids)."""
        chunk = max(self.protocol.batch_size, 64)
        embs, masks = [], []
        for start in range(0, len(texts), chunk):  # bounded text-encoder batches
            e, m = self.cond(list(texts[start:start + chunk]))
            embs.append(e)
            masks.append(m)
        if isinstance(embs[0], (list, tuple)):  # one (text, mask) per stage (mixed families, IF)
            text = [np.concatenate([np.asarray(e[k]) for e in embs]) for k in range(len(embs[0]))]
            mask = [np.concatenate([np.asarray(m[k]) for m in masks]) for k in range(len(masks[0]))]
        else:
            text, mask = np.concatenate(embs), np.concatenate(masks)
        outputs, _ = cascade.run_cascade(self.samplers, text, mask, seed,
                                         batch_size=self.protocol.batch_size or None, log=None, progress=False,
                                         image_ids=ids)
        return resize(outputs[-1], self.protocol.resolution)

    def sample_and_score(self, captions: coco.CaptionSample, directory: str, desc: str) -> dict:
        """Fill the feature shards of `captions` under `directory` (resuming), return
        {'features' [N, 2048], 'clip' [N] or None, 'shards_computed', 'seconds', 'images_per_second'}."""
        p = self.protocol
        n = len(captions.captions)
        texts = captions.texts
        _check_run_file(directory, {
            "captions_seed": captions.seed, "num_captions": n, "coco": p.coco,
            "captions_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
            "seed": p.seed, "noise": NOISE_SCHEME, "shard_size": p.shard_size, "resolution": p.resolution,
            "stages": self.stage_records(), "inception": self.inception_id(),
            "text_encoder": getattr(self.cond, "description", None)})
        store = FeatureStore(directory, n, p.shard_size, inception.FEATURE_DIM)
        clip_store = None
        if self.clip is not None:
            clip_store = FeatureStore(os.path.join(directory, "clip"), n, p.shard_size, 1)
            _check_run_file(clip_store.workdir, {"clip": paths.absolute(self.clip.source)})
        todo = sorted(set(store.missing()) | set(clip_store.missing() if clip_store else []))
        todo = todo[self.process::self.processes]  # this host's share (all of it on one host)
        shard_images = os.path.join(directory, "image_shards")
        paths.makedirs(shard_images)
        image_file = lambda i: os.path.join(shard_images, f"shard-{i:05d}.npy")  # noqa: E731
        made_with_file = lambda i: os.path.join(shard_images, f"shard-{i:05d}.json")  # noqa: E731
        # Shards whose features exist but lack a CLIP score are scored from their stored images.
        rescore = [i for i in todo if i not in store.missing() and paths.exists(image_file(i))]
        sample = [i for i in todo if i not in rescore]
        done_images = n - sum(stop - start for start, stop in map(store.shard_range, sample))
        if sample and done_images:
            self.log(f"{desc}: resuming, {store.num_shards - len(sample)} of {store.num_shards} shards sampled")
        if rescore:
            self.log(f"{desc}: CLIP score of {len(rescore)} stored shards (no new samples)")
        image_dir = os.path.join(directory, "images")
        if p.save_images:
            paths.makedirs(image_dir)
        from tqdm import tqdm

        bar = tqdm(total=n, initial=done_images, desc=desc, unit="img", disable=not self.progress,
                   smoothing=0.1)
        t0, made = time.time(), 0
        for index in rescore:
            start, stop = store.shard_range(index)
            clip_store.write(index, self.clip(_load_npy(image_file(index)),
                                              texts[start:stop])[:, None])
        for index in sample:
            start, stop = store.shard_range(index)
            # Noise keyed by caption index: batch size, device count and shard order do not matter.
            images = self.generate(texts[start:stop], p.seed, range(start, stop))
            _atomic_npy(image_file(index), images)
            if p.save_images:
                for i, img in zip(range(start, stop), images):
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="PNG")
                    paths.write_bytes(os.path.join(image_dir, f"{i:05d}.png"), buf.getvalue())
            feats = inception.features(self.inception_params, images, batch_size=p.inception_batch,
                                       mesh=self.mesh)
            if clip_store is not None:
                clip_store.write(index, self.clip(images, texts[start:stop])[:, None])
            _write_json(made_with_file(index), self.made_with())
            store.write(index, feats)  # last: a finished feature shard means its other outputs are there
            made += stop - start
            bar.update(stop - start)
        bar.close()
        todo = sample
        seconds = time.time() - t0  # this host's sampling (on a pod each host reports its own share)
        if self.processes > 1:
            parallel.sync_hosts(f"evaluate_fid {directory}: every host's shards written")
            if not self.primary:
                return {"features": None, "shards_computed": todo, "seconds": seconds}
            unfinished = sorted(set(store.missing()) | set(clip_store.missing() if clip_store else []))
            if unfinished:
                raise ProtocolError(f"{directory}: shards {unfinished[:8]} are missing after every host finished; "
                                    "the hosts do not share the workdir (give a gs:// --workdir)")
        made_with = {}  # provenance per shard: settings that move only float round-off (not refused)
        for index in range(store.num_shards):
            f = made_with_file(index)
            key = json.dumps(json.loads(paths.read_text(f)) if paths.exists(f) else {"unrecorded": True},
                             sort_keys=True)
            made_with.setdefault(key, []).append(index)
        return {"features": store.concatenate(),
                "clip": clip_store.concatenate()[:, 0].astype(np.float64) if clip_store else None,
                "made_with": [{"shards": v, **json.loads(k)} for k, v in made_with.items()],
                "shards_computed": todo, "seconds": seconds,
                "images_per_second": made / seconds if made and seconds > 0 else None}

    def score(self, captions: coco.CaptionSample, directory: str, desc: str) -> dict:
        """FID (and mean CLIP score) of one caption set; see `sample_and_score`."""
        res = self.sample_and_score(captions, directory, desc)
        if res["features"] is None:  # a host other than process 0 on a pod: it only sampled its share
            return {"fid": None, "num_samples": len(captions.captions),
                    "shards_computed": len(res["shards_computed"]), "seconds": round(res["seconds"], 3)}
        mu, sigma, _ = self.reference()
        value = fid_to_reference(res["features"], mu, sigma)
        clip = None if res["clip"] is None else float(np.mean(res["clip"]))
        kid = None
        ref_features = self.reference_features()
        if ref_features is not None:  # KID needs the features themselves, not just mu and sigma
            kid_mean, kid_std = fid.kernel_inception_distance(res["features"], ref_features)
            kid = {"mean": kid_mean, "std": kid_std, "num_subsets": 100,
                   "subset_size": min(1000, len(res["features"]), len(ref_features)),
                   "estimator": "unbiased MMD^2, kernel (x.y / 2048 + 1)^3 (fid.kernel_inception_distance)"}
        return {"fid": float(value), "kid": kid, "clip_score": clip, "num_samples": len(captions.captions),
                "shards_computed": len(res["shards_computed"]), "shards_made_with": res["made_with"],
                "seconds": round(res["seconds"], 3),
                "images_per_second": res["images_per_second"]}

    def _record(self, extra: dict | None) -> dict:
        p = self.protocol
        _, _, ref = self.reference()
        devices = jax.devices()
        return {
            **self.zero_shot(),
            "resolution": p.resolution, "resize_filter": RESIZE_FILTER,
            "captions": {"source": p.coco, "seed": p.caption_seed,
                         "num_available": len(self.all_captions())},
            "reference": ref,
            "generation": {"seed": p.seed, "noise": NOISE_SCHEME,
                           "shard_size": p.shard_size, "batch_size": p.batch_size,
                           "stages": self.stage_records()},
            "inception": {"fingerprint": self.inception_id(), "batch_size": p.inception_batch},
            "clip_model": paths.absolute(self.clip.source) if self.clip else None,
            "devices": {"count": len(devices), "kind": devices[0].device_kind,
                        "platform": devices[0].platform},
            "versions": software_versions(),
            **(extra or {}),
        }

    def zero_shot(self) -> dict:
        """'zero-shot' only when no stage was trained on COCO (a config whose data names coco)."""
        trained = []
        for s in self.samplers:
            config = getattr(s.stage, "config", None)
            data = config.get("data") if config is not None and hasattr(config, "get") else None
            names = " ".join(str(data.get(k, "")) for k in ("name", "files", "data_dir")) if data else ""
            if "coco" in names.lower():
                trained.append(paths.absolute(s.stage.source))
        if trained:
            return {"protocol": "FID, COCO 2014 val captions (not zero-shot: a stage was trained on COCO)",
                    "zero_shot": False, "trained_on_coco": trained}
        return {"protocol": "zero-shot FID, COCO 2014 val captions (Imagen COCO FID-30K)", "zero_shot": True}

    # -- the two results ---

    def evaluate(self, extra: dict | None = None) -> dict:
        """The main run: FID of num_samples captions -> EVAL_DIR/fid.json (returned)."""
        p = self.protocol
        if p.num_samples < 2:
            raise ProtocolError(f"num_samples must be >= 2 for a covariance, got {p.num_samples}")
        captions = self.draw_captions(p.num_samples, os.path.join(self.workdir, "captions.json"))
        if self.primary:
            self.reference()  # before sampling: a bad COCO source fails before hours of sampling
        res = self.score(captions, os.path.join(self.workdir, "samples"), "FID samples")
        if not self.primary:
            self.log(f"process {self.process}: sampled {res['shards_computed']} shards; process 0 writes fid.json")
            return res
        record = {**res, **self._record(extra), "captions_file": os.path.join(self.workdir, "captions.json")}
        _write_json(os.path.join(self.workdir, "fid.json"), record)
        clip = "" if res["clip_score"] is None else f", CLIP score {res['clip_score']:.2f}"
        self.log(f"FID {res['fid']:.3f} on {res['num_samples']} samples{clip} -> "
                 f"{os.path.join(self.workdir, 'fid.json')}")
        return record

    def evaluate_folder(self, folder: str, extra: dict | None = None) -> dict:
        """FID and KID of a folder of images (no model) -> EVAL_DIR/fid.json (returned). Every
        .png/.jpg/.jpeg/.webp file, in name order, preprocessed like the reference images (RGB,
        centre square crop, PIL BICUBIC to the resolution); features kept per shard (resumable)."""
        p = self.protocol
        if not paths.isdir(folder):
            raise ProtocolError(f"--images {folder!r} is not a directory")
        files = sorted(f for f in paths.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
        if len(files) < 2:
            raise ProtocolError(f"--images {folder!r} holds {len(files)} images (.png/.jpg/.jpeg/.webp); "
                                "FID needs at least 2")
        if self.processes > 1:
            raise ProtocolError("--images runs on one host: start it without jax.distributed (not on every worker)")
        directory = os.path.join(self.workdir, "folder")
        _check_run_file(directory, {"folder": paths.absolute(folder), "num_images": len(files),
                                    "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
                                    "shard_size": p.shard_size, "resolution": p.resolution,
                                    "inception": self.inception_id()})
        self.reference()
        store = FeatureStore(directory, len(files), p.shard_size, inception.FEATURE_DIM)
        from tqdm import tqdm

        missing = store.missing()
        bar = tqdm(total=len(files), initial=len(files) - sum(b - a for a, b in map(store.shard_range, missing)),
                   desc="images", unit="img", disable=not self.progress)
        for index in missing:
            a, b = store.shard_range(index)
            images = []
            for name in files[a:b]:
                try:
                    with Image.open(io.BytesIO(paths.read_bytes(os.path.join(folder, name)))) as im:
                        images.append(coco.preprocess_reference(im, p.resolution))
                except OSError as e:
                    raise ProtocolError(f"cannot read image {os.path.join(folder, name)}: {e}") from None
            store.write(index, inception.features(self.inception_params, np.stack(images),
                                                  batch_size=p.inception_batch, mesh=self.mesh))
            bar.update(b - a)
        bar.close()
        feats = store.concatenate()
        mu, sigma, ref = self.reference()
        value = float(fid_to_reference(feats, mu, sigma))
        kid = None
        ref_features = self.reference_features()
        if ref_features is not None:
            kid_mean, kid_std = fid.kernel_inception_distance(feats, ref_features)
            kid = {"mean": kid_mean, "std": kid_std, "num_subsets": 100,
                   "subset_size": min(1000, len(feats), len(ref_features))}
        devices = jax.devices()
        record = {"fid": value, "kid": kid, "num_samples": len(files), "images": paths.absolute(folder),
                  "protocol": "FID of a folder of images against COCO val2014 (no model)",
                  "preprocessing": coco.PREPROCESSING, "resolution": p.resolution, "reference": ref,
                  "inception": {"fingerprint": self.inception_id(), "batch_size": p.inception_batch},
                  "devices": {"count": len(devices), "kind": devices[0].device_kind},
                  "versions": software_versions(), **(extra or {})}
        _write_json(os.path.join(self.workdir, "fid.json"), record)
        self.log(f"FID {value:.3f} on {len(files)} samples -> {os.path.join(self.workdir, 'fid.json')}")
        return record

    def sweep(self, weights: Sequence[float], num_samples: int, extra: dict | None = None) -> dict:
        """FID (and CLIP score) per base-stage guidance weight on `num_samples` captions.

        The same captions and seeds for every weight (common random numbers: differences come
        from the weight). The compiled base sampler is reused: guidance is a traced input of its
        program. Writes sweep.json, sweep.md, sweep.png and sweep.svg under EVAL_DIR; returns the record.
        """
        if not weights:
            raise ProtocolError("no guidance weights to sweep")
        bad = [w for w in weights if not math.isfinite(w)]
        if bad:
            raise ProtocolError(f"guidance weights must be finite, got {bad}")
        if num_samples < 2:
            raise ProtocolError(f"sweep_samples must be >= 2, got {num_samples}")
        sweep_dir = os.path.join(self.workdir, "sweep")
        captions = self.draw_captions(num_samples, os.path.join(sweep_dir, "captions.json"))
        if self.primary:
            self.reference()
        base = self.samplers[0]
        original = base.settings
        rows = []
        try:
            for w in weights:
                base.settings = dataclasses.replace(original, guidance=float(w))
                res = self.score(captions, os.path.join(sweep_dir, f"guidance_{w:g}"), f"guidance {w:g}")
                rows.append({"guidance": float(w), **res})
                if self.primary:
                    clip = "" if res["clip_score"] is None else f", CLIP score {res['clip_score']:.2f}"
                    self.log(f"guidance {w:g}: FID {res['fid']:.3f}{clip}")
        finally:
            base.settings = original
        if not self.primary:
            return {"rows": rows, "num_samples": num_samples}
        record = {"rows": rows, "num_samples": num_samples, "guidance_applies_to": "base stage",
                  **self._record(extra), "captions_file": os.path.join(sweep_dir, "captions.json")}
        _write_json(os.path.join(self.workdir, "sweep.json"), record)
        table = sweep_table(rows)
        _write_text(os.path.join(self.workdir, "sweep.md"), table)
        plot_sweep(rows, os.path.join(self.workdir, "sweep.png"),
                   title=f"{'zero-shot ' if self.zero_shot()['zero_shot'] else ''}FID, COCO val2014, "
                         f"{num_samples} samples, {self.protocol.resolution}px")
        self.log(table)
        return record


# ----------------------------------------------------------------------------
# Sweep table and plot
# ----------------------------------------------------------------------------


def sweep_table(rows: Sequence[dict]) -> str:
    """Markdown table: guidance | FID | CLIP score | samples."""
    lines = ["| guidance | FID | CLIP score | samples |", "|---:|---:|---:|---:|"]
    for r in rows:
        clip = "-" if r.get("clip_score") is None else f"{r['clip_score']:.2f}"
        lines.append(f"| {r['guidance']:g} | {r['fid']:.3f} | {clip} | {r['num_samples']} |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: Sequence[dict], path: str, *, title: str = "") -> None:
    """FID vs guidance weight; with CLIP scores, a second panel FID vs CLIP score (the trade-off
    curve of the Imagen paper, each point labelled with its weight). Drawn with matplotlib: the
    PNG at `path` and a vector SVG beside it (same name, .svg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display on evaluation machines
    import matplotlib.pyplot as plt

    ws = [r["guidance"] for r in rows]
    fids = [r["fid"] for r in rows]
    clips = [r.get("clip_score") for r in rows]
    has_clip = bool(rows) and all(c is not None for c in clips)
    fig, axes = plt.subplots(1, 2 if has_clip else 1, figsize=(11.2 if has_clip else 5.6, 4.2), squeeze=False)
    ax = axes[0][0]
    ax.plot(ws, fids, "o-", color="tab:blue")
    ax.set_xlabel("guidance weight")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    if has_clip:
        ax = axes[0][1]
        ax.plot(clips, fids, "o-", color="tab:blue")
        for w, c, f in zip(ws, clips, fids):  # offset labels: matplotlib keeps them inside the axes
            ax.annotate(f"w={w:g}", (c, f), textcoords="offset points", xytext=(5, 5), fontsize=8, color="0.35")
        ax.set_xlabel("CLIP score")
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    for target, fmt in ((path, "png"), (os.path.splitext(path)[0] + ".svg", "svg")):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=100)
        paths.write_bytes(target, buf.getvalue())
    plt.close(fig)


__all__ = ["ClipScorer", "Evaluator", "Protocol", "ProtocolError", "RESIZE_FILTER", "fid_to_reference",
           "plot_sweep", "resize", "software_versions", "sweep_table"]
