"""Zero-shot FID entry point on a tiny COCO-format fixture made here, with tiny random stages,
random FID Inception weights and a tiny random CLIP: the result file, the features of the saved
images, CLIP score against a direct computation, resuming after an interrupted shard, the
guidance sweep (one compiled program per stage), and bad input."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from imagen_jax import cascade, evaluate_fid, parallel
from imagen_jax.evaluation import coco, fid, inception, protocol
from imagen_jax.evaluation.features import FeatureStore
from stage_utils import make_workdir, shapes_vocab

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_inception import _random_fid_inception  # noqa: E402  (needs torch, pytorch-fid)

# image id -> (width, height, mode, captions); 6 images, 12 captions, letters only (tiny CLIP vocab)
_IMAGES = {
    11: (40, 30, "RGB", ["a red circle on grey", "a round red shape"]),
    5: (24, 48, "RGB", ["a tall blue square", "blue box"]),
    23: (32, 32, "L", ["grey noise", "a gray tile"]),
    8: (50, 20, "RGB", ["green stripes", "three green bars"]),
    17: (36, 36, "RGB", ["a yellow triangle", "triangle in yellow"]),
    2: (28, 40, "RGB", ["purple dots", "many small purple dots"]),
}
def make_coco(cdir):
    """A COCO val2014 directory (captions_val2014.json + val2014/) of the _IMAGES random images."""
    (cdir / "val2014").mkdir(parents=True)
    images, annotations = [], []
    for image_id, (w, h, mode, caps) in _IMAGES.items():
        name = f"COCO_val2014_{image_id:012d}.png"
        a = np.random.default_rng(image_id).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(a).convert(mode).save(cdir / "val2014" / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        annotations += [{"id": 100 * image_id + j, "image_id": image_id, "caption": c} for j, c in enumerate(caps)]
    (cdir / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return cdir


STEPS, GUIDANCE, RES = "2,2", "2,3", 32  # the 16 -> 64 cascade's output is resized to 32


def _fast_fid(features, mu, sigma):
    """Exact FID for N < D samples without a D x D matrix square root (SciPy's sqrtm of a
    2048 x 2048 matrix takes ~30 s on 2 cores): with S1 = A^T A, A = (X - mean) / sqrt(N - 1),
    the non-zero eigenvalues of S1 S2 are those of A S2 A^T [N, N], so
    Tr sqrt(S1 S2) = sum sqrt(eig(A S2 A^T))."""
    x = np.asarray(features, np.float64)
    a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    m = a @ sigma @ a.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = x.mean(0) - mu
    return float(d @ d + np.einsum("ij,ij->", a, a) + np.trace(sigma) - 2 * tr_sqrt)


def test_fast_fid_matches_frechet_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 24))
    y = rng.normal(size=(40, 24)) @ rng.normal(size=(24, 24)) + 0.5
    mu, sigma = fid.statistics(y)
    expected = fid.frechet_distance(*fid.statistics(x), mu, sigma)
    assert _fast_fid(x, mu, sigma) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(autouse=True)
def fast_fid(monkeypatch):
    monkeypatch.setattr(protocol, "fid_to_reference", _fast_fid)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_fid")
    cdir = make_coco(root / "coco")
    # FID Inception: pytorch-fid's network with random weights, saved like the released file.
    weights = str(root / "pt_inception-random.pth")
    torch.save(_random_fid_inception().state_dict(), weights)
    # Stages: base 16x16 and SR 16 -> 64, random parameters.
    vocab = shapes_vocab(root)
    base, sr = root / "base", root / "sr"
    make_workdir(base, "base64", vocab=vocab)
    make_workdir(sr, "sr256", vocab=vocab)
    return dict(root=root, coco=str(cdir), weights=weights, base=str(base), sr=str(sr), clip=_tiny_clip(root),
                cache=str(root / "shared_cache"))


def _tiny_clip(root):
    """A randomly initialised CLIP saved with save_pretrained (model, tokenizer, image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = list(letters) + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (root / "clip_vocab.json").write_text(json.dumps(vocab))
    (root / "clip_merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "clip_vocab.json"), str(root / "clip_merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
               pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, **ids),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8))
    path = str(root / "clip")
    model.save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)
    return path


