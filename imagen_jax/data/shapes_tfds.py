"""The embedded shapes dataset as a TFDS dataset, "imagen_shapes" (no network needed to build).

    import imagen_jax.data.shapes_tfds  # registers the builder
    builder = tfds.builder("imagen_shapes/tiny", data_dir="/tmp/tfds")
    builder.download_and_prepare()

or, for training, config.data.source="tfds", config.data.name="imagen_shapes/64" (the "tfds"
source imports this module itself). Splits: train = `ShapesDataset` indices [0, num_train),
validation = the next num_validation indices, held_out = the held-out (shape, colour) pairs
(`shapes.HELD_OUT`). Features: image (PNG), caption (the one `ShapesDataset` picks),
captions/text (every caption template for the example, COCO-style) and the attributes.
"""
from __future__ import annotations

import tensorflow_datasets as tfds

from imagen_jax.data import shapes

__all__ = ["ImagenShapes", "ShapesBuilderConfig"]


class ShapesBuilderConfig(tfds.core.BuilderConfig):
    def __init__(self, *, image_size: int, num_train: int, num_validation: int, num_held_out: int,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.num_train = num_train
        self.num_validation = num_validation
        self.num_held_out = num_held_out
        self.seed = seed


def _config(name: str, size: int, train: int, validation: int, held_out: int) -> ShapesBuilderConfig:
    return ShapesBuilderConfig(
        name=name, image_size=size, num_train=train, num_validation=validation, num_held_out=held_out,
        description=f"{size}x{size} images; {train} train, {validation} validation, {held_out} held-out")


class ImagenShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural captioned shapes and words (imagen_jax.data.shapes), generated locally."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        _config("tiny", 64, 64, 16, 12),          # tests
        _config("64", 64, 200_000, 2_000, 1_200),
        _config("256", 256, 100_000, 1_000, 600),
        _config("1024", 1024, 20_000, 500, 300),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        text = tfds.features.Text
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "caption": text(),
                "captions": tfds.features.Sequence({"text": text()}),
                "kind": text(),          # shape | text
                "shape": text(),         # "" for words
                "word": text(),          # "" for shapes
                "color": text(),
                "size": text(),
                "position": text(),
                "background": text(),
            }),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", 0, cfg.num_train),
            "validation": self._generate_examples("train", cfg.num_train, cfg.num_validation),
            "held_out": self._generate_examples("held_out", 0, cfg.num_held_out),
        }

    def _generate_examples(self, stream: str, start: int, count: int):
        cfg = self.builder_config
        dataset = shapes.ShapesDataset(seed=cfg.seed, size=cfg.image_size)
        item = dataset.held_out_item if stream == "held_out" else dataset.__getitem__
        for index in range(start, start + count):
            image, caption, attrs = item(index)
            captions = shapes.all_captions(attrs)
            yield f"{stream}_{index}", {
                "image": image, "caption": caption, "captions": {"text": captions},
                "kind": attrs["kind"], "shape": attrs.get("shape", ""), "word": attrs.get("word", ""),
                "color": attrs["color"], "size": attrs.get("size", ""),
                "position": attrs.get("position", ""), "background": attrs["background"],
            }
