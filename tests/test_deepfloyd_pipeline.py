"""DeepFloyd IF sampling, text and pipeline against diffusers itself: the discrete scheduler alone
(DDPM learned-range + thresholding, DDIM), the prompt embeddings, and whole stage I / stage II runs
of tiny random pipelines built with diffusers and saved with save_pretrained, replayed here with
diffusers' recorded noise. Bad layouts and the licence gate give one clear message each.

Tolerances: everything runs in float32 on both sides (JAX at "highest" matmul precision); the only
differences are float32 rounding in differently ordered sums (convs, matmuls, softmax), which the
chain carries forward. Measured errors are ~1e-7 (scheduler) to ~1e-6 (pipelines); the bounds below
leave ~10x headroom and are still 4-5 orders of magnitude below any real discrepancy (a wrong
variance, threshold or guidance formula moves outputs by >= 1e-2).
"""
import contextlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import discrete
from imagen_jax.text import hf_t5, train_sentencepiece

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

IF_I_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02, clip_sample=True,
                      clip_sample_range=1.0, dynamic_thresholding_ratio=0.95, num_train_timesteps=1000,
                      prediction_type="epsilon", sample_max_value=1.5, thresholding=True,
                      variance_type="learned_range")
IF_II_SCHEDULER = {**IF_I_SCHEDULER, "sample_max_value": 1.0}

CAPTIONS = ["a red circle on a blue square", "two green triangles", "a photo of a corgi",
            "the quick brown fox jumps over the lazy dog", "an oil painting of a lighthouse at dusk"] * 20


@contextlib.contextmanager
def recorded_noise(replay=None):
    """Wraps diffusers' randn_tensor in the IF pipelines and the DDPM/DDIM schedulers: records every
    draw in call order (diffusers' draw order), or returns the arrays of `replay` in turn."""
    from diffusers.pipelines.deepfloyd_if import pipeline_if, pipeline_if_superresolution
    from diffusers.schedulers import scheduling_ddim, scheduling_ddpm

    mods = [pipeline_if, pipeline_if_superresolution, scheduling_ddpm, scheduling_ddim]
    originals = [m.randn_tensor for m in mods]
    draws = []
    gen = torch.Generator().manual_seed(1234)

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        if replay is not None:
            z = torch.from_numpy(np.asarray(replay[len(draws)], np.float32))
        else:
            z = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
        draws.append(z.numpy().copy())
        return z.to(dtype=dtype or torch.float32)

    for m in mods:
        m.randn_tensor = fake
    try:
        yield draws
    finally:
        for m, o in zip(mods, originals):
            m.randn_tensor = o


def nchw_to_nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


# --------------------------------------------------------------------------- scheduler alone


def toy_model_np(x, t):
    """A deterministic 6-channel 'network' (eps + variance), the same in torch and JAX: its x0
    predictions reach |x0| > 1.5, so thresholding is exercised at every step."""
    eps = 0.8 * x - 0.3 * np.sin(t / 100.0)
    var = np.tanh(x - 0.2)
    return eps, var


def run_diffusers_scheduler(cls, config, steps, x0, model, noises=None, eta=0.0):
    sched = cls.from_config(config)  # how diffusers users swap schedulers
    sched.set_timesteps(steps)
    x = torch.from_numpy(np.transpose(x0, (0, 3, 1, 2)).copy())
    with recorded_noise(replay=noises) as draws:
        for t in sched.timesteps:
            eps, var = model(x.numpy(), float(t))
            out = torch.from_numpy(np.concatenate([eps, var], 1).astype(np.float32))
            if config.get("variance_type") != "learned_range" or cls is diffusers.DDIMScheduler:
                out = out[:, :3]  # what the IF pipelines hand a scheduler without a learned variance
            if cls is diffusers.DDIMScheduler:
                x = sched.step(out, t, x, eta=eta).prev_sample
            else:
                x = sched.step(out, t, x).prev_sample
    return nchw_to_nhwc(x.numpy()), [nchw_to_nhwc(d) for d in draws], sched


def jax_toy(x, t):
    eps = 0.8 * x - 0.3 * jnp.sin(t.astype(jnp.float32)[:, None, None, None] / 100.0)
    return jnp.concatenate([eps, jnp.tanh(x - 0.2)], -1)


@pytest.fixture(scope="module")
def x_init():
    return np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32) * 1.3


