"""Hyperparameters the arrays' shapes cannot tell are read from the configuration stored with the
checkpoint (HF config.json, T5X config.gin) or refused: a non-gated-GELU model never runs as if it
were T5 1.1."""
import json
import os
import shutil

import pytest

from imagen_jax.text import t5
from imagen_jax.text.checkpoints import CheckpointError, save_safetensors


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return os.path.join(fixtures_dir, "t5x", "test_t5_tiny.checkpoint_0"), t5.load_checkpoint(
        os.path.join(fixtures_dir, "t5x", "test_t5_tiny.checkpoint_0"))


def _t5x_model_dir(tmp_path, src, gin):
    ckpt = tmp_path / "model" / "checkpoint_0"
    ckpt.mkdir(parents=True)
    shutil.copyfile(src, ckpt / "checkpoint")
    (tmp_path / "model" / "config.gin").write_text(gin)
    return ckpt


def test_t5x_gin_activation(tiny, tmp_path):
    src, (config, _) = tiny
    ok = _t5x_model_dir(tmp_path / "ok", src, "network.T5Config.mlp_activations = ('gelu', 'linear')\n")
    assert t5.load_checkpoint(str(ok))[0] == config
    relu = _t5x_model_dir(tmp_path / "relu", src, "network.T5Config.mlp_activations = ('relu',)\n")
    with pytest.raises(CheckpointError, match=r"mlp_activations = \('relu',\).*gated GELU"):
        t5.load_checkpoint(str(relu))
    with pytest.raises(CheckpointError, match="mlp_activations"):  # the model directory resolves too
        t5.load_checkpoint(str(relu.parent))


def test_hf_config_is_read_or_refused(tiny, tmp_path):
    _, (config, params) = tiny
    d = tmp_path / "hf"
    save_safetensors(params, str(d))
    (d / "config.json").write_text(json.dumps({"d_model": config.d_model, "feed_forward_proj": "gated-gelu",
                                               "layer_norm_epsilon": 1e-5, "relative_attention_max_distance": 64}))
    got, _ = t5.load_checkpoint(str(d))
    assert got.layer_norm_eps == 1e-5 and got.relpos_max_distance == 64  # read, not assumed
    for proj in ("relu", "gated-relu", "gelu"):
        (d / "config.json").write_text(json.dumps({"d_model": config.d_model, "feed_forward_proj": proj}))
        with pytest.raises(CheckpointError, match=f"feed_forward_proj='{proj}'"):
            t5.load_checkpoint(str(d))
