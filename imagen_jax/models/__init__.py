"""U-Nets and their layers. Imports jax and flax only."""
from imagen_jax.models.unet import UNet, UNetConfig, cast_kernels, count_params, init_inputs, param_shapes, text_cache, upsample_lowres

__all__ = ["UNet", "UNetConfig", "cast_kernels", "count_params", "init_inputs", "param_shapes", "text_cache", "upsample_lowres"]