def test_schedule_tables_match_diffusers():
    for cfg in (IF_I_SCHEDULER, dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear")):
        ours = discrete.DiscreteSchedule.from_config(cfg)
        ref = diffusers.DDPMScheduler(**cfg)
        np.testing.assert_array_equal(ours.betas(), ref.betas.numpy())
        np.testing.assert_array_equal(ours.alphas_cumprod(), ref.alphas_cumprod.numpy())
        for spacing in ("leading", "linspace", "trailing"):
            for steps in (1, 7, 50, 100):
                r = diffusers.DDPMScheduler(**cfg, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
                r.set_timesteps(steps)
                o = discrete.DiscreteSchedule.from_config({**cfg, "timestep_spacing": spacing,
                                                           "steps_offset": 1 if spacing == "leading" else 0})
                np.testing.assert_array_equal(o.timesteps(steps), r.timesteps.numpy())


@pytest.mark.parametrize("config,steps", [(IF_I_SCHEDULER, 100), (IF_II_SCHEDULER, 20),
                                          ({**IF_I_SCHEDULER, "timestep_spacing": "trailing"}, 10),
                                          ({**IF_I_SCHEDULER, "variance_type": "fixed_small",
                                            "thresholding": False}, 10)])
def test_ddpm_sampler_matches_diffusers_scheduler(config, steps, x_init):
    ref, draws, sched = run_diffusers_scheduler(diffusers.DDPMScheduler, config, steps, x_init,
                                                lambda x, t: toy_model_np(x, t))
    schedule = discrete.DiscreteSchedule.from_config(config)
    assert len(draws) == int(schedule.noised_steps(steps).sum())
    step_noise = discrete.expand_step_noise(schedule, steps, draws)
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(lambda x, z: discrete.sample_loop(jax_toy, x, schedule, num_steps=steps, step_noise=z))(
            x_init, step_noise)
    # Measured 1.2e-7 for 100 steps: float32 rounding of sin/tanh/quantile between the two sides.
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-6, rtol=0)
    assert np.abs(ref).max() <= 1.0 + 1e-6 or draws  # the last step returns the thresholded x0


@pytest.mark.parametrize("eta,steps", [(0.0, 10), (0.5, 8)])
def test_ddim_sampler_matches_diffusers_ddim(eta, steps, x_init):
    ref, draws, _ = run_diffusers_scheduler(diffusers.DDIMScheduler, IF_I_SCHEDULER, steps, x_init,
                                            lambda x, t: toy_model_np(x, t), eta=eta)
    schedule = discrete.DiscreteSchedule.from_config(IF_I_SCHEDULER)
    step_noise = discrete.expand_step_noise(schedule, steps, draws, sampler="ddim", eta=eta)
    with jax.default_matmul_precision("highest"):
        ours = discrete.sample_loop(jax_toy, jnp.asarray(x_init), schedule, num_steps=steps, sampler="ddim",
                                    eta=eta, step_noise=step_noise)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-6, rtol=0)


def test_add_noise_matches_diffusers(x_init):
    z = np.random.RandomState(1).randn(*x_init.shape).astype(np.float32)
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").add_noise(
        torch.from_numpy(x_init), torch.from_numpy(z), torch.tensor([250, 250]))
    ours = discrete.add_noise(discrete.DiscreteSchedule(beta_schedule="squaredcos_cap_v2"), x_init, z,
                              np.array([250, 250]))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-6, rtol=0)


def test_guided_split_guides_eps_and_keeps_conditional_variance():
    def model_fn(x, t):  # unconditional half -> 1, conditional half -> 3 on every channel
        b = x.shape[0] // 2
        return jnp.concatenate([jnp.ones((b, 2, 2, 6)), 3 * jnp.ones((b, 2, 2, 6))], 0)

    out = discrete.guided_split(model_fn, 4.0, 3)(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1,), jnp.int32))
    np.testing.assert_array_equal(np.asarray(out)[..., :3], 1 + 4.0 * (3 - 1))
    np.testing.assert_array_equal(np.asarray(out)[..., 3:], 3.0)


def test_bad_scheduler_configs(tmp_path):
    with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
        discrete.DiscreteSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="trained_betas"):
        discrete.DiscreteSchedule.from_config({"trained_betas": [0.1, 0.2]})
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        discrete.DiscreteSchedule.from_json(tmp_path / "scheduler_config.json")
    with pytest.raises(ValueError, match="steps must be an integer in"):
        discrete.DiscreteSchedule().timesteps(0)
    with pytest.raises(ValueError, match="per-step noise arrays"):
        discrete.expand_step_noise(discrete.DiscreteSchedule(), 4, [np.zeros(3)])


