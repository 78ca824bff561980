"""DeepFloyd IF U-Net (models/deepfloyd_if.py) against diffusers' UNet2DConditionModel on the same weights.

Tiny random diffusers U-Nets of the IF block family are built here, saved with save_pretrained (single
file, sharded, fp16 variant) and run by both sides in float32 at the highest matmul precision.

Tolerance: max |jax - torch| <= 1e-5 * max |torch| (measured 2.3e-6 to 2.5e-6). Both sides evaluate the
same float32 formulas, so what is left is float32 rounding in a different operation order (convs,
GroupNorm reductions, softmax) through ~15 layers; the reference facts reach 5e-9 .. 1.4e-8 against a
float64 re-derivation, which puts diffusers' own float32 error at a few 1e-6 too.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # a test requirement (requirements-test.txt): fails loudly in CI if absent
diffusers = pytest.importorskip("diffusers")

from configs import common  # noqa: E402
from imagen_jax import parallel  # noqa: E402
from imagen_jax.models import deepfloyd_if as dif  # noqa: E402

RTOL = 1e-5
TEXT_DIM = 48

STAGE_I = dict(
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=8, cross_attention_dim=32,
    encoder_hid_dim=TEXT_DIM, encoder_hid_dim_type="text_proj", addition_embed_type="text",
    addition_embed_type_num_heads=2, act_fn="gelu", resnet_time_scale_shift="scale_shift",
    cross_attention_norm="group_norm", norm_num_groups=8)
# Stage II's flags, each on: noise-level class embedding, 6 input channels, skip-time-act resnets,
# the 1/0.7071 output divisors, a time embedding of its own width with an activation after the sum.
STAGE_II = dict(STAGE_I, in_channels=6, class_embed_type="timestep", mid_block_scale_factor=1 / 0.7071,
                resnet_out_scale_factor=1 / 0.7071, resnet_skip_time_act=True, time_embedding_act_fn="gelu",
                time_embedding_dim=64, layers_per_block=[1, 2])
# List-valued fields (reference 2.8): attention_head_dim indexed unreversed by the up blocks, reversed
# only_cross_attention / layers_per_block / cross_attention_dim; mid_block_only_cross_attention defaults to
# False for a list. No text projection or pooling (diffusers cannot build them with a list cross_attention_dim).
LISTS = dict(
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=[32, 64, 96], layers_per_block=[1, 2, 1],
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=[8, 16, 32],
    only_cross_attention=[False, True, False], cross_attention_dim=[32, 32, 32], act_fn="gelu",
    resnet_time_scale_shift="scale_shift", cross_attention_norm="group_norm", norm_num_groups=8)
# Keys the loader must fill with diffusers' defaults, which differ from IF's: act_fn silu,
# resnet_time_scale_shift "default" (time added before norm2), cross_attention_norm None, attention_head_dim 8.
DROPPED = ("act_fn", "resnet_time_scale_shift", "cross_attention_norm", "attention_head_dim",
           "mid_block_scale_factor", "flip_sin_to_cos", "freq_shift", "norm_eps")
DEFAULTS = {k: v for k, v in STAGE_I.items() if k not in DROPPED}


def _torch_unet(cfg, seed):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():  # zero-initialised layers would hide bugs: give every weight random values
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.set_attn_processor(AttnAddedKVProcessor())  # the classic processor: softmax in float32
    return model


def _inputs(cfg, seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], 16, 16, generator=g)
    text_dim = cfg.get("encoder_hid_dim") or np.atleast_1d(cfg["cross_attention_dim"])[-1]
    text = torch.randn(batch, 7, int(text_dim), generator=g)
    t = torch.tensor([999, 0][:batch] if batch == 2 else [500] * batch)
    noise_level = torch.tensor([250] * batch) if cfg.get("class_embed_type") else None
    return x, t, text, noise_level


def _torch_out(model, x, t, text, noise_level):
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=text, class_labels=noise_level).sample.numpy()


def _jax_out(module, params, x, t, text, noise_level):
    with jax.default_matmul_precision("highest"):
        out = jax.jit(module.apply)({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
                           jnp.asarray(text.numpy()),
                           noise_level=None if noise_level is None else jnp.asarray(noise_level.numpy()))
    return np.asarray(out).transpose(0, 3, 1, 2)


def _assert_close(out, ref):
    err = np.abs(out - ref).max()
    assert out.shape == ref.shape
    assert err <= RTOL * np.abs(ref).max(), (err, np.abs(ref).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{case: (unet_dir, torch model, reference output, inputs)} for the four configs."""
    torch.backends.cudnn.allow_tf32 = False
    root = tmp_path_factory.mktemp("if_unets")
    cases = {}
    for seed, (name, cfg) in enumerate([("stage_i", STAGE_I), ("stage_ii", STAGE_II), ("lists", LISTS),
                                        ("defaults", DEFAULTS)]):
        model = _torch_unet(cfg, seed)
        d = root / name
        if name == "stage_ii":  # a sharded save: several files and an index
            model.save_pretrained(d, max_shard_size="100KB")
        else:
            model.save_pretrained(d)
        if name == "defaults":
            raw = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k not in DROPPED}))
        inputs = _inputs(cfg, 10 + seed)
        cases[name] = (d, model, _torch_out(model, *inputs), inputs)
    return cases


