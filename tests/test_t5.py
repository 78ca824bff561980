"""T5 1.1 encoder: numerics against HF transformers, and every checkpoint format and failure."""
import os
import shutil

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from imagen_jax.text import checkpoints, t5
from imagen_jax.text.checkpoints import CheckpointError, CheckpointNotFoundError

LOGICAL_NAMES = {"vocab", "embed", "heads", "kv", "mlp", "relpos_buckets"}


def flat(tree):
    return {"/".join(str(p.key) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def set_path(tree, key, value):
    *parents, leaf = key.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


@pytest.fixture(scope="module")
def tiny_path(fixtures_dir):
    return os.path.join(fixtures_dir, "t5x", "test_t5_tiny.checkpoint_0")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return t5.load_checkpoint(tiny_path)


@pytest.fixture(scope="module")
def batch():
    """Padded batch: lengths 20, 11, 3; EOS (1) last, pad 0. L = 20 reaches the log buckets."""
    rng = np.random.default_rng(0)
    lengths = np.array([20, 11, 3])
    length = 20
    mask = np.arange(length)[None, :] < lengths[:, None]
    ids = np.where(mask, rng.integers(3, 32128, size=(3, length)), 0).astype(np.int32)
    ids[np.arange(3), lengths - 1] = 1
    return ids, mask


@pytest.fixture(scope="module")
def reference_out(tiny, batch):
    config, params = tiny
    return np.asarray(t5.encode(config, params, *batch))


def assert_same_params(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# --------------------------------------------------------------------------- model


def test_config_and_tree_inferred_from_t5x_checkpoint(tiny):
    config, params = tiny
    assert (config.vocab_size, config.d_model, config.num_heads, config.head_dim, config.d_ff,
            config.num_layers, config.relpos_buckets) == (32128, 8, 4, 3, 16, 2, 32)
    shapes = {k: tuple(v.shape) for k, v in flat(params).items()}
    assert shapes == t5.expected_shapes(config)
    assert shapes["encoder/layers_1/attention/out/kernel"] == (12, 8)
    assert "decoder" not in params  # only the encoder side is loaded


def test_matches_hf_transformers_t5_encoder(tiny, batch, reference_out):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params = tiny
    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.head_dim,
        d_ff=config.d_ff, num_layers=config.num_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
    model = transformers.T5EncoderModel(hf_config).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in checkpoints.params_to_hf(params).items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in HF
    model.load_state_dict(state, strict=True)
    ids, mask = batch
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()
    ours = reference_out
    assert ours.shape == ref.shape == (3, 20, 8)
    # Real tokens only: T5X also masks padded *queries*, HF does not, so padded rows differ.
    rel = np.linalg.norm(ours[mask] - ref[mask]) / np.linalg.norm(ref[mask])
    assert rel < 1e-5, rel
    assert np.isfinite(ours).all()
    # The padded batch row 2 (3 tokens) must equal that prompt run alone, unpadded.
    alone = np.asarray(t5.encode(config, params, ids[2:3, :3], mask[2:3, :3]))
    np.testing.assert_allclose(alone[0], ours[2, :3], rtol=1e-5, atol=1e-6)


def test_relative_position_buckets_match_closed_form():
    length = 300
    got = t5.relative_position_buckets(length, length, 32, 128)
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
    dist = np.abs(rel)
    # float64 closed form: 8 exact buckets, then 8 log-spaced ones up to distance 128.
    far = np.minimum(8 + np.floor(2 * np.log2(np.maximum(dist, 1) / 8.0)), 15)
    want = np.where(rel > 0, 16, 0) + np.where(dist < 8, dist, far)
    np.testing.assert_array_equal(got, want)
    assert got.min() == 0 and got.max() == 31


def test_bfloat16_compute_close_to_float32(tiny_path, batch, reference_out):
    config, params = t5.load_checkpoint(tiny_path, dtype=jnp.bfloat16)
    assert config.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.bfloat16 for v in flat(params).values())
    out = t5.encode(config, params, *batch)
    assert out.dtype == jnp.bfloat16
    mask = batch[1]
    got = np.asarray(out, np.float32)[mask]
    ref = reference_out[mask]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2


def test_logical_axes_annotate_every_parameter(tiny):
    config, params = tiny
    specs = flat(t5.logical_axes(config))
    leaves = flat(params)
    assert sorted(specs) == sorted(leaves)
    for k, spec in specs.items():
        assert len(spec) == leaves[k].ndim and set(spec) <= LOGICAL_NAMES, (k, spec)
    assert tuple(specs["token_embedder/embedding"]) == ("vocab", "embed")
    assert tuple(specs["encoder/relpos_bias/rel_embedding"]) == ("heads", "relpos_buckets")
    assert tuple(specs["encoder/layers_0/mlp/wo/kernel"]) == ("mlp", "embed")


def test_random_init_has_t5x_layout_and_named_sizes():
    config = t5.T5Config.from_size("tiny", vocab_size=256, num_layers=3)
    params = t5.init_params(config, 1)
    assert {k: v.shape for k, v in flat(params).items()} == t5.expected_shapes(config)
    assert t5.config_from_shapes({k: v.shape for k, v in flat(params).items()}) == config
    xxl = t5.T5Config.from_size("xxl")
    assert (xxl.d_model, xxl.num_heads * xxl.head_dim, xxl.d_ff, xxl.num_layers) == (4096, 4096, 10240, 24)
    assert xxl.size_name == "xxl"
    with pytest.raises(ValueError, match="unknown T5 size"):
        t5.T5Config.from_size("huge")


# --------------------------------------------------------------------------- formats


def write_t5x_zarr(params, ckpt_dir, ghost_optimizer_state=True):
    """A T5X legacy checkpoint laid out like tiny_t5_zarr: msgpack with tensorstore spec
    leaves (relative 'gfile' paths, gzip zarr) plus inline arrays for the norm scales."""
    os.makedirs(ckpt_dir)
    target = {}
    for key, arr in flat(params).items():
        arr = np.asarray(arr)
        if key.endswith("/scale"):  # T5X keeps small unpartitioned arrays inline
            set_path(target, key, arr)
            continue
        rel = "target." + key.replace("/", ".")
        chunks = list(arr.shape)
        if key == "token_embedder/embedding":
            chunks[0] = arr.shape[0] // 4  # several chunks, so slices cross chunk borders
        spec = {"driver": "zarr", "dtype": "float32",
                "kvstore": {"driver": "gfile", "path": rel + "/"},
                "metadata": {"chunks": chunks, "compressor": {"id": "gzip", "level": 1},
                             "shape": list(arr.shape)}}
        store = ts.open({**spec, "kvstore": {"driver": "file", "path": os.path.join(ckpt_dir, rel)}},
                        create=True).result()
        store.write(arr).result()
        set_path(target, key, spec)
    state = {"step": np.int32(1), "param_states": {}}
    if ghost_optimizer_state:
        # Optimizer state whose zarr directory does not exist: loading must never touch it.
        state["param_states"] = {"encoder": {"encoder_norm": {"scale": {"v": {
            "driver": "zarr", "dtype": "float32",
            "kvstore": {"driver": "gfile", "path": "state.param_states.encoder.ghost/"},
            "metadata": {"chunks": [8], "compressor": {"id": "gzip", "level": 1}, "shape": [8]}}}}}}
    tree = {"version": 3, "optimizer": {"target": target, "state": state}}
    with open(os.path.join(ckpt_dir, "checkpoint"), "wb") as f:
        f.write(flax.serialization.msgpack_serialize(tree))
    return ckpt_dir


@pytest.fixture(scope="module")
def zarr_ckpt(tiny, tmp_path_factory):
    return write_t5x_zarr(tiny[1], str(tmp_path_factory.mktemp("t5x") / "checkpoint_7"))


@pytest.fixture(scope="module")
def hf_files(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    single = checkpoints.save_safetensors(tiny[1], str(root / "single" / "model.safetensors"))
    sharded = checkpoints.save_safetensors(tiny[1], str(root / "sharded"), max_shard_bytes=200_000)
    return {"single": single[0], "sharded_dir": str(root / "sharded"), "sharded_files": sharded}


def test_zarr_layout_loads_identically(tiny, zarr_ckpt, batch, reference_out):
    # Dir, msgpack file inside it, and the parent model dir (latest checkpoint_N) all work.
    for path in (zarr_ckpt, os.path.join(zarr_ckpt, "checkpoint"), os.path.dirname(zarr_ckpt)):
        config, params = t5.load_checkpoint(path)
        assert config == tiny[0]
        assert_same_params(params, tiny[1])
    np.testing.assert_array_equal(np.asarray(t5.encode(config, params, *batch)), reference_out)
    assert not os.path.exists(os.path.join(zarr_ckpt, "state.param_states.encoder.ghost"))


def test_safetensors_single_and_sharded_load_identically(tiny, hf_files):
    index = os.path.join(hf_files["sharded_dir"], "model.safetensors.index.json")
    shards = [f for f in hf_files["sharded_files"] if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(index)
    for path in (hf_files["single"], os.path.dirname(hf_files["single"]), index, hf_files["sharded_dir"]):
        config, params = t5.load_checkpoint(path)
        assert config == tiny[0]
        assert_same_params(params, tiny[1])


def test_dtype_on_load(tiny, hf_files):
    _, params = t5.load_checkpoint(hf_files["single"], dtype=jnp.bfloat16)
    for k, v in flat(params).items():
        assert v.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat(tiny[1])[k]).astype(jnp.bfloat16))


@pytest.mark.parametrize("fmt", ["zarr", "safetensors"])
def test_sharded_load_places_slices_on_8_devices(fmt, tiny, zarr_ckpt, hf_files):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    path = zarr_ckpt if fmt == "zarr" else hf_files["sharded_dir"]
    shardings = t5.param_shardings(tiny[0], mesh)
    config, params = t5.load_checkpoint(path, shardings=shardings)
    ref = flat(tiny[1])
    for key, arr in flat(params).items():
        want = flat(shardings)[key]
        assert arr.sharding == want, key
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref[key]), err_msg=key)
        for shard in arr.addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(ref[key])[shard.index])
    # Default rules: tensor parallel over vocab/heads/mlp, FSDP over embed.
    emb = flat(params)["token_embedder/embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in emb.addressable_shards} == {(32128 // 4, 8 // 2)}
    query = flat(params)["encoder/layers_0/attention/query/kernel"]
    assert query.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in query.addressable_shards} == {(4, 3)}
    assert flat(params)["encoder/layers_0/mlp/wo/kernel"].sharding.spec == P("tensor", "fsdp")
    assert flat(params)["encoder/relpos_bias/rel_embedding"].sharding.spec == P("tensor", None)


