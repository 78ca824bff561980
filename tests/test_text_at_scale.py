"""Text at pod scale (issue 14): a stage on stored embeddings fails on one line for a prompt the store lacks
when no T5 is named, and samples it with --t5; T5 sharded over the training mesh. (A training run on a store
whose `python -m imagen_jax.sample` then draws a new prompt with its config's T5, with --t5, and fails on one
line with neither is test_train.test_each_tiny_stage_trains[base64]; two jax.distributed processes writing
one store and reading disjoint input shares are test_text_data_multihost.py.)"""
import types

import jax
import numpy as np
import pytest

from imagen_jax import cli, conditioning, parallel, sampling
from imagen_jax.data import shapes
from imagen_jax.text import checkpoints as t5_checkpoints
from imagen_jax.text import t5 as t5_lib
from imagen_jax.text.encoder import TextEncoder
from stage_utils import make_store, shapes_vocab, tiny_config

NEW_PROMPT = "a huge purple star floating above a lake"  # not a shapes caption


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A tiny T5 saved as safetensors, and a store of the captions of the first 16 training examples."""
    root = tmp_path_factory.mktemp("text_scale")
    vocab = shapes_vocab(root)
    ds = shapes.ShapesDataset(seed=0, size=16)
    captions = [ds[i][1] for i in range(16)]
    assert NEW_PROMPT not in captions
    return {**make_store(root, vocab, captions), "vocab": vocab, "captions": captions}


def _stage(config):
    # What StageConditioner reads of a loaded stage (its config); no U-Net needed for the text side.
    return types.SimpleNamespace(config=config, source="", family="imagen")


def test_missing_prompt_without_t5_is_one_clear_line(stored, capsys):
    c = tiny_config("base64")
    c.text.update(embeddings_dir=stored["store"], vocab=stored["vocab"])
    cond = sampling.StageConditioner([_stage(c)])
    (emb,), _ = cond(stored["captions"][:2])  # stored prompts need no T5
    assert emb.shape == (2, 16, 64)
    code = cli.run(cond, [stored["captions"][0], NEW_PROMPT])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert repr(NEW_PROMPT) in err[0] and "text.t5_checkpoint" in err[0] and "--t5" in err[0]
    # The flag is the fix: --t5 names the store's T5 (sample.py / evaluate_fid.py pass it here).
    (emb,), (mask,) = sampling.StageConditioner([_stage(c)], t5=stored["t5"])([NEW_PROMPT])
    ref, ref_mask = stored["enc"].encode([NEW_PROMPT])
    np.testing.assert_array_equal(np.asarray(emb[0]), np.asarray(ref[0]).astype(emb.dtype))
    # Another T5 is refused: its embeddings would not match the stored ones.
    _, params = t5_lib.load_checkpoint(stored["t5"])
    params["encoder"]["encoder_norm"]["scale"] = params["encoder"]["encoder_norm"]["scale"] * 2
    other = t5_checkpoints.save_safetensors(params, stored["t5"].replace("t5.safetensors", "other.safetensors"))[0]
    with pytest.raises(ValueError, match="is not the T5 that wrote the embedding store"):
        sampling.StageConditioner([_stage(c)], t5=other)([NEW_PROMPT])


def test_training_t5_is_sharded_over_the_mesh(stored):
    c = tiny_config("base64")
    c.text.update(t5_checkpoint=stored["t5"], vocab=stored["vocab"])
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = conditioning.build(c, mesh=mesh)
    leaves = jax.tree_util.tree_leaves(sharded.encoder.params)
    assert all(len(x.sharding.device_set) == 8 for x in leaves)
    specs = {k: x.sharding.spec for k, x in
             [("/".join(str(p.key) for p in path), x)
              for path, x in jax.tree_util.tree_flatten_with_path(sharded.encoder.params)[0]]}
    # FSDP over 'embed' and tensor over heads / mlp / vocab, as config.mesh.rules say.
    assert specs["token_embedder/embedding"] == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert specs["encoder/layers_0/mlp/wi_0/kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert specs["encoder/layers_0/attention/query/kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
    big = [x for x in leaves if x.ndim == 2]
    assert all(not x.sharding.is_fully_replicated for x in big)
    assert all(x.addressable_shards[0].data.size * 2 <= x.size for x in big)  # at most half on a device
    for k in ("token_embedder/embedding", "encoder/layers_0/mlp/wi_0/kernel", "encoder/layers_1/mlp/wo/kernel"):
        x = sharded_leaf(sharded.encoder.params, k)
        assert x.addressable_shards[0].data.size * 4 == x.size  # fsdp x tensor: a quarter on each device
    # Its embeddings equal the unsharded encoder's (float32 here, so only rounding may differ).
    enc32 = TextEncoder.from_checkpoint(stored["t5"], stored["vocab"], max_length=16, mesh=mesh,
                                        rules=parallel.rules_tuple(c.mesh.rules))
    assert enc32.params["token_embedder"]["embedding"].sharding == sharded_leaf(
        sharded.encoder.params, "token_embedder/embedding").sharding
    prompts = stored["captions"][:5] + [NEW_PROMPT]
    emb, mask = enc32.encode(prompts)
    ref, ref_mask = stored["enc"].encode(prompts)  # one device
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree_util.tree_leaves(stored["enc"].params))
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(ref_mask))
    np.testing.assert_allclose(np.asarray(emb), np.asarray(ref), rtol=1e-5, atol=1e-5)


def sharded_leaf(params, key):
    for part in key.split("/"):
        params = params[part]
    return params
