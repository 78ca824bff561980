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


# The paper layouts' exact counts (README "Models" has the arithmetic) and the paper's stated sizes.
# The layouts follow App. F and Figs. A.28-A.30; the stated sizes are round numbers that the layouts
# miss by the documented margins (base +14%, SR256 -20%, SR1024 +15%) rather than extra layers.
PAPER_COUNTS = {"base64": (2_281_857_027, 2.0e9, 0.15), "sr256": (481_942_915, 600e6, 0.20),
                "sr1024": (458_151_299, 400e6, 0.15)}


@pytest.fixture(scope="module")
def paper_shapes():
    import flax.linen as nn
    return {name: nn.meta.unbox(param_shapes(model_config(name, "paper"))) for name in PAPER_COUNTS}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(paper_shapes, name):
    exact, stated, margin = PAPER_COUNTS[name]
    n = count_params(paper_shapes[name])
    assert n == exact, n
    assert abs(n - stated) / stated <= margin


@pytest.mark.parametrize("name,mode", [("sr256", "attn"), ("sr1024", "xattn")])
def test_sr_attention_one_layer_per_lowest_block_8_heads_twice_the_width(paper_shapes, name, mode):
    # Figs. A.28/A.29: one attention layer in the lowest DBlock and one in the lowest UBlock, 8
    # heads, hidden size 2 x 1024 channels; SR1024 places its (cross-)attention the same way (F.3).
    shapes = paper_shapes[name]
    assert sorted(k for k in shapes if "attn" in k) == [f"down3_{mode}", f"up3_{mode}"]
    cfg = model_config(name, "paper")
    assert cfg.attn_heads * cfg.head_dim == 2 * cfg.base_channels * cfg.channel_mults[-1]
    proj = shapes["down3_attn"]["qkv"] if mode == "attn" else shapes["down3_xattn"]["q"]
    assert proj["kernel"].shape[-1] == (3 if mode == "attn" else 1) * 2048


def test_base_resamples_with_biggan_blocks(paper_shapes):
    # F.1 res_block_type "biggan": each down/up-sampling is a conditioned residual block
    # (two 3x3 convolutions and the embedding projection), not a strided or upsampling conv.
    shapes = paper_shapes["base64"]
    names = sorted(k for k in shapes if k.startswith(("down", "up")) and k.endswith(("_pool", "_upsample")))
    assert names == ["down0_pool", "down1_pool", "down2_pool", "up1_upsample", "up2_upsample", "up3_upsample"]
    for k in names:
        assert {"conv1", "conv2", "emb_proj", "norm1", "norm2"} <= set(shapes[k]), k
        assert "skip" not in shapes[k]  # same width in and out: identity skip, as ADM


@pytest.mark.parametrize("resample", ["down", "up"])
def test_biggan_block_resamples_skip_and_branch(resample):
    from imagen_jax.models import layers
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
    emb = jax.random.normal(jax.random.PRNGKey(1), (2, 32))
    block = layers.ResBlock(16, num_groups=4, resample=resample)
    import flax.linen as nn
    params = nn.meta.unbox(block.init(jax.random.PRNGKey(2), x, emb))
    out = block.apply(params, x, emb)
    # At initialisation the branch's last conv is zero, so the block is its skip: the resampled input.
    if resample == "down":
        ref = np.asarray(x).reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4))
    else:
        ref = np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    # ... and the branch works at the new resolution (a perturbed conv2 changes the output).
    p2 = {"params": {**params["params"], "conv2": {**params["params"]["conv2"],
                                                   "kernel": 0.1 * jnp.ones_like(params["params"]["conv2"]["kernel"])}}}
    assert np.abs(np.asarray(block.apply(p2, x, emb)) - ref).max() > 1e-3


@pytest.mark.parametrize("kernel,stride,dtype", [(3, 1, "float32"), (1, 1, "float32"), (3, 2, "float32"),
                                                  (3, 1, "bfloat16")])