def test_sharded_load_reads_only_device_slices(zarr_ckpt, hf_files):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    for path in (zarr_ckpt, hf_files["single"]):
        sources = checkpoints.open_encoder_arrays(path)
        src = sources["token_embedder/embedding"]
        reads = []

        def spy(index, _read=src.reader):
            reads.append(tuple(s.stop - s.start for s in index))
            return _read(index)

        sources = {"token_embedder/embedding": checkpoints.ArraySource(
            src.key, src.shape, src.dtype, src.origin, spy)}
        tree = checkpoints.materialize(sources, np.float32, NamedSharding(mesh, P("tensor", None)))
        assert tree["token_embedder"]["embedding"].shape == (32128, 8)
        # 4 distinct slices of a quarter each, each read once although 2 devices hold it.
        assert sorted(reads) == [(8032, 8)] * 4
        reads.clear()
        checkpoints.materialize(sources, np.float32, NamedSharding(mesh, P("tensor", "fsdp")))
        assert sorted(reads) == [(8032, 4)] * 8


def test_callable_and_single_sharding(tiny, hf_files):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    _, params = t5.load_checkpoint(hf_files["single"], shardings=replicated)
    assert all(v.sharding == replicated for v in flat(params).values())
    seen = []

    def fn(key, shape, dtype):
        seen.append(key)
        return replicated

    _, params = t5.load_checkpoint(hf_files["single"], shardings=fn)
    assert sorted(seen) == sorted(flat(tiny[1]))
    assert_same_params(params, tiny[1])