# --------------------------------------------------------------------------- tiny saved pipelines

def tiny_unet(stage):
    """A random UNet2DConditionModel of IF's block family (diffusers' own IF test sizes)."""
    common = dict(layers_per_block=1, block_out_channels=[32, 64],
                  down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                  mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                  up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
                  out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
                  addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
                  resnet_time_scale_shift="scale_shift", act_fn="gelu")
    if stage == "I":
        cfg = dict(common, sample_size=16, in_channels=3)
    else:  # IF-II-L's flags: class label embedding, gelu after the summed embeddings, 1/0.7071 skips
        cfg = dict(common, sample_size=32, in_channels=6, class_embed_type="timestep",
                   mid_block_scale_factor=1 / 0.7071, resnet_out_scale_factor=1 / 0.7071,
                   time_embedding_act_fn="gelu", time_embedding_dim=32, resnet_skip_time_act=True)
    torch.manual_seed(0 if stage == "I" else 1)
    unet = diffusers.UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():  # diffusers zero-inits conv_out; random outputs make the comparison meaningful
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def save_pipeline(stage, path, vocab, text_encoder, with_text=True):
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    kw = dict(unet=tiny_unet(stage), scheduler=DDPMScheduler(**(IF_I_SCHEDULER if stage == "I" else IF_II_SCHEDULER)),
              safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    tok = tiny_tokenizer(vocab) if with_text else None
    kw.update(tokenizer=tok, text_encoder=text_encoder if with_text else None)
    if stage == "I":
        pipe = IFPipeline(**kw)
    else:
        pipe = IFSuperResolutionPipeline(image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
                                         **kw)
    pipe.save_pretrained(path, safe_serialization=True)
    if with_text:  # IF's published tokenizer/ holds spiece.model (transformers 5 saves tokenizer.json only)
        shutil.copy(vocab, os.path.join(path, "tokenizer", "spiece.model"))
    return pipe


def tiny_tokenizer(vocab):
    d = os.path.join(os.path.dirname(vocab), "hf_tok")
    if not os.path.isdir(d):
        os.makedirs(d)
        shutil.copy(vocab, os.path.join(d, "spiece.model"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": 77, "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
                       "unk_token": "<unk>"}, f)
    return transformers.T5Tokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("if")
    vocab = train_sentencepiece(CAPTIONS, str(root / "sp" / "t5"), vocab_size=100, model_type="unigram")  # as T5
    torch.manual_seed(2)
    t5cfg = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                  is_encoder_decoder=False, use_cache=False)
    text_encoder = transformers.T5EncoderModel(t5cfg).eval()
    one, two = str(root / "IF-I"), str(root / "IF-II")
    p1 = save_pipeline("I", one, vocab, text_encoder)
    p2 = save_pipeline("II", two, vocab, text_encoder, with_text=False)
    return dict(I=one, II=two, torch_I=p1, torch_II=p2, root=root)


@pytest.fixture(scope="module")
def pipe(pipelines):
    from imagen_jax import deepfloyd
    return deepfloyd.IFPipeline.load(pipelines["I"], pipelines["II"], accept_license=True)


PROMPTS = ["A Red circle on a blue square  ", "two green triangles and the lazy dog"]


