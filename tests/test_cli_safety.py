"""Careless-user inputs to every tool: each is refused before any model is built, with one line that
names the problem, a non-zero exit status, no traceback, and every file already there unchanged."""
import hashlib
import json
import os
import sys

import pytest

from imagen_jax import cli, sampling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forked_tools  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_digest(root):
    """{relative path: sha256} of every file under root (and every directory, as None)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = None
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def land(tmp_path_factory):
    """A training workdir, a bundle, an earlier sample output, a regular file, a plain directory of
    the user's, prompts, a vocabulary and captions: everything a mistyped path may point at."""
    root = tmp_path_factory.mktemp("land")
    wd = root / "workdir"
    (wd / "checkpoints" / "100").mkdir(parents=True)
    (wd / "config.json").write_text(json.dumps({"stage": "base64"}))
    (wd / "checkpoints" / "100" / "params").write_bytes(os.urandom(256))
    wd2 = root / "workdir2"
    (wd2 / "checkpoints").mkdir(parents=True)
    (wd2 / "config.json").write_text(json.dumps({"stage": "sr256"}))
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "info.json").write_text("{}")
    (bundle / "config.json").write_text("{}")
    samples = root / "samples"
    (samples / "images").mkdir(parents=True)
    (samples / "settings.json").write_text(json.dumps({"written_by": sampling.SAMPLE_MARKER, "prompts": ["a"]}))
    mine = root / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (root / "file.txt").write_text("a regular file")
    (root / "prompts.txt").write_text("a red circle\n")
    (root / "captions.txt").write_text("a red circle\na blue square\n")
    (root / "spm.model").write_bytes(b"not really a sentencepiece model")
    return root