# --------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError, match="nope.*expected") as e:
        t5.load_checkpoint(path)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_directory_that_is_no_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*not a T5 checkpoint.*notes.txt"):
        t5.load_checkpoint(str(tmp_path))


def test_garbage_msgpack_file(tmp_path):
    path = tmp_path / "checkpoint"
    path.write_bytes(b"\xc1 this is not msgpack")
    with pytest.raises(CheckpointError, match="not a T5X msgpack checkpoint"):
        t5.load_checkpoint(str(path))


def test_truncated_zarr_chunk(zarr_ckpt, tmp_path):
    broken = str(tmp_path / "checkpoint_7")
    shutil.copytree(zarr_ckpt, broken)
    chunk = os.path.join(broken, "target.encoder.layers_1.mlp.wo.kernel", "0.0")
    data = open(chunk, "rb").read()
    with open(chunk, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="layers_1.mlp.wo.kernel.*cannot read encoder/layers_1/mlp/wo/kernel"):
        t5.load_checkpoint(broken)


def test_missing_zarr_directory(zarr_ckpt, tmp_path):
    broken = str(tmp_path / "checkpoint_7")
    shutil.copytree(zarr_ckpt, broken)
    shutil.rmtree(os.path.join(broken, "target.encoder.relpos_bias.rel_embedding"))
    with pytest.raises(CheckpointNotFoundError, match="relpos_bias.rel_embedding.*does not exist"):
        t5.load_checkpoint(broken)