def test_prompt_embeddings_match_diffusers_encode_prompt(pipelines, pipe):
    ref_pos, ref_neg = pipelines["torch_I"].encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                                          clean_caption=False)
    pos, neg = pipe.encode(PROMPTS)
    assert pos.shape == (2, 77, 32) and neg.shape == (2, 77, 32)
    # Measured ~2e-7: float32 rounding in a 2-layer T5.
    np.testing.assert_allclose(pos, ref_pos.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(neg, ref_neg.detach().numpy(), atol=1e-5, rtol=0)
    assert np.abs(pos[:, -1]).max() > 0.1  # pad rows are kept (HF semantics), not zeroed


def run_diffusers(pipelines, steps, guidance, noise_level=250):
    p1, p2 = pipelines["torch_I"], pipelines["torch_II"]
    pos, neg = p1.encode_prompt(PROMPTS, do_classifier_free_guidance=True, clean_caption=False)
    with torch.no_grad(), recorded_noise() as draws1:
        img1 = p1(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=steps[0],
                  guidance_scale=guidance[0], output_type="pt").images
    with torch.no_grad(), recorded_noise() as draws2:
        img2 = p2(image=img1, prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=steps[1],
                  guidance_scale=guidance[1], noise_level=noise_level, output_type="pt").images
    return ([nchw_to_nhwc(img1.numpy()), nchw_to_nhwc(img2.numpy())],
            [[nchw_to_nhwc(d) for d in draws1], [nchw_to_nhwc(d) for d in draws2]])


@pytest.mark.parametrize("steps,guidance", [((4, 3), (7.0, 4.0)), ((2, 6), (3.0, 1.5))])
def test_stage_I_and_II_runs_replay_diffusers(pipelines, pipe, steps, guidance):
    from imagen_jax import deepfloyd

    ref, noise = run_diffusers(pipelines, steps, guidance)
    assert len(noise[0]) == 1 + steps[0] - 1 and len(noise[1]) == 2 + steps[1] - 1  # the draw order
    with jax.default_matmul_precision("highest"):
        ours = pipe.sample(PROMPTS, steps=steps, guidance=guidance, noise=noise)
        emb, neg = pipe.encode(PROMPTS)
        sr = pipe.sampler(1, deepfloyd.IFSettings(steps=steps[1], guidance=guidance[1]), neg[:1])  # compiled
        ours_ii = np.asarray(sr(emb, None, ref[0], noise=noise[1], guidance=guidance[1]))  # on diffusers' stage I
    assert [o.shape for o in ours] == [(2, 16, 16, 3), (2, 32, 32, 3)]
    # The U-Nets alone differ by ~4e-6 at outputs of ~1.5 (float32 rounding: torch float32 and ours
    # are equally far, ~3.5e-6, from torch float64). Each step amplifies that by the guidance,
    # (1 + 2w), and by sqrt((1 - abar) / abar) in the x0 prediction (~2.5 at t=750): ~1e-4 of float32
    # noise per step. Measured: stage I 3.1e-4, stage II alone 2.2e-4 (w = 7, 4); the chained stage
    # II 5.3e-3, as it also amplifies stage I's difference in its low-res input. A wrong formula
    # (variance, threshold, guidance, upscale, augmentation) moves outputs by >= 5e-2.
    err = [float(np.abs(a - b).max()) for a, b in ((ours[0], ref[0]), (ours_ii, ref[1]), (ours[1], ref[1]))]
    print(f"steps {steps} guidance {guidance}: max abs error stage I {err[0]:.2e}, stage II alone {err[1]:.2e}, "
          f"chained {err[2]:.2e}")
    assert err[0] < 1e-3 and err[1] < 1e-3 and err[2] < 2e-2, err
    assert np.abs(ref[1]).max() <= 1.0  # stage II thresholds to [-1, 1] (sample_max_value 1)


# --------------------------------------------------------------------------- bad input


def test_licence_is_required_and_nothing_loads(pipelines, monkeypatch):
    from imagen_jax import deepfloyd
    from imagen_jax.models import deepfloyd_if

    monkeypatch.setattr(deepfloyd_if, "load_unet", lambda *a, **k: pytest.fail("loaded without the licence"))
    with pytest.raises(deepfloyd.LicenseNotAcceptedError, match="DeepFloyd IF License.*accept_license=True"):
        deepfloyd.IFPipeline.load(pipelines["I"])


def test_bad_layouts_give_one_clear_message(pipelines, tmp_path):
    from imagen_jax import deepfloyd

    load = lambda *a: deepfloyd.IFPipeline.load(*a, accept_license=True)  # noqa: E731
    with pytest.raises(deepfloyd.IFError, match="no such directory"):
        load(str(tmp_path / "nope"))
    with pytest.raises(deepfloyd.IFError, match=r"model_index.json: missing"):
        load(str(tmp_path))
    with pytest.raises(deepfloyd.IFError, match="is a stage I .* but a stage II .* is expected"):
        load(pipelines["I"], pipelines["I"])
    with pytest.raises(deepfloyd.IFError, match="is a stage II .* but a stage I .* is expected"):
        load(pipelines["II"])
    broken = tmp_path / "broken"
    shutil.copytree(pipelines["I"], broken)
    os.remove(broken / "unet" / "config.json")
    with pytest.raises(deepfloyd.IFError, match=r"unet/config.json: missing"):
        load(str(broken))
    shutil.copy(os.path.join(pipelines["I"], "unet", "config.json"), broken / "unet" / "config.json")
    for f in (broken / "text_encoder").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ValueError, match=r"text_encoder: only PyTorch .bin weights, which are never unpickled"):
        load(str(broken))


# --------------------------------------------------------------------------- the cascade and the CLI