def test_conv_is_flax_conv_with_an_ohwi_kernel(kernel, stride, dtype):
    # The kernel is stored [out, kh, kw, in] (cuDNN's layout for NHWC, so the optimizer update reads
    # its gradient untransposed); the layer must compute exactly nn.Conv with that kernel as HWIO.
    import flax.linen as nn
    from imagen_jax.models import layers
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 5))
    layer = layers.Conv(7, kernel, stride, jnp.dtype(dtype))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x))["params"]
    assert params["kernel"].shape == (7, kernel, kernel, 5) and params["kernel"].dtype == jnp.float32
    params = {"kernel": params["kernel"], "bias": jax.random.normal(jax.random.PRNGKey(2), (7,))}
    ref = nn.Conv(7, (kernel, kernel), strides=(stride, stride), padding="SAME", dtype=jnp.dtype(dtype))
    hwio = {"kernel": params["kernel"].transpose(1, 2, 3, 0), "bias": params["bias"]}
    out = layer.apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(ref.apply({"params": hwio}, x), np.float32))
    assert out.dtype == jnp.dtype(dtype)
    # lecun_normal over the right fan-in (kh * kw * in), whatever the layout.
    big = nn.meta.unbox(layers.Conv(256, 3).init(jax.random.PRNGKey(3), jnp.zeros((1, 4, 4, 64))))["params"]
    assert abs(float(jnp.std(big["kernel"])) * np.sqrt(9 * 64) - 1.0) < 0.02


def test_upsample_nearest_is_resize_nearest():
    from imagen_jax.models import layers
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4))
    np.testing.assert_array_equal(layers.upsample_nearest(x), jax.image.resize(x, (2, 10, 6, 4), "nearest"))


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


def _random_inputs(cfg, batch=2, text_len=6, seed=0):
    inputs = init_inputs(cfg, batch=batch, text_len=text_len)
    rng = np.random.default_rng(seed)
    return {k: (jnp.asarray(rng.normal(size=v.shape), v.dtype) if v.dtype != bool else v) for k, v in inputs.items()}


def test_cast_kernels_is_exact_in_bf16(name="base64"):
    # StageSampler casts kernels once before its loop; the layers would cast them anyway, so the
    # output must be bit-identical. Conv and dense kernels change dtype; the float32 noise-level
    # MLPs, norms and biases do not.
    from imagen_jax.models import cast_kernels
    from imagen_jax.models.unet import FLOAT32_MODULES

    cfg = UNetConfig.from_dict({**stage_config(name).model.to_dict(), "dtype": "bfloat16"})
    model = UNet(cfg)
    params = _perturb_params(model.init(jax.random.PRNGKey(0), **init_inputs(cfg, batch=2, text_len=6))["params"])
    inputs = _random_inputs(cfg)
    cast = cast_kernels(cfg, params)
    flat = jax.tree_util.tree_flatten_with_path(cast)[0]
    dtypes = {tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)): leaf.dtype.name for path, leaf in flat}
    assert {d for p, d in dtypes.items() if p[-1] == "kernel" and not set(p) & set(FLOAT32_MODULES)} == {"bfloat16"}
    assert {d for p, d in dtypes.items() if p[-1] != "kernel" or set(p) & set(FLOAT32_MODULES)} == {"float32"}
    assert any(p[-2] == "qkv" for p in dtypes) and any(p[-2] == "conv_in" for p in dtypes)
    a = model.apply({"params": params}, **inputs)
    b = model.apply({"params": cast}, **inputs)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name,remat", [("base64", True), ("sr256", False)])
def test_text_cache_replaces_the_text_projections(name, remat):
    # The sampler computes the text's projections once (at the smallest image size) and passes them
    # back at every step: the output must equal the uncached call's, and the cached call must not
    # read the text at all (zeros in its place give the same output).
    from imagen_jax.models import text_cache

    cfg = UNetConfig.from_dict({**stage_config(name).model.to_dict(), "remat": remat,
                                "cross_attn_levels": stage_config(name).model.attn_levels})
    model = UNet(cfg)
    variables = model.init(jax.random.PRNGKey(0), **init_inputs(cfg, batch=2, text_len=6))
    assert set(variables) == {"params"}  # init must not leave a cache of its dummy text behind
    params = _perturb_params(variables["params"])
    inputs = _random_inputs(cfg, seed=1)
    inputs["text_mask"] = jnp.asarray([[True] * 4 + [False] * 2, [True] * 6])
    cache = text_cache(model, params, inputs["text"], inputs["text_mask"])
    names = {getattr(k, "key", None) for p, _ in jax.tree_util.tree_flatten_with_path(cache)[0] for k in p}
    assert "pooled" in names and "kv" in names
    ref = model.apply({"params": params}, **inputs)
    blank = {**inputs, "text": jnp.zeros_like(inputs["text"])}
    out = model.apply({"params": params, "text_cache": cache}, **blank)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(model.apply({"params": params}, **blank)) - np.asarray(ref)).max() > 1e-3

