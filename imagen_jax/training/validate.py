"""Checks a stage config before anything is built or written, naming every missing or inconsistent
field in one message (a paper config started without its overrides lists them all at once)."""
from imagen_jax import paths


class ConfigError(ValueError):
    pass


def profile_range(config):
    """`train.profile_steps` "a,b" -> (a, b) with 0 <= a < b; "" -> None."""
    spec = str(config.train.get("profile_steps", "") or "").strip()
    if not spec:
        return None
    try:
        a, b = (int(v) for v in spec.split(","))
    except ValueError:
        raise ConfigError(f"train.profile_steps={spec!r}: expected two steps 'a,b' (trace steps a..b-1)") from None
    if not 0 <= a < b:
        raise ConfigError(f"train.profile_steps={spec!r}: need 0 <= a < b")
    return a, b


def problems(config):
    """Every problem of the config, as a list of sentences."""
    out = []
    t, m, d = config.text, config.model, config.data
    text_dim = int(m.get("text_dim", 0))
    if not t.embeddings_dir:
        if t.t5_checkpoint and not t.vocab:
            out.append(f"text.vocab is empty but text.t5_checkpoint={t.t5_checkpoint!r}: give the T5 "
                       "SentencePiece model (e.g. gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model)")
        if not t.t5_checkpoint:
            tiny = int(t.tiny_t5.d_model)
            if text_dim != tiny:
                out.append(f"text.t5_checkpoint is empty but model.text_dim={text_dim} (the tiny random T5 "
                           f"is {tiny} wide): give a T5-XXL checkpoint (text.t5_checkpoint and text.vocab), "
                           "or text.embeddings_dir")
    source = d.source
    if source not in ("shapes", "tfds", "tfrecord"):
        out.append(f"data.source={source!r}: expected shapes, tfds or tfrecord")
    elif source == "tfds" and not d.name:
        out.append("data.source=tfds but data.name is empty: give the tfds dataset (e.g. coco_captions)")
    elif source == "tfrecord" and not d.files:
        out.append("data.source=tfrecord but data.files is empty: give a glob of TFRecord files")
    lowres, lowres_cond = int(config.diffusion.lowres_size), bool(m.get("lowres_cond", False))
    if lowres_cond != (lowres > 0):
        out.append(f"model.lowres_cond={lowres_cond} but diffusion.lowres_size={lowres}: a super-resolution "
                   "stage needs both, a base stage neither")
    gb, mb = int(config.train.batch_size), int(config.train.get("microbatches", 1))
    if gb < 1:
        out.append(f"train.batch_size={gb}: must be positive")
    elif mb < 1 or gb % mb:
        out.append(f"train.microbatches={mb} does not divide train.batch_size={gb}")
    for name in ("num_steps", "log_every", "ckpt_every"):
        if int(config.train[name]) < 1:
            out.append(f"train.{name}={config.train[name]}: must be positive")
    try:
        profile_range(config)
    except ConfigError as e:
        out.append(str(e))
    return out


def check(config):
    found = problems(config)
    if found:
        raise ConfigError(f"config {config.stage}: " + "; ".join(found))


def check_workdir(config, workdir):
    """A workdir that holds another stage's run is refused (before anything is written to it)."""
    path = paths.join(workdir, "config.json")
    if not paths.isfile(path):
        return
    import json

    old = json.loads(paths.read_text(path))
    mine = config.to_dict()
    diffs = []
    if old.get("stage") != mine["stage"]:
        diffs.append(f"stage {old.get('stage')!r} (asked: {mine['stage']!r})")
    for k, v in mine["model"].items():
        w = old.get("model", {}).get(k)
        if isinstance(v, tuple):
            v = list(v)
        if w is not None and w != v and k not in ("remat", "attention_impl"):
            diffs.append(f"model.{k}={w!r} (asked: {v!r})")
    if diffs:
        raise ConfigError(f"workdir {workdir} holds another run: " + ", ".join(diffs[:6]) +
                          "; give a new --workdir (or the config it was trained with)")


def check_orphan_checkpoints(workdir):
    """Checkpoints without the config.json that every run writes before its first save belong to
    no run of this trainer (or to another tool): refused, not overwritten."""
    if paths.isfile(paths.join(workdir, "config.json")):
        return
    from imagen_jax import checkpoints

    steps = checkpoints.available_steps(workdir)
    if steps:
        raise ConfigError(f"workdir {workdir} holds checkpoints (steps {steps[:5]}) but no config.json, so "
                          "they are not a run of this stage; give a new --workdir")
