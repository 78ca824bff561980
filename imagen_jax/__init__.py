"""imagen_jax: Imagen-style cascaded text-to-image diffusion in JAX/Flax."""