def _argv(env, workdir, *extra, stages=None):
    return ["--stages", stages or f"{env['base']},{env['sr']}", "--inception", env["weights"], "--coco", env["coco"],
            "--workdir", str(workdir), "--num_samples", "8", "--shard_size", "4", "--steps", STEPS,
            "--guidance", GUIDANCE, "--resolution", str(RES), "--inception_batch", "8", "--seed", "3",
            "--caption_seed", "1", "--quiet", "--inception_sha256", "any", *extra]


def _direct_clip_scores(path, images, texts):
    """100 * cos of CLIP embeddings, through the towers and projections directly."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(path, local_files_only=True)
    x = proc(text=texts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        v = model.visual_projection(model.vision_model(pixel_values=x["pixel_values"]).pooler_output)
        t = model.text_projection(model.text_model(input_ids=x["input_ids"],
                                                   attention_mask=x["attention_mask"]).pooler_output)
    return 100 * torch.nn.functional.cosine_similarity(v, t).double().numpy()


def test_end_to_end_resume_and_sweep(env, tmp_path, monkeypatch, capsys):
    a = tmp_path / "a"
    flags = ("--save_images", "--clip", env["clip"])
    written = []  # indices of Inception feature shards written (not CLIP score shards)
    original_write = FeatureStore.write

    class Interrupted(Exception):
        pass

    # --- 1: interrupted once its first shard is written ---
    def write_then_stop(self, index, features):
        path = original_write(self, index, features)
        if self.dim == inception.FEATURE_DIM and not self.workdir.endswith("_features"):  # not the reference's
            written.append(index)
            raise Interrupted
        return path

    monkeypatch.setattr(FeatureStore, "write", write_then_stop)
    with pytest.raises(Interrupted):
        evaluate_fid.main(_argv(env, a, *flags))
    assert written == [0] and not (a / "fid.json").exists()
    first = (a / "samples" / "shard-00000.npy").stat().st_mtime_ns

    # --- 2: rerun: resumes (computes only shard 1), then sweeps two guidance weights ---
    written.clear()
    monkeypatch.setattr(FeatureStore, "write", lambda self, i, f: (
        written.append(i) if self.dim == inception.FEATURE_DIM and not self.workdir.endswith("_features") else None)
        or original_write(self, i, f))
    seeds, instances = [], []
    original_generate, original_init = protocol.Evaluator.generate, cascade.StageSampler.__init__
    monkeypatch.setattr(protocol.Evaluator, "generate",
                        lambda self, texts, seed, ids=None: seeds.append((seed, list(ids))) or
                        original_generate(self, texts, seed, ids))
    monkeypatch.setattr(cascade.StageSampler, "__init__",
                        lambda self, *a, **k: instances.append(self) or original_init(self, *a, **k))
    assert evaluate_fid.main(_argv(env, a, *flags, "--sweep", "1,4", "--sweep_samples", "4")) == 0
    assert written == [1, 0, 0]  # the main run's missing shard, then one shard per weight
    assert seeds == [(3, [4, 5, 6, 7])] + [(3, [0, 1, 2, 3])] * 2  # noise keyed by caption index
    assert (a / "samples" / "shard-00000.npy").stat().st_mtime_ns == first
    # One compiled program per stage, reused across the sweep (guidance is traced).
    assert len(instances) == 2 and [s._fn._cache_size() for s in instances] == [1, 1]

    rec = json.loads((a / "fid.json").read_text())
    assert rec["num_samples"] == 8 and rec["shards_computed"] == 1 and np.isfinite(rec["fid"])
    assert rec["captions"]["seed"] == 1 and rec["generation"]["seed"] == 3
    assert rec["generation"]["shard_size"] == 4 and rec["resolution"] == RES
    assert [s["guidance"] for s in rec["generation"]["stages"]] == [2.0, 3.0]
    assert [s["steps"] for s in rec["generation"]["stages"]] == [2, 2]
    assert [s["resolution"] for s in rec["generation"]["stages"]] == [16, 64]
    assert rec["reference"]["num_images"] == 6 and rec["reference"]["count"] == "all"
    assert os.path.isfile(rec["reference"]["statistics_file"])
    assert {"jax", "flax", "numpy", "scipy", "torch"} <= set(rec["versions"])
    assert "BICUBIC" in rec["resize_filter"] and rec["clip_model"] == env["clip"]
    # Captions: the recorded draw is the seeded draw.
    drawn = coco.sample_captions(coco.load_captions(env["coco"]), 8, seed=1)
    assert coco.CaptionSample.load(a / "captions.json") == drawn
    # The features (shard 0 from run 1, shard 1 from run 2) are those of the saved PNGs, resized
    # to 32, in caption order; the FID follows from them and the cached reference statistics.
    pngs = np.stack([np.asarray(Image.open(a / "samples" / "images" / f"{i:05d}.png")) for i in range(8)])
    assert pngs.shape == (8, RES, RES, 3) and pngs.std() > 0
    feats = FeatureStore(a / "samples", 8, 4).concatenate()
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})  # the same compiled Inception
    np.testing.assert_allclose(feats, inception.features(inception.load(env["weights"]), pngs, batch_size=8,
                                                         mesh=mesh), rtol=1e-5, atol=1e-5 * np.abs(feats).max())
    mu, sigma = fid.load_statistics(rec["reference"]["statistics_file"])
    assert rec["fid"] == pytest.approx(_fast_fid(feats, mu, sigma), rel=1e-9)
    # CLIP score: mean of 100 * cos, as computed directly from the PNGs and the captions.
    direct = _direct_clip_scores(env["clip"], pngs, drawn.texts)
    assert rec["clip_score"] == pytest.approx(direct.mean(), rel=1e-4, abs=1e-3)

    # The sweep: a row per weight, the table, the plot (FID vs w, FID vs CLIP score).
    sweep = json.loads((a / "sweep.json").read_text())
    assert [r["guidance"] for r in sweep["rows"]] == [1.0, 4.0]
    assert all(np.isfinite(r["fid"]) and r["num_samples"] == 4 and r["clip_score"] is not None
               for r in sweep["rows"])
    assert sweep["rows"][0]["fid"] != sweep["rows"][1]["fid"]
    assert len(coco.CaptionSample.load(a / "sweep" / "captions.json").captions) == 4
    run_file = json.loads((a / "sweep" / "guidance_4" / "run.json").read_text())
    assert [s["guidance"] for s in run_file["stages"]] == [4.0, 3.0]  # the base stage's weight only
    table = (a / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| guidance | FID") and len(table) == 4 and table[3].startswith("| 4 |")
    assert table[3] in capsys.readouterr().out  # printed too
    plot = np.asarray(Image.open(a / "sweep.png").convert("L"))
    assert plot.shape == (420, 1120) and (plot < 128).mean() > 0.002
    svg = (a / "sweep.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "w=4" in svg  # vector, labelled
    # KID beside FID: the same features against the kept reference features, unbiased estimator.
    ref_feats = FeatureStore(coco.reference_features_dir(rec["reference"]["statistics_file"]), 6, 1000).concatenate()
    assert rec["kid"]["mean"] == pytest.approx(fid.kernel_inception_distance(feats, ref_feats)[0], rel=1e-12)
    assert rec["kid"]["std"] >= 0 and rec["kid"]["subset_size"] == 6
    assert rec["zero_shot"] is True and rec["protocol"].startswith("zero-shot")
    assert rec["generation"]["noise"] == protocol.NOISE_SCHEME and "batch_size" not in run_file
    assert run_file["text_encoder"] == rec["text_encoder"] and "RANDOMLY INITIALISED T5" in run_file["text_encoder"]

    # --- 3: rerun: nothing sampled, reference statistics read from the cache ---
    def no_reference_images(*args, **kwargs):
        raise AssertionError("reference statistics recomputed")
    monkeypatch.setattr(coco, "iter_reference_images", no_reference_images)
    assert evaluate_fid.main(_argv(env, a, *flags)) == 0
    again = json.loads((a / "fid.json").read_text())
    assert again["shards_computed"] == 0 and again["fid"] == rec["fid"]
    assert again["clip_score"] == rec["clip_score"]
    # --clip added to a finished run: scored from the stored image shards, nothing sampled.
    import shutil
    shutil.rmtree(a / "samples" / "clip")

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")
    monkeypatch.setattr(protocol.Evaluator, "generate", no_sampling)
    assert evaluate_fid.main(_argv(env, a, *flags)) == 0
    rescored = json.loads((a / "fid.json").read_text())
    assert rescored["clip_score"] == pytest.approx(rec["clip_score"], rel=1e-6) and rescored["fid"] == rec["fid"]
    # ... but other settings in the same directory are refused; no CLIP is a message, not an error.
    assert evaluate_fid.main(_argv(env, a, "--seed", "4")) == 1
    out = capsys.readouterr()
    assert "other settings (seed differ" in out.err and "CLIP score: skipped" in out.out


def test_sweep_plot_without_clip(tmp_path):
    rows = [{"guidance": w, "fid": f, "clip_score": None, "num_samples": 10}
            for w, f in [(1, 30.0), (3, 18.5), (8, 25.0)]]
    protocol.plot_sweep(rows, str(tmp_path / "p.png"), title="t")
    assert Image.open(tmp_path / "p.png").size == (560, 420) and (tmp_path / "p.svg").exists()
    assert protocol.sweep_table(rows).splitlines()[3] == "| 3 | 18.500 | - | 10 |"


def test_resize():
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    y = protocol.resize(x, 32)
    assert y.shape == (2, 32, 32, 3) and y.dtype == np.uint8
    np.testing.assert_array_equal(y[1], np.asarray(Image.fromarray(x[1]).resize((32, 32), Image.BICUBIC)))
    assert protocol.resize(x, 64) is x


def _bad_cases(env, tmp_path):
    missing = str(tmp_path / "nope.pth")
    linear = str(tmp_path / "linear.pth")
    torch.save(torch.nn.Linear(3, 4).state_dict(), linear)
    empty = tmp_path / "empty_stage"
    empty.mkdir()
    return {
        "missing weights": (["--inception", missing], "FID Inception weights not found at .*nope.pth"),
        "not the FID Inception": (["--inception", linear], "linear.pth.* not the FID Inception"),
        "too few reference images": (["--reference_count", "7"], "has only 6 reference images, but count=7"),
        "stage dir missing": (["--stages", str(tmp_path / "no_stage")], "no_stage does not exist"),
        "stage dir empty": (["--stages", str(empty)], "not a training workdir: no config.json"),
        "stages in the wrong order": (["--stages", f"{env['sr']},{env['base']}"], "give the base stage first"),
        "no COCO": (["--coco", str(tmp_path / "no_coco")], "no_coco.* is not a directory"),
        "too many captions": (["--num_samples", "13"], "asked for 13 captions, but .* has only 12"),
        "CLIP dir missing": (["--clip", str(tmp_path / "no_clip")], "CLIP model directory .*no_clip.* does not exist"),
        "bad settings": (["--steps", "2,2,2"], "--steps has 3 values"),
    }


def test_bad_input(env, tmp_path, capsys):
    for name, (extra, message) in _bad_cases(env, tmp_path).items():
        rc = evaluate_fid.main(_argv(env, tmp_path / "w", "--cache_dir", env["cache"], *extra))
        err = capsys.readouterr().err
        assert rc == (2 if name == "bad settings" else 1), (name, err)  # a usage error: 2
        assert err.startswith("error: ") and re.search(message, err), (name, err)
    # Flag errors: argparse's message and status 2.
    assert evaluate_fid.main(_argv(env, tmp_path / "w", "--num_samples", "0")) == 2
    assert "needs --sweep" in capsys.readouterr().err


def test_folder_of_images_and_precomputed_statistics(env, tmp_path, capsys):
    """One command scores a folder (no model): the reference images themselves give FID ~0; the
    same folder against the statistics .npz that run cached (as pytorch-fid --save-stats writes
    mu/sigma) gives the same FID, and records that no KID was possible."""
    folder = os.path.join(env["coco"], "val2014")
    base = ["--inception", env["weights"], "--inception_sha256", "any", "--resolution", str(RES),
            "--inception_batch", "8", "--quiet", "--images", folder]
    assert evaluate_fid.main([*base, "--coco", env["coco"], "--workdir", str(tmp_path / "f1")]) == 0
    rec = json.loads((tmp_path / "f1" / "fid.json").read_text())
    assert rec["num_samples"] == 6 and abs(rec["fid"]) < 1e-3 and np.isfinite(rec["kid"]["mean"])
    assert f"FID {rec['fid']:.3f} on 6 samples" in capsys.readouterr().out
    stats = rec["reference"]["statistics_file"]
    assert evaluate_fid.main([*base, "--reference_stats", stats, "--workdir", str(tmp_path / "f2")]) == 0
    rec2 = json.loads((tmp_path / "f2" / "fid.json").read_text())
    assert rec2["fid"] == pytest.approx(rec["fid"], abs=1e-9) and rec2["kid"] is None
    assert rec2["reference"]["precomputed"] is True and len(rec2["reference"]["sha256"]) == 64
    # Bad input: both or neither of --stages/--images, a folder without images, a bad .npz.
    empty = tmp_path / "no_images"
    empty.mkdir()
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, mu=np.zeros(3), sigma=np.eye(3))
    cases = [([*base, "--stages", env["base"], "--coco", env["coco"]], 2, "not both or neither"),
             ([*base[:-2], "--coco", env["coco"]], 2, "not both or neither"),
             ([*base[:-1], str(empty), "--coco", env["coco"]], 1, "holds 0 images"),
             ([*base, "--reference_stats", str(bad_npz)], 1, "3-dim statistics"),
             ([*base], 2, "--coco is required")]
    for argv, rc, message in cases:
        assert evaluate_fid.main([*argv, "--workdir", str(tmp_path / "bad")]) == rc, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad" / "fid.json").exists()


def test_reference_pass_resumes(env, tmp_path, monkeypatch):
    """The reference statistics are made shard by shard: an interrupted pass keeps its finished
    shards and the rerun computes only the rest, giving the uninterrupted statistics."""
    params = inception.load(env["weights"], cache_path=str(tmp_path / "w.npz"))
    kw = dict(size=RES, batch_size=8, shard_size=4)
    mu, sigma = coco.reference_statistics(env["coco"], params, tmp_path / "whole", **kw)
    original = FeatureStore.write
    calls = []

    def write_once(self, index, features):
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, index, features)
    monkeypatch.setattr(FeatureStore, "write", write_once)
    with pytest.raises(KeyboardInterrupt):
        coco.reference_statistics(env["coco"], params, tmp_path / "part", **kw)
    calls.clear()
    monkeypatch.setattr(FeatureStore, "write", lambda self, i, f: calls.append(i) or original(self, i, f))
    mu2, sigma2 = coco.reference_statistics(env["coco"], params, tmp_path / "part", **kw)
    assert calls == [1]  # shard 0 was kept
    np.testing.assert_allclose(mu2, mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-5, atol=1e-6)


def test_zero_shot_only_when_not_trained_on_coco(tmp_path):
    from types import SimpleNamespace
    from ml_collections import ConfigDict

    def evaluator(name):
        stage = SimpleNamespace(config=ConfigDict({"data": {"name": name, "files": "", "data_dir": ""}}),
                                source="/x/" + (name or "shapes"))
        ev = protocol.Evaluator.__new__(protocol.Evaluator)
        ev.samplers = [SimpleNamespace(stage=stage)]
        return ev
    assert evaluator("").zero_shot()["zero_shot"] is True
    rec = evaluator("coco_captions").zero_shot()
    assert rec["zero_shot"] is False and "not zero-shot" in rec["protocol"]
    assert rec["trained_on_coco"] == [os.path.abspath("/x/coco_captions")]


def test_resume_on_another_batch_size_and_device_count_is_the_uninterrupted_run(env, tmp_path, monkeypatch):
    """Shard 0 sampled on 1 device in batches of 2 (per-device batch 4 with the null-text half),
    shard 1 resumed on 8 devices in one batch of 8 (per-device 2): the images, the features and the
    FID are those of the run made in one go on 8 devices. The base stage alone: it rounds the same
    at every per-device batch here (an SR stage may move a value by one uint8 level; see
    test_noise_per_image)."""
    import jax

    def argv(workdir, batch_size):
        return ["--stages", env["base"], "--inception", env["weights"], "--inception_sha256", "any",
                "--coco", env["coco"], "--cache_dir", env["cache"], "--workdir", str(workdir), "--num_samples", "8",
                "--shard_size", "4", "--steps", "2", "--guidance", "2", "--resolution", str(RES),
                "--inception_batch", "8", "--seed", "3", "--caption_seed", "1", "--quiet",
                "--batch_size", str(batch_size)]

    assert evaluate_fid.main(argv(tmp_path / "whole", 8)) == 0
    whole = json.loads((tmp_path / "whole" / "fid.json").read_text())

    original_write, original_mesh = FeatureStore.write, parallel.make_mesh

    class Interrupted(Exception):
        pass

    def write_then_stop(self, index, features):
        path = original_write(self, index, features)
        if self.dim == inception.FEATURE_DIM and not self.workdir.endswith("_features"):
            raise Interrupted
        return path

    monkeypatch.setattr(FeatureStore, "write", write_then_stop)
    monkeypatch.setattr(parallel, "make_mesh", lambda cfg, devices=None: original_mesh(cfg, devices=jax.devices()[:1]))
    with pytest.raises(Interrupted):
        evaluate_fid.main(argv(tmp_path / "part", 2))
    monkeypatch.setattr(FeatureStore, "write", original_write)
    monkeypatch.setattr(parallel, "make_mesh", original_mesh)
    assert evaluate_fid.main(argv(tmp_path / "part", 8)) == 0
    part = json.loads((tmp_path / "part" / "fid.json").read_text())
    assert part["shards_computed"] == 1
    made = dict(batch_size=8, devices=8, device_kind=jax.devices()[0].device_kind, jax=jax.__version__)
    assert whole["shards_made_with"] == [dict(shards=[0, 1], data_parallel=8, **made)]
    assert part["shards_made_with"] == [dict(shards=[0], data_parallel=1, **dict(made, batch_size=2)),
                                        dict(shards=[1], data_parallel=8, **made)]
    for name in sorted(n for n in os.listdir(tmp_path / "whole" / "samples" / "image_shards") if n.endswith(".npy")):
        a, b = (np.load(tmp_path / d / "samples" / "image_shards" / name) for d in ("whole", "part"))
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(FeatureStore(tmp_path / "part" / "samples", 8, 4).concatenate(),
                                  FeatureStore(tmp_path / "whole" / "samples", 8, 4).concatenate())
    assert part["fid"] == whole["fid"] and part["kid"] == whole["kid"]
    assert whole["inception_sha256"] == inception.source_sha256(env["weights"])


def test_two_hosts_share_the_shards(env, tmp_path):
    """Two processes (jax.distributed over localhost, one device each), as launch/tpu.sh starts the
    tool on a pod: each samples every other shard into the shared workdir, process 0 alone writes
    fid.json, and the images are those of a one-host run on 8 devices bit for bit (noise keyed by
    caption index; the base stage), the FID equal to float round-off of the Inception batches."""
    import subprocess
    import sys

    from test_multihost import env as process_env, free_port

    def argv(workdir):
        return ["--stages", env["base"], "--inception", env["weights"], "--inception_sha256", "any",
                "--coco", env["coco"], "--cache_dir", env["cache"], "--workdir", str(workdir), "--num_samples", "8",
                "--shard_size", "2", "--steps", "2", "--guidance", "2", "--resolution", str(RES),
                "--inception_batch", "8", "--seed", "3", "--caption_seed", "1", "--quiet"]

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "imagen_jax.evaluate_fid", *argv(tmp_path / "two")],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=process_env(1, IMAGEN_JAX_COORDINATOR=f"127.0.0.1:{port}",
                                              IMAGEN_JAX_NUM_PROCESSES="2", IMAGEN_JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "process 1: sampled 2 shards; process 0 writes fid.json" in outs[1]
    two = json.loads((tmp_path / "two" / "fid.json").read_text())
    assert two["shards_computed"] == 2 and two["num_samples"] == 8  # process 0's own two of the four

    assert evaluate_fid.main(argv(tmp_path / "one")) == 0
    one = json.loads((tmp_path / "one" / "fid.json").read_text())
    shards = sorted(n for n in os.listdir(tmp_path / "one" / "samples" / "image_shards") if n.endswith(".npy"))
    assert len(shards) == 4
    for name in shards:
        a, b = (np.load(tmp_path / d / "samples" / "image_shards" / name) for d in ("one", "two"))
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_allclose(FeatureStore(tmp_path / "two" / "samples", 8, 2).concatenate(),
                               FeatureStore(tmp_path / "one" / "samples", 8, 2).concatenate(), rtol=1e-4, atol=1e-5)
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-4)
