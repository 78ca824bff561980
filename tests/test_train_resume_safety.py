"""A resume whose config does not restore the workdir's checkpoints writes nothing: config.json
(and every other file) stays byte-identical, and the failure is one message, not a traceback."""
import json
import os

import pytest

from imagen_jax import cli
from imagen_jax.training import loop as train_lib
from stage_utils import tiny_config


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_mismatched_resume_leaves_workdir_unchanged(tiny_base, capsys):
    wd = tiny_base  # the session's tiny base64 workdir (Adam state); nothing may change in it
    with open(os.path.join(wd, "config.json")) as f:
        saved = json.load(f)
    assert saved["optimizer"]["name"] == "adam"
    vocab = saved["text"]["vocab"]
    before = _snapshot(wd)
    # Same model (so the workdir check passes), another optimizer: its state does not restore.
    c = tiny_config("base64", **{"optimizer.name": "adafactor"})
    c.text.vocab = vocab
    rc = cli.run(train_lib.train, c, wd)
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "could not be restored" in err, err  # the restore failed, after which nothing may be written
    assert _snapshot(wd) == before  # config.json not rewritten to the new optimizer