def test_sample_cli_runs_if_stages_through_the_cascade(pipelines, pipe, tmp_path):
    from imagen_jax import deepfloyd, sampling

    out = str(tmp_path / "out")
    final = sampling.generate([pipelines["I"], pipelines["II"]], PROMPTS, out, seed=3, steps="2,2",
                              guidance="7,4", sampler="ddpm,ddim", noise_level="100", accept_license=True,
                              log=lambda *a: None)
    assert final.shape == (2, 32, 32, 3) and final.dtype == np.uint8
    assert sorted(os.listdir(os.path.join(out, "images"))) == ["0000_00.png", "0001_00.png"]
    assert os.path.isfile(os.path.join(out, "grid.png"))
    with open(os.path.join(out, "settings.json")) as f:
        record = json.load(f)
    assert record["license"] == deepfloyd.ATTRIBUTION
    assert [(s["steps"], s["guidance"], s["sampler"]) for s in record["stages"]] == [(2, 7.0, "ddpm"), (2, 4.0, "ddim")]
    assert record["stages"][1]["noise_level"] == 100 and "DeepFloyd IF T5" in record["text_encoder"]
    # The cascade's one sampling path gives what the Python pipeline gives for the same draws.
    first = np.asarray(pipe.sample(PROMPTS, steps=(2,), guidance=(7.0,), seed=0)[0])
    assert first.shape == (2, 16, 16, 3) and np.abs(first).max() <= 1.5


def test_sample_cli_without_licence_exits_with_one_line(pipelines, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "imagen_jax.sample", f"--stages={pipelines['I']}", "--prompt=a fox",
                        f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "DeepFloyd IF License" in lines[0] and "--accept_license" in lines[0], r.stderr[-800:]
    assert not out.exists()


def test_guidance_one_runs_only_the_prompt_half_and_matches_diffusers(pipelines, pipe):
    # Issue 12/16: at weight 1 diffusers runs no guidance (one U-Net pass per step); so do we.
    import dataclasses

    from imagen_jax import deepfloyd

    ref, noise = run_diffusers(pipelines, (2, 2), (1.0, 1.0))
    seen = []

    class Counting:  # the stage's U-Net, recording the batch of every call that actually runs
        def __init__(self, module):
            self.module, self.config = module, module.config

        def apply(self, variables, x, *args, **kwargs):
            jax.debug.callback(lambda v: seen.append(v.shape[0]), x)
            return self.module.apply(variables, x, *args, **kwargs)

    emb, neg = pipe.encode(PROMPTS)
    # Stage II on diffusers' stage I output: the conditional-half path with the low-res input and the
    # class labels (stage I's differs only in having neither); one sampler compile.
    st = pipe.stages[1]
    sampler = deepfloyd.IFStageSampler(dataclasses.replace(st, module=Counting(st.module)),
                                       deepfloyd.IFSettings(steps=2, guidance=1.0), neg[:1])
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(sampler(emb, None, ref[0], noise=noise[1]))
        jax.effects_barrier()
        assert seen == [len(PROMPTS)] * 2  # one call per step, never the [negative; prompt] batch
        seen.clear()
        sampler(emb, None, ref[0], noise=noise[1], guidance=2.0).block_until_ready()  # the same program
        jax.effects_barrier()
        assert seen == [2 * len(PROMPTS)] * 2
    assert float(np.abs(ours - ref[1]).max()) < 1e-3  # the bound of the guided stage II replay above


def test_tokenizer_json_without_spiece_model(pipelines, tmp_path, monkeypatch):
    # transformers >= 5 saves tokenizer/ as tokenizer.json alone; it is read through `tokenizers`.
    import sys

    from imagen_jax.text.tokenizer import T5Tokenizer

    d = tmp_path / "IF-I"
    shutil.copytree(pipelines["I"], d)
    os.remove(d / "tokenizer" / "spiece.model")
    assert (d / "tokenizer" / "tokenizer.json").is_file()
    enc = hf_t5.load_encoder(str(d))
    assert isinstance(enc.tokenizer, hf_t5.JsonT5Tokenizer)
    sp = T5Tokenizer(os.path.join(pipelines["I"], "tokenizer", "spiece.model"), max_length=hf_t5.MAX_LENGTH)
    prompts = [hf_t5.clean_prompt(p) for p in PROMPTS] + ["", "zebra 123 ünïcode!", "x " * 100]
    for a, b in zip(enc.tokenizer.tokenize(prompts), sp.tokenize(prompts)):
        np.testing.assert_array_equal(a, b)
    assert enc.tokenizer.last_num_truncated == 1
    ref_pos, ref_neg = pipelines["torch_I"].encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                                          clean_caption=False)
    pos, neg = hf_t5.encode_with_negative(enc, PROMPTS)
    np.testing.assert_allclose(pos, ref_pos.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(neg, ref_neg.detach().numpy(), atol=1e-5, rtol=0)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # not installed
    with pytest.raises(hf_t5.TextLayoutError, match=r"spiece.model: missing; .*tokenizer.json is there.*tokenizers"):
        hf_t5.text_paths(str(d))
    monkeypatch.undo()
    os.remove(d / "tokenizer" / "tokenizer.json")
    with pytest.raises(hf_t5.TextLayoutError, match=r"spiece.model: missing, and no .*tokenizer.json either"):
        hf_t5.text_paths(str(d))


def test_dtype_reaches_if_stages_and_their_t5(pipelines):
    dtype = "float16"  # bfloat16 takes the same path
    from imagen_jax import cascade, parallel, sampling

    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    stages = [cascade.load_stage(pipelines[k], mesh, accept_license=True, dtype=dtype) for k in ("I", "II")]
    assert {str(x.dtype) for st in stages for x in jax.tree_util.tree_leaves(st.params)} == {dtype}
    assert [cascade.stage_dtype(st) for st in stages] == [dtype] * 2
    cond = sampling.StageConditioner(stages)
    # T5 in float16 overflows (HF keeps `wo` in float32), so reduced precision reads it in bfloat16.
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(cond._enc.params)} == {"bfloat16"}
    with pytest.raises(cascade.CascadeError, match="dtype must be one of"):
        cascade.load_stage(pipelines["I"], mesh, accept_license=True, dtype="int8")


