"""imagen_jax: Imagen-style cascaded text-to-image diffusion in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
    # imagen_jax.Pipeline without importing jax and flax for `import imagen_jax` alone.
    if name == "Pipeline":
        from imagen_jax.pipeline import Pipeline
        return Pipeline
    raise AttributeError(f"module 'imagen_jax' has no attribute {name!r}")
