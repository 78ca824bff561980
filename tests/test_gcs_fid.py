"""`python -m imagen_jax.evaluate_fid` with everything on gs:// against the local GCS emulator
(tests/gcs_emulator.py): a tiny stage directory, the COCO directory, the FID Inception weights,
the workdir and its caches all in the bucket. The outputs land in the bucket (nothing in a local
`gs:` directory), a rerun resumes from them, and bad outputs are one line with nothing written."""
import json
import os

import numpy as np
import pytest

from imagen_jax import checkpoints, evaluate_fid, paths
from imagen_jax.evaluation import protocol
from test_gcs import BUCKET, _listing, cwd, gcs, no_local_gs  # noqa: F401  (fixtures)

torch = pytest.importorskip("torch")
from test_evaluate_fid import _fast_fid, make_coco  # noqa: E402
from test_inception import _random_fid_inception  # noqa: E402

ROOT = f"gs://{BUCKET}/fid"


@pytest.fixture(autouse=True)
def fast_fid(monkeypatch):
    monkeypatch.setattr(protocol, "fid_to_reference", _fast_fid)


@pytest.fixture(scope="module")
def bucket_inputs(gcs, tiny_base, tmp_path_factory):
    """Made locally, then copied into the bucket: a COCO directory, random FID Inception weights,
    and the session's tiny base stage, its config naming the bucket's copy of its vocabulary."""
    local = tmp_path_factory.mktemp("fid_inputs")
    paths.copy_tree(make_coco(local / "coco"), f"{ROOT}/coco")
    weights = local / "pt_inception-random.pth"
    torch.save(_random_fid_inception().state_dict(), weights)
    paths.write_bytes(f"{ROOT}/pt_inception-random.pth", weights.read_bytes())
    config = checkpoints.load_config(tiny_base)
    paths.write_bytes(f"{ROOT}/shapes_spm.model", paths.read_bytes(config.text.vocab))
    config.text.vocab = f"{ROOT}/shapes_spm.model"
    paths.copy_tree(os.path.join(tiny_base, "checkpoints"), f"{ROOT}/base/checkpoints")
    checkpoints.save_config(f"{ROOT}/base", config)
    return {"stage": f"{ROOT}/base", "coco": f"{ROOT}/coco", "weights": f"{ROOT}/pt_inception-random.pth"}


def _argv(inputs, workdir, *extra):
    return ["--stages", inputs["stage"], "--inception", inputs["weights"], "--coco", inputs["coco"],
            "--workdir", workdir, "--num_samples", "4", "--shard_size", "2", "--steps", "2", "--guidance", "2",
            "--resolution", "32", "--inception_batch", "8", "--quiet", "--inception_sha256", "any",
            "--save_images", *extra]


def test_evaluate_fid_all_on_gcs(bucket_inputs, cwd, capsys):
    wd = f"{ROOT}/eval"
    assert evaluate_fid.main(_argv(bucket_inputs, wd)) == 0, capsys.readouterr().err
    rec = json.loads(paths.read_text(f"{wd}/fid.json"))
    assert rec["num_samples"] == 4 and rec["shards_computed"] == 2 and np.isfinite(rec["fid"])
    # Every recorded place is the gs:// one (os.path.abspath would have made it ./gs:/...).
    assert rec["generation"]["stages"][0]["source"] == bucket_inputs["stage"]
    assert rec["inception_weights"] == bucket_inputs["weights"] and rec["captions"]["source"] == bucket_inputs["coco"]
    assert rec["reference"]["statistics_file"].startswith(f"{wd}/cache/coco_ref_all_32px_")
    assert rec["captions_file"] == f"{wd}/captions.json"
    names = set(paths.listdir(wd))
    assert {"fid.json", "captions.json", "samples", "cache"} <= names
    assert {"run.json", "store.json", "shard-00000.npy", "shard-00001.npy", "image_shards", "images"} <= set(
        paths.listdir(f"{wd}/samples"))
    assert paths.listdir(f"{wd}/samples/images") == [f"{i:05d}.png" for i in range(4)]
    cache = paths.listdir(f"{wd}/cache")
    assert "fid_inception.npz" in cache and any(n.endswith("_features") for n in cache)
    assert not [n for n in paths.listdir(f"{wd}/samples") if ".tmp" in n]

    # A rerun resumes from the bucket: no new shard, the reference and the weights from its caches.
    assert evaluate_fid.main(_argv(bucket_inputs, wd)) == 0, capsys.readouterr().err
    again = json.loads(paths.read_text(f"{wd}/fid.json"))
    assert again["shards_computed"] == 0 and again["fid"] == rec["fid"]
    no_local_gs(cwd)


@pytest.mark.parametrize("case", ["no_bucket", "training_workdir"])
def test_bad_gcs_workdir_is_one_line_and_writes_nothing(bucket_inputs, cwd, capsys, case):
    if case == "no_bucket":
        wd, rc, want = "gs://no-such-bucket/eval", 1, "bucket gs://no-such-bucket does not exist"
    else:  # the stage's own training workdir is not an evaluation directory
        wd, rc, want = bucket_inputs["stage"], 2, f"--workdir {bucket_inputs['stage']} exists and is not an earlier"
    before = _listing(BUCKET)
    capsys.readouterr()
    assert evaluate_fid.main(_argv(bucket_inputs, wd)) == rc
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and want in err[0], err
    assert _listing(BUCKET) == before
    no_local_gs(cwd)
