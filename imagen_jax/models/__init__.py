"""U-Nets and their layers. Imports jax and flax only."""
from imagen_jax.models.layers import TEXT_CACHE
from imagen_jax.models.unet import UNet, UNetConfig, cast_kernels, count_params, init_inputs, param_shapes, text_cache, upsample_lowres

__all__ = ["TEXT_CACHE", "UNet", "UNetConfig", "cast_kernels", "count_params", "init_inputs", "param_shapes", "text_cache", "upsample_lowres"]
