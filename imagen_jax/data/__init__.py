"""Input pipelines (`make_iterator`) and the embedded shapes dataset; TensorFlow is imported
only when a "tfds" or "tfrecord" source is used (and by `shapes_tfds`, the TFDS builder)."""
from imagen_jax.data.pipeline import DatasetError, StageSizes, make_iterator, resize_with_crop, write_tfrecords
from imagen_jax.data.shapes import (ShapesDataset, caption_color, color_alignment, dominant_color,
                                    held_out_prompts)

__all__ = ["DatasetError", "StageSizes", "make_iterator", "resize_with_crop", "write_tfrecords",
           "ShapesDataset", "caption_color", "color_alignment", "dominant_color", "held_out_prompts"]
