"""Test helpers: tiny stage workdirs with random parameters, without running the data pipeline."""
import contextlib
import importlib
import logging

import jax
import numpy as np

from imagen_jax import checkpoints, parallel, training


def tiny_config(stage, **overrides):
    """configs/<stage>.py:tiny with a short text length; overrides as {'train.batch_size': 8}."""
    c = importlib.import_module(f"configs.{stage}").get_config("tiny")
    c.text.max_length = 16
    c.train.sample_every = 0
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def make_workdir(workdir, stage, *, seed=0, step=1, vocab=None, mesh_cfg=None, perturb=0.02, **overrides):
    """Writes config.json and one checkpoint (random params; EMA = params + noise so that the
    zero-initialised output layers do not make every sample identical) into `workdir`."""
    c = tiny_config(stage, **overrides)
    if vocab:
        c.text.vocab = vocab
    mesh = parallel.make_mesh(mesh_cfg or {"data": -1, "fsdp": 1, "tensor": 1})
    trainer = training.Trainer(c, mesh)
    state = trainer.init(jax.random.PRNGKey(seed))
    # Noise drawn on the host: one numpy draw per parameter instead of one compiled op each.
    rng = np.random.default_rng(seed + 100)
    noisy = jax.tree_util.tree_map(lambda x: (x + perturb * rng.standard_normal(x.shape)).astype(x.dtype),
                                   jax.device_get(state.params))
    noisy = jax.device_put(noisy, trainer.state_shardings.params)
    state = state.replace(params=noisy, ema_params=noisy, step=state.step + step)
    checkpoints.save_config(str(workdir), c)
    mngr = checkpoints.manager(str(workdir), async_save=False)
    checkpoints.save(mngr, step, state, {"step": step, "data_position": step})
    mngr.wait_until_finished()
    mngr.close()
    return c, state


def shapes_vocab(tmp_path):
    """The demo SentencePiece vocabulary, trained once into tmp_path."""
    from imagen_jax import conditioning
    return conditioning.demo_vocab(str(tmp_path / "shapes_spm"))


def random_batch(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def make_store(root, vocab, captions, max_length=16):
    """A tiny random T5 (d_model 64, the tiny stages' text_dim) saved as safetensors, and an embedding
    store of `captions` written with it: {'t5', 'store', 'enc'}."""
    from imagen_jax import encode_text
    from imagen_jax.text import checkpoints as t5_checkpoints
    from imagen_jax.text.encoder import TextEncoder

    enc = TextEncoder.random(vocab, max_length=max_length)
    t5_path = t5_checkpoints.save_safetensors(jax.device_get(enc.params), str(root / "t5.safetensors"))[0]
    enc = TextEncoder.from_checkpoint(t5_path, vocab, max_length=max_length)
    store = str(root / "store")
    encode_text.encode_captions(enc, list(captions), store, batch_size=8, shard_size=8, progress=False)
    return {"t5": t5_path, "store": store, "enc": enc}


class CompileCounter:
    """Counts the programs jax had to obtain inside `with counter:` blocks: XLA compilations and,
    since the suite shares a persistent compilation cache (conftest.py), cache retrievals too. Either
    one means the in-memory jit cache missed, which is what a "no recompile" test is about."""

    EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")

    def __init__(self):
        from jax import monitoring

        self.count, self.active = 0, False
        monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kwargs):
        if self.active and event in self.EVENTS:
            self.count += 1

    def __enter__(self):
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


@contextlib.contextmanager
def count_lowerings(fun_name):
    """Counts, inside the block, how often jax lowers the jitted function `fun_name` for
    compilation ("Compiling jit(NAME) ..." under jax.log_compiles): a lowering happens for every
    compile, and for every persistent-cache hit too, so the count says how often the in-memory jit
    cache missed, whatever the persistent cache holds. Yields a dict whose "count" is updated."""
    prefix = f"Compiling jit({fun_name})"
    seen = {"count": 0}

    class Handler(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith(prefix):
                seen["count"] += 1

    handler, logger = Handler(logging.DEBUG), logging.getLogger("jax")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
