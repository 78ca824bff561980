"""DeepFloyd IF stage directories and Hugging Face T5 safetensors on gs:// against the local GCS
emulator (tests/gcs_emulator.py): the tiny random pipelines of test_deepfloyd_pipeline.py copied
into the bucket load the parameters the local copies hold and sample to gs://, only the files
loading reads are staged, the T5 reads as it does locally, and a broken gs:// stage names its
gs:// path."""
import os

import jax
import numpy as np
import pytest

from imagen_jax import deepfloyd, paths, sampling
from imagen_jax.text import t5
from test_gcs import BUCKET, cwd, gcs, no_local_gs  # noqa: F401  (fixtures)

pytest.importorskip("diffusers")
from test_deepfloyd_pipeline import PROMPTS, pipelines  # noqa: E402,F401  (fixture)

ROOT = f"gs://{BUCKET}/if"


@pytest.fixture(scope="module")
def bucket_stages(gcs, pipelines):  # noqa: F811
    """Both stages in the bucket, stage I with what a full download holds and loading never reads."""
    out = {}
    for kind in ("I", "II"):
        paths.copy_tree(pipelines[kind], f"{ROOT}/IF-{kind}")
        out[kind] = f"{ROOT}/IF-{kind}"
    for junk in ("safety_checker/model.safetensors", "unet/diffusion_pytorch_model.bin",
                 "unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.8bit.safetensors"):
        paths.makedirs(paths.path(f"{out['I']}/{junk}").parent)
        paths.write_bytes(f"{out['I']}/{junk}", b"never read")
    return out


def test_sample_from_gcs_if_stages(bucket_stages, pipelines, cwd):  # noqa: F811
    # The bucket's stages are the local ones: the same parameters and schedules (the sampling code is
    # the same, so the same images; test_deepfloyd_pipeline samples the local ones against diffusers).
    for kind in ("I", "II"):
        remote = deepfloyd.IFStage.load(bucket_stages[kind], accept_license=True)
        local = deepfloyd.IFStage.load(pipelines[kind], accept_license=True)
        assert remote.source == bucket_stages[kind] and not paths.is_remote(remote.files)
        assert (remote.kind, remote.has_text_encoder, remote.schedule, remote.noising) == (
            local.kind, local.has_text_encoder, local.schedule, local.noising)
        assert remote.module.config == local.module.config
        jax.tree_util.tree_map(np.testing.assert_array_equal, remote.params, local.params)
    # Staged: only what loading reads (no safety checker, pickles, int8 or unread fp16 variant).
    staged = paths.list_files(deepfloyd.IFStage.load(bucket_stages["I"], accept_license=True).files)
    assert "unet/diffusion_pytorch_model.safetensors" in staged and "text_encoder/model.safetensors" in staged
    assert not [f for f in staged if f.startswith("safety_checker/") or f.endswith(".bin") or ".8bit." in f
                or ".fp16." in f], staged

    # `sample --stages gs://...,gs://... --out gs://...`, through the tool's own function.
    final = sampling.generate([bucket_stages["I"], bucket_stages["II"]], PROMPTS, f"{ROOT}/out", seed=3,
                              steps="2,2", guidance="7,4", sampler="ddpm,ddim", noise_level="100",
                              accept_license=True, log=lambda *a: None)
    assert final.shape == (2, 32, 32, 3) and final.std() > 0
    assert paths.listdir(f"{ROOT}/out/images") == ["0000_00.png", "0001_00.png"]
    record = paths.read_text(f"{ROOT}/out/settings.json")
    assert bucket_stages["I"] in record and "imagen_jax_mirror_" not in record
    no_local_gs(cwd)


def test_hf_t5_safetensors_on_gcs_read_like_local(bucket_stages, pipelines):  # noqa: F811
    want_cfg, want = t5.load_checkpoint(os.path.join(pipelines["I"], "text_encoder"))
    for path in (f"{bucket_stages['I']}/text_encoder", f"{bucket_stages['I']}/text_encoder/model.safetensors"):
        cfg, params = t5.load_checkpoint(path)
        assert cfg == want_cfg, path
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, want)


def test_broken_gcs_if_stage_names_its_gcs_path(bucket_stages, pipelines):  # noqa: F811
    broken = f"{ROOT}/IF-II-broken"
    paths.copy_tree(pipelines["II"], broken)
    paths.path(f"{broken}/unet/config.json").unlink()
    with pytest.raises(ValueError) as e:
        deepfloyd.IFStage.load(broken, accept_license=True)
    assert f"{broken}/unet/config.json" in str(e.value) and "imagen_jax_mirror_" not in str(e.value)