@pytest.mark.parametrize("name", ["stage_i", "stage_ii", "lists", "defaults"])
def test_matches_diffusers(saved, name):
    d, _, ref, inputs = saved[name]
    module, params = dif.load_unet(d)
    _assert_close(_jax_out(module, params, *inputs), ref)


def test_sharded_save_and_absent_keys_are_what_they_claim(saved):
    files = sorted(os.listdir(saved["stage_ii"][0]))
    assert f"{dif.WEIGHTS}.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    raw = json.loads((saved["defaults"][0] / "config.json").read_text())
    assert not set(DROPPED) & set(raw)
    cfg = dif.resolve_config(raw)
    assert (cfg.act_fn, cfg.resnet_time_scale_shift, cfg.cross_attention_norm, cfg.attention_head_dim) == (
        "silu", "default", None, (8, 8))
    lists = dif.resolve_config(dict(LISTS))
    assert lists.mid_block_only_cross_attention is False and lists.layers_per_block == (1, 2, 1)


def test_fp16_variant(saved, tmp_path):
    """An fp16-variant save is chosen for dtype float16 and upcast exactly for float32; with both
    files present float32 reads the float32 file (no fp16 rounding)."""
    d, model, _, inputs = saved["stage_i"]
    half = _torch_unet(STAGE_I, 0).half()  # seed 0: the stage_i model, rounded to float16
    half.save_pretrained(tmp_path, variant="fp16")
    assert sorted(os.listdir(tmp_path)) == ["config.json", f"{dif.WEIGHTS}.fp16.safetensors"]
    module16, p16 = dif.load_unet(tmp_path, dtype=jnp.float16, compute_dtype=jnp.float32)
    assert {x.dtype for x in jax.tree_util.tree_leaves(p16)} == {jnp.dtype(jnp.float16)}
    _, p32 = dif.load_unet(tmp_path)  # only the fp16 file here: upcast
    assert {x.dtype for x in jax.tree_util.tree_leaves(p32)} == {jnp.dtype(jnp.float32)}
    sd = {k: v.float().numpy() for k, v in half.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(p32["conv_in"]["kernel"]), sd["conv_in.weight"].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(p32["time_embedding"]["linear_1"]["kernel"]), sd["time_embedding.linear_1.weight"].T)
    # fp16 weights, float32 compute: the same numbers as torch's float32 model on the rounded weights
    ref = _torch_out(half.float(), *inputs)
    _assert_close(_jax_out(module16, p16, *inputs), ref)
    # both variants present: float32 takes the float32 file
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            os.link(d / f, tmp_path / f)
    _, p32 = dif.load_unet(tmp_path)
    np.testing.assert_array_equal(np.asarray(p32["conv_in"]["kernel"]),
                                  model.state_dict()["conv_in.weight"].numpy().transpose(0, 2, 3, 1))