def test_python_pipeline_serves_if_stages_without_recompiling(pipelines):
    """Stage I alone keeps it short: stage II runs through the same Pipeline in
    test_sample_cli_runs_if_stages_through_the_cascade (sampling.generate wraps it)."""
    import imagen_jax
    from imagen_jax import deepfloyd
    from stage_utils import CompileCounter

    with pytest.raises(deepfloyd.LicenseNotAcceptedError):
        imagen_jax.Pipeline.load([pipelines["I"]])
    pipe = imagen_jax.Pipeline.load([pipelines["I"]], accept_license=True)
    counter = CompileCounter()
    a = pipe(PROMPTS, seed=1, steps=2, guidance=7.0)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8 and a.std() > 1.0
    with counter:
        b = pipe(PROMPTS, seed=1, steps=2, guidance=7.0)
        c = pipe(PROMPTS, seed=1, steps=2, guidance=3.0)  # guidance is traced: no new program
    assert counter.count == 0, f"{counter.count} compilations on repeated calls"
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cascade_draws_if_noise_per_image(pipelines, pipe):
    """evaluate_fid and the sample CLI run IF stages through cascade.run_cascade, which gives each
    image its own key: an image does not depend on the batch size or on the other captions (a
    resumed FID shard), to float32 round-off (see test_noise_per_image: the U-Net rounds
    differently at another batch; a per-batch key would change every value). IFPipeline.sample
    keeps diffusers' one draw per batch (test_stage_I_and_II_runs_replay_diffusers)."""
    from imagen_jax import cascade, deepfloyd, parallel

    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    emb, neg = pipe.encode(PROMPTS + ["a photo of a corgi"])
    mask = np.ones(emb.shape[:2], bool)
    samplers = [cascade.make_sampler(cascade.load_stage(pipelines[k], mesh, accept_license=True), mesh,
                                     deepfloyd.IFSettings(steps=2, guidance=4.0, noise_level=100), neg[:1])
                for k in ("I", "II")]
    run = lambda rows, ids, bs: cascade.run_cascade(  # noqa: E731
        samplers, emb[rows], mask[rows], 5, batch_size=bs, log=None, progress=False, image_ids=ids)[0]
    whole, ones = run(slice(None), None, 3), run(slice(None), None, 1)
    part = run(slice(1, 3), [1, 2], 1)  # captions 1 and 2 alone, as a resumed shard samples them
    for k in range(2):
        for a, b in ((whole[k], ones[k]), (whole[k][1:], part[k])):
            diff = np.abs(a.astype(np.int16) - b)
            assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (k, diff.max(), (diff > 0).mean())
    other = run(slice(1, 3), [0, 1], 1)  # other ids: other noise
    assert np.abs(other[1].astype(np.int16) - part[1]).max() > 16
