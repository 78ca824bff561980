"""U-Net: shapes of each tiny stage, text masking, paper sizes, bad input."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models import UNet, UNetConfig, count_params, init_inputs, param_shapes


def stage_config(name, variant="tiny"):
    return importlib.import_module(f"configs.{name}").get_config(variant)


def model_config(name, variant="tiny"):
    return UNetConfig.from_dict(stage_config(name, variant).model.to_dict())


@pytest.mark.parametrize("name", ["base64", "sr256", "sr1024"])
def test_tiny_output_shapes(name):
    cfg = model_config(name)
    model = UNet(cfg)
    inputs = init_inputs(cfg, batch=2, text_len=6)
    params = model.init(jax.random.PRNGKey(0), **inputs)["params"]
    rng = np.random.default_rng(0)
    inputs = {k: (jnp.asarray(rng.normal(size=v.shape), v.dtype) if v.dtype != bool else v) for k, v in inputs.items()}
    out = model.apply({"params": params}, **inputs)
    assert out.shape == (2, cfg.image_size, cfg.image_size, cfg.out_channels)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def _perturb_params(params, seed=1, scale=0.05):
    # Zero-initialised output layers would make every output 0: give all weights random values.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("name", ["base64", "sr1024"])  # self-attention with text; pure cross-attention
def test_masked_text_tokens_do_not_change_output(name):
    cfg = model_config(name)
    model = UNet(cfg)
    inputs = init_inputs(cfg, batch=2, text_len=8)
    params = _perturb_params(model.init(jax.random.PRNGKey(0), **inputs)["params"])
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.normal(size=inputs["text"].shape), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], bool)
    x = jnp.asarray(rng.normal(size=inputs["x"].shape), jnp.float32)
    kw = {k: v for k, v in inputs.items() if k not in ("x", "text", "text_mask")}
    out1 = model.apply({"params": params}, x=x, text=text, text_mask=mask, **kw)
    garbage = jnp.where(mask[..., None], text, 1e3 * jnp.asarray(rng.normal(size=text.shape), jnp.float32))
    out2 = model.apply({"params": params}, x=x, text=garbage, text_mask=mask, **kw)
    np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-5)
    # ... while the unmasked tokens do matter.
    # (a random change: LayerNorm would undo a constant shift)
    changed = text.at[:, 0].set(jnp.asarray(rng.normal(size=text[:, 0].shape), jnp.float32))
    out3 = model.apply({"params": params}, x=x, text=changed, text_mask=mask, **kw)
    assert np.abs(np.asarray(out3 - out1)).max() > 1e-4
    # An all-padding prompt (the unconditional branch) gives finite output.
    out4 = model.apply({"params": params}, x=x, text=text, text_mask=jnp.zeros_like(mask), **kw)
    assert np.all(np.isfinite(out4))


@pytest.mark.parametrize("name,target", [("base64", 2.0e9), ("sr256", 600e6), ("sr1024", 400e6)])
def test_paper_parameter_counts(name, target):
    n = count_params(param_shapes(model_config(name, "paper")))
    assert abs(n - target) / target < 0.10, n


def test_every_parameter_has_logical_axes():
    import flax.linen as nn
    shapes = param_shapes(model_config("sr1024"))
    leaves = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves)


def test_bad_image_size():
    cfg = model_config("base64")
    model = UNet(cfg)
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **init_inputs(cfg, image_size=17)))


def test_unknown_model_key():
    with pytest.raises(ValueError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({"base_channel": 3})


def test_remat_matches_plain():
    cfg = model_config("base64")
    cfg_r = UNetConfig.from_dict({**cfg.to_dict(), "remat": True})
    inputs = init_inputs(cfg, batch=2)
    params = _perturb_params(UNet(cfg).init(jax.random.PRNGKey(0), **inputs)["params"], scale=0.01)

    def loss(p, c):
        return jnp.sum(UNet(c).apply({"params": p}, **inputs) ** 2)

    g1 = jax.grad(loss)(params, cfg)
    g2 = jax.grad(loss)(params, cfg_r)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        # float32 re-association under rematerialisation; a wrong gradient is off by O(1).
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