def cases(r):
    """(tool, argv, words the one error line must contain)."""
    wd, wd2, bundle, samples, mine = (str(r / n) for n in ("workdir", "workdir2", "bundle", "samples", "mine"))
    f = str(r / "file.txt")
    under_file = f + "/sub"
    prompt = ["--prompt=a red circle"]
    t5 = ["--t5", wd, "--vocab", str(r / "spm.model"), "--captions_file", str(r / "captions.txt")]
    fid = ["--stages", wd, "--inception", str(r / "nope.pth"), "--coco", mine]
    return [
        ("train", ["--config=configs/nope.py", f"--workdir={r / 'new'}"], ["configs/nope.py", "does not exist"]),
        ("train", ["--config=configs/base64.py:nosuch", f"--workdir={r / 'new'}"], ["variant", "nosuch"]),
        ("train", ["--config=configs/base64.py:tiny", f"--workdir={under_file}"], ["regular file"]),
        ("train", ["--config=configs/base64.py:tiny", f"--workdir={f}"], ["regular file"]),
        ("train", ["--config=configs/base64.py:tiny", f"--workdir={r / 'new'}", "--stop_after=-1"], ["--stop_after"]),
        ("train", [f"--workdir={r / 'new'}"], ["--config"]),
        ("train", ["--config=configs/base64.py:tiny", f"--workdir={r / 'new'}", "--config.train.batchsize=3"],
         ["batchsize"]),
        ("inspect", ["--config=configs/nope.py"], ["configs/nope.py", "does not exist"]),
        ("inspect", ["--config=configs/sr256.py:huge"], ["variant", "huge"]),
        ("inspect", ["--config=configs/base64.py:tiny", "--compile", "--batch_size=-4"], ["--batch_size", "-4"]),
        ("inspect", ["--config=configs/base64.py:tiny", "--mfu=2"], ["--mfu"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={wd}", "--overwrite"], ["overlaps the stage directory"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={wd2}", "--overwrite"], ["not a previous sample output"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={bundle}", "--overwrite"], ["not a previous sample output"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={mine}", "--overwrite"], ["not a previous sample output"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={samples}"], ["exists", "--overwrite"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={r / 'o'}", "--guidance=nan"], ["--guidance", "nan"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={r / 'o'}", "--guidance=1,inf"], ["--guidance", "inf"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={r / 'o'}", "--num_images=-3"], ["--num_images", "-3"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={r / 'o'}", "--num_images=1000000000"], ["--num_images"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={under_file}"], ["regular file"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={r / 'o'}", "--batch_size=-1"], ["--batch_size"]),
        ("sample", [f"--prompts_file={r / 'none.txt'}", f"--stages={wd}", f"--out={r / 'o'}"], ["none.txt"]),
        ("sample", prompt + [f"--stages={wd}", f"--out={r / 'o'}", "--eta=nan"], ["--eta"]),
        ("demo", [f"--workdir={under_file}"], ["regular file"]),
        ("demo", [f"--workdir={r / 'd'}", "--num_prompts=0"], ["--num_prompts"]),
        ("export", ["--workdir", wd, "--out", under_file], ["regular file"]),
        ("export", ["--workdir", wd, "--out", wd2, "--overwrite"], ["not a bundle"]),
        ("export", ["--workdir", wd, "--out", wd, "--overwrite"], ["overlaps the workdir"]),
        ("export", ["--workdir", wd, "--out", str(r / "b"), "--dtype", "int8"], ["--dtype", "int8"]),
        ("evaluate_fid", fid + ["--workdir", wd], ["not an earlier evaluation"]),
        ("evaluate_fid", fid + ["--workdir", mine], ["not an earlier evaluation"]),
        ("evaluate_fid", fid + ["--workdir", under_file], ["regular file"]),
        ("evaluate_fid", fid + ["--workdir", str(r / "e"), "--num_samples", "0"], ["--sweep"]),
        ("evaluate_fid", ["--stages", wd, "--inception", f, "--coco", mine, "--workdir", str(r / "e")],
         ["SHA-256", "--inception_sha256"]),
        ("evaluate_fid", fid + ["--workdir", str(r / "e")], ["nope.pth", "not found"]),
        ("encode_text", t5 + ["--out", wd], ["not an embedding store"]),
        ("encode_text", t5 + ["--out", under_file], ["regular file"]),
        ("encode_text", t5 + ["--out", str(r / "emb"), "--batch_size", "0"], ["--batch_size"]),
    ]


def run_tools(todo, tmp):
    """[(returncode, stderr)] of `python -m imagen_jax.<tool> <argv>` for each (tool, argv, ...)."""
    return [(code, err) for code, _, err in forked_tools.run_tools([(t, argv) for t, argv, _ in todo], tmp)]


def test_bad_input_sweep(land, tmp_path):
    todo = cases(land)
    assert len(todo) >= 25
    before = tree_digest(land)
    results = run_tools(todo, tmp_path)
    failures = []
    for (tool, argv, words), (code, err) in zip(todo, results):
        lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
        ok = (code in (1, 2) and "Traceback" not in err and len(lines) == 1
              and all(w in lines[0] for w in words))
        if not ok:
            failures.append(f"{tool} {' '.join(argv)} -> rc={code}: {err[-600:]}")
    assert not failures, "\n".join(failures)
    assert tree_digest(land) == before  # nothing changed, nothing added


def test_overwrite_rules(land, tmp_path):
    """The library checks behind `sample --overwrite`: only an earlier sample output (or an empty
    directory) may be replaced."""
    assert sampling.is_sample_output(land / "samples")
    for name in ("workdir", "workdir2", "bundle", "mine"):
        assert not sampling.is_sample_output(land / name)
        with pytest.raises(cli.UsageError, match="not a previous sample output"):
            sampling.check_replaceable(str(land / name))
    sampling.check_replaceable(str(land / "samples"))
    (tmp_path / "empty").mkdir()
    sampling.check_replaceable(str(tmp_path / "empty"))
    # A settings.json beside a config.json is a workdir that happens to hold one, not a sample output.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "settings.json").write_text(json.dumps({"written_by": sampling.SAMPLE_MARKER}))
    (fake / "config.json").write_text("{}")
    assert not sampling.is_sample_output(fake)


def test_check_output(tmp_path):
    (tmp_path / "f").write_text("x")
    cli.check_output(str(tmp_path / "a" / "b"), "--out")  # creatable
    with pytest.raises(cli.UsageError, match="regular file"):
        cli.check_output(str(tmp_path / "f" / "b"), "--out")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root may write anywhere
            with pytest.raises(cli.UsageError, match="not writable"):
                cli.check_output(str(ro / "x"), "--out")
    finally:
        ro.chmod(0o700)


def test_one_line_strips_embedded_tracebacks():
    e = ValueError("Error whilst parsing config file:  Traceback (most recent call last):\n  File \"c.py\"\n"
                   "ValueError: config variant must be paper, small or tiny, got 'x'")
    assert cli.one_line(e) == "ValueError: config variant must be paper, small or tiny, got 'x'"
    assert cli.one_line(FileNotFoundError(2, "No such file or directory", "/a/b")) == "/a/b: No such file or directory"