def test_checkpoint_without_t5_weights(fixtures_dir):
    # The real T5X zarr fixture holds only optimizer state.
    path = os.path.join(fixtures_dir, "t5x", "tiny_t5_zarr", "checkpoint_1")
    with pytest.raises(CheckpointError, match="checkpoint_1.*no T5 encoder weights"):
        t5.load_checkpoint(path)


def test_decoder_only_t5x_checkpoint(tmp_path):
    tree = {"version": 3, "optimizer": {"target": {
        "token_embedder": {"embedding": np.zeros((16, 4), np.float32)},
        "decoder": {"layers_0": {"mlp": {"wi_0": {"kernel": np.zeros((4, 8), np.float32)}}}}}}}
    path = tmp_path / "checkpoint"
    path.write_bytes(flax.serialization.msgpack_serialize(tree))
    with pytest.raises(CheckpointError, match="decoder-only"):
        t5.load_checkpoint(str(tmp_path))


def test_incomplete_t5x_encoder(tiny, tmp_path):
    target = {"token_embedder": {"embedding": np.asarray(tiny[1]["token_embedder"]["embedding"])},
              "encoder": {"layers_0": {"attention": {"query": {"kernel": np.zeros((8, 12), np.float32)}}}}}
    (tmp_path / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(
        {"version": 3, "optimizer": {"target": target}}))
    with pytest.raises(CheckpointError, match="not a T5 1.1 encoder checkpoint.*missing parameter"):
        t5.load_checkpoint(str(tmp_path))


def test_decoder_only_safetensors(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"transformer.h.0.attn.c_attn.weight": np.zeros((4, 12), np.float32),
               "transformer.wte.weight": np.zeros((16, 4), np.float32)}, path)
    with pytest.raises(CheckpointError, match="model.safetensors.*no T5 encoder tensors"):
        t5.load_checkpoint(path)


def test_t5_1_0_safetensors_rejected(tiny, tmp_path):
    tensors = checkpoints.params_to_hf(tiny[1])
    for i in range(2):
        tensors[f"encoder.block.{i}.layer.1.DenseReluDense.wi.weight"] = tensors.pop(
            f"encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight")
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="T5 1.0"):
        t5.load_checkpoint(path)


def test_truncated_safetensors(hf_files, tmp_path):
    path = str(tmp_path / "model.safetensors")
    data = open(hf_files["single"], "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        t5.load_checkpoint(path)


def test_index_naming_missing_shard(hf_files, tmp_path):
    broken = tmp_path / "sharded"
    shutil.copytree(hf_files["sharded_dir"], broken)
    os.remove(sorted(broken.glob("model-*.safetensors"))[-1])
    with pytest.raises(CheckpointNotFoundError, match="shard file"):
        t5.load_checkpoint(str(broken))


def test_gfile_and_gcs_specs_are_resolved(tmp_path):
    os.makedirs(tmp_path / "a.b")
    spec = {"driver": "zarr", "kvstore": {"driver": "gfile", "path": "a.b/"}}
    local = checkpoints._resolve_spec(spec, str(tmp_path), "ckpt", "k")
    assert local["kvstore"] == {"driver": "file", "path": f"{tmp_path}/a.b/"}
    assert spec["kvstore"]["driver"] == "gfile"  # the input is not modified
    remote = checkpoints._resolve_spec(
        {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": "a.b/"}},
        "gs://t5-data/models/checkpoint_1", "ckpt", "k")
    assert remote["kvstore"] == {"driver": "gcs", "bucket": "t5-data", "path": "models/checkpoint_1/a.b/"}