def test_loads_straight_into_shards(saved):
    """With shardings, each weight is created sharded over the mesh (8 CPU devices, fsdp 8), each
    device holding only its slice, and the assembled values are exactly the unsharded load's."""
    d = saved["stage_i"][0]
    mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    _, params = dif.load_unet(d, shardings=lambda p: parallel.logical_shardings(p, mesh, common.DEFAULT_RULES))
    k = params["down_blocks_1"]["attentions_0"]["to_q"]["kernel"]
    assert k.sharding.spec[0] == "fsdp" and len(k.addressable_shards) == 8
    assert k.addressable_shards[0].data.shape == (64 // 8, 64)
    conv = params["down_blocks_1"]["resnets_0"]["conv2"]["kernel"]  # OHWI: input channels over fsdp
    assert conv.addressable_shards[0].data.shape == (64, 3, 3, 64 // 8)
    _, plain = dif.load_unet(d)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, plain)


@pytest.mark.parametrize("name, config, count, tensors", [
    ("IF-I-XL", dif.IF_I_XL, 4_304_695_110, 775), ("IF-II-L", dif.IF_II_L, 1_243_277_190, 939)])
def test_real_sizes(name, config, count, tensors):
    shapes = dif.param_shapes(dif.build_unet(config, jnp.bfloat16))
    leaves = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct) or hasattr(x, "names"))
    assert dif.count_params(shapes) == count and len(leaves) == tensors
    # Every parameter is named for the mesh rules, and FSDP over 8 chips leaves nothing large replicated.
    assert all(hasattr(x, "names") for x in leaves), name
    mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    parallel.check_sharded(shapes, parallel.logical_shardings(shapes, mesh, common.DEFAULT_RULES), mesh, 1 << 20)


def test_bin_only_and_missing_config(tmp_path, saved):
    with pytest.raises(dif.IFConfigError, match=r"config\.json: no such file"):
        dif.load_unet(tmp_path)
    (tmp_path / "config.json").write_text((saved["stage_i"][0] / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(dif.IFConfigError, match=r"only PyTorch \.bin weights .*never unpickled; download "):
        dif.load_unet(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(down_block_types=["DownBlock2D", "SimpleCrossAttnDownBlock2D"]), "down_block_types entry 'DownBlock2D'"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type='UNetMidBlock2DCrossAttn'"),
    (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift='spatial'"),
    (dict(class_embed_type="projection"), "class_embed_type='projection'"),
    (dict(encoder_hid_dim_type="image_proj"), "encoder_hid_dim_type='image_proj'"),
    (dict(layers_per_block=[1, 1, 1]), "layers_per_block has 3 entries"),
])
def test_unsupported_config(change, match):
    with pytest.raises(dif.IFConfigError, match=match):
        dif.resolve_config(dict(STAGE_I, **change))


def test_absent_block_types_get_diffusers_defaults_and_fail_clearly():
    # diffusers' default blocks are the Stable Diffusion family, which this U-Net does not build
    with pytest.raises(dif.IFConfigError, match="down_block_types entry 'CrossAttnDownBlock2D'"):
        dif.resolve_config({k: v for k, v in STAGE_I.items() if k not in ("down_block_types", "block_out_channels")})


def test_mismatched_weights(tmp_path, saved):
    d = saved["stage_i"][0]
    cfg = json.loads((d / "config.json").read_text())
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            os.link(d / f, tmp_path / f)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, layers_per_block=2)))
    with pytest.raises(dif.IFConfigError, match=r"parameter\(s\) missing from the checkpoint \['down_blocks_0\.resnets_1"):
        dif.load_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, out_channels=3)))
    with pytest.raises(dif.IFConfigError, match=r"2 tensor\(s\) have the wrong shape for config\.json: \['conv_out\.bias \(6,\)'"):
        dif.load_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, addition_embed_type=None)))
    with pytest.raises(dif.IFConfigError, match=r"checkpoint tensor\(s\) not in the model \['add_embedding"):
        dif.load_unet(tmp_path)


def test_stage_ii_needs_noise_level(saved):
    d, _, _, (x, t, text, _) = saved["stage_ii"]
    module, params = dif.load_unet(d)
    with pytest.raises(ValueError, match="pass noise_level"):
        _jax_out(module, params, x, t, text, None)
