"""The training step of every cascade stage, built from a stage config: train state, optimizer,
EMA, noise conditioning augmentation, classifier-free-guidance dropout, and the shardings that place
all of it on a device mesh. `imagen_jax.train` (the loop) and `imagen_jax.inspect` (ahead-of-time
compilation) both use this module."""
import dataclasses
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from imagen_jax import diffusion, parallel
from imagen_jax.diffusion import schedules
from imagen_jax.models import UNet, UNetConfig, init_inputs, upsample_lowres
from imagen_jax.training import remat as remat_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    # First step whose loss or gradient norm was not finite (-1 if none). That step's update is
    # skipped, so the state itself never holds a poisoned value.
    nonfinite_step: jax.Array


def model_config(config) -> UNetConfig:
    d = config.model.to_dict()
    # An unresolved "auto" (outside the trainer: sampling, FLOP counts) means no remat.
    d["remat"] = remat_lib.as_setting(d.get("remat", False)) is True
    return UNetConfig.from_dict(d)


def lr_schedule(opt_cfg, total_steps):
    warmup = optax.linear_schedule(0.0, opt_cfg.learning_rate, max(int(opt_cfg.warmup_steps), 1))
    if opt_cfg.decay == "constant":
        after = optax.constant_schedule(opt_cfg.learning_rate)
    elif opt_cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(opt_cfg.learning_rate, max(total_steps - opt_cfg.warmup_steps, 1))
    else:
        raise ValueError(f"optimizer.decay must be constant or cosine, got {opt_cfg.decay!r}")
    return optax.join_schedules([warmup, after], [int(opt_cfg.warmup_steps)])


def make_optimizer(opt_cfg, total_steps):
    """Paper: Adafactor for the base model, Adam (0.9, 0.999, 1e-8) for the SR models; both after
    global-norm clipping, lr 1e-4 with linear warm-up then constant or cosine.

    Adafactor is optax's default (App. F.1: `optax.adafactor(lrs=learning_rate, weight_decay=0)`),
    so each update is scaled by max(1e-3, RMS(parameter)) (`multiply_by_parameter_scale`)."""
    lr = lr_schedule(opt_cfg, total_steps)
    if opt_cfg.name == "adam":
        opt = optax.adam(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
    elif opt_cfg.name == "adafactor":
        opt = optax.adafactor(lr)
    else:
        raise ValueError(f"optimizer.name must be adam or adafactor, got {opt_cfg.name!r}")
    parts = [opt]
    if opt_cfg.clip_norm and opt_cfg.clip_norm > 0:
        parts.insert(0, optax.clip_by_global_norm(opt_cfg.clip_norm))
    return optax.chain(*parts), lr


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def ema_decay(step, decay):
    # Warm-up so early EMA weights are not dominated by the random initialisation.
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def drop_text(rng, text, mask, prob):
    """Classifier-free guidance dropout: each example's text is replaced by the null prompt
    (zero embeddings, all-padding mask) with probability `prob`."""
    keep = jax.random.bernoulli(rng, 1.0 - prob, (text.shape[0],))
    return text * keep[:, None, None].astype(text.dtype), mask & keep[:, None]


def accumulate_gradients(loss_fn, params, batch, rng, microbatches, batch_shardings=None, grad_shardings=None):
    """(mean loss, mean gradient) of `loss_fn(params, batch, rng)` over the global batch, computed
    in `microbatches` sequential slices (a `lax.scan`), so activations and the compiled program are
    those of one slice. Gradients accumulate in float32.

    Example i of the batch goes to slice i % microbatches: each device's rows of a batch sharded
    along axis 0 split into slices that stay on that device, so slicing moves no data. Slice m
    draws its randomness from fold_in(rng, m). With microbatches=1 this is value_and_grad itself.
    """
    if microbatches <= 1:
        return jax.value_and_grad(loss_fn)(params, batch, rng)
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if n % microbatches:
        raise ValueError(f"batch of {n} does not split into train.microbatches={microbatches} slices")

    def slices(x, sharding):  # [n, ...] -> [microbatches, n / microbatches, ...], rows i % m -> slice m
        x = jnp.moveaxis(x.reshape(n // microbatches, microbatches, *x.shape[1:]), 1, 0)
        if sharding is not None:  # keep each slice split over the data axes as the batch was
            spec = jax.sharding.PartitionSpec(None, *sharding.spec)
            x = jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))
        return x

    shards = batch_shardings or {k: None for k in batch}
    stacked = {k: slices(v, shards[k]) for k, v in batch.items()}

    def constrain(g):
        return g if grad_shardings is None else jax.lax.with_sharding_constraint(g, grad_shardings)

    def body(carry, xs):
        loss_sum, grad_sum = carry
        m, micro = xs
        loss, grads = jax.value_and_grad(loss_fn)(params, micro, jax.random.fold_in(rng, m))
        grad_sum = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (loss_sum + loss, constrain(grad_sum)), None

    zeros = constrain(jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                           (jnp.arange(microbatches), stacked))
    grads = jax.tree_util.tree_map(lambda g, p: (g / microbatches).astype(p.dtype), grad_sum, params)
    return loss_sum / microbatches, grads


def remat_setting(config):
    return remat_lib.as_setting(config.model.get("remat", False))


class _PrecompiledStep:
    """The jitted step, called through an executable compiled ahead of time for the same inputs
    (falls back to the jitted function for inputs it was not compiled for)."""

    def __init__(self, jitted, compiled):
        self.jitted, self.compiled = jitted, compiled

    def __call__(self, *args):
        try:
            return self.compiled(*args)
        except (TypeError, ValueError):  # raised before running: other shapes or shardings
            return self.jitted(*args)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def accepts(self, *args):
        """True when the precompiled executable was compiled for exactly these arguments: the same
        tree, shapes, dtypes and shardings (so calling it needs no other program). Uncommitted
        arrays (a PRNG key made without a device) and host arrays go where the executable wants
        them, so only their shapes and dtypes count."""
        c = self.compiled
        if jax.tree_util.tree_structure((args, {})) != c.in_tree:
            return False
        leaves = jax.tree_util.tree_leaves(args)
        infos = jax.tree_util.tree_leaves(c.args_info[0])
        shardings = jax.tree_util.tree_leaves(c.input_shardings[0])
        if not len(leaves) == len(infos) == len(shardings):
            return False
        for x, info, sharding in zip(leaves, infos, shardings):
            if tuple(x.shape) != tuple(info.shape) or x.dtype != info.dtype:
                return False
            if getattr(x, "committed", False) and not x.sharding.is_equivalent_to(sharding, len(x.shape)):
                return False
        return True


def executable(trainer, state, batch, rng):
    """(compiled train step for these arguments, seconds its compile took, whether it was reused).

    Under model.remat="auto" the Trainer compiled the step while choosing its policy; that
    executable is reused when it was compiled for exactly these arguments, instead of compiling
    the same program again: without a persistent compilation cache that second compile redoes the
    whole first one (measured ~4 minutes for the base64 paper step on one GPU)."""
    step = trainer.step
    if isinstance(step, _PrecompiledStep) and step.accepts(state, batch, rng):
        return step.compiled, float(trainer.remat_report.get("compile_s", 0.0)), True
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    return compiled, time.perf_counter() - t0, False


@dataclasses.dataclass
class Trainer:
    """Everything about one stage's training step on one mesh."""

    config: Any
    mesh: Any

    def __post_init__(self):
        if remat_setting(self.config) == "auto":
            # Become the Trainer of the policy that fits (its config has a concrete remat), and
            # keep the step compiled while choosing (training/remat.py).
            chosen, compiled, self.remat_report = remat_lib.choose(
                self.config, self.mesh, lambda cfg: Trainer(cfg, self.mesh))
            self.__dict__.update({k: v for k, v in chosen.__dict__.items() if k != "remat_report"})
            if compiled is not None:
                self.step = _PrecompiledStep(self.step, compiled)
            return
        c = self.config
        self.model_cfg = model_config(c)
        self.model = UNet(self.model_cfg)
        self.tx, self.lr_fn = make_optimizer(c.optimizer, c.train.num_steps)
        self.rules = parallel.rules_tuple(c.mesh.rules)
        self.is_sr = c.diffusion.lowres_size > 0
        self.text_len = int(c.text.max_length)
        self.microbatches = int(c.train.get("microbatches", 1))
        if self.microbatches < 1:
            raise ValueError(f"train.microbatches must be >= 1, got {self.microbatches}")
        # Parameters, optimizer state and EMA, created sharded (never whole on one device).
        abstract = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
        self.param_shardings = parallel.logical_shardings(abstract, self.mesh, self.rules)
        abstract_params = nn.meta.unbox(abstract)
        parallel.check_sharded(abstract, self.param_shardings, self.mesh, c.mesh.min_shard_bytes)
        self.abstract_params = abstract_params
        self.state_shardings = self._state_shardings(abstract_params)
        self.abstract_state = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
        self.init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self.batch_shardings = self.make_batch_shardings()
        self.step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_shardings,
                                                            parallel.replicated(self.mesh)),
                            out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
                            donate_argnums=(0,))

    # ---------------------------------------------------------------- state
    def _init_boxed(self, rng):
        inputs = init_inputs(self.model_cfg, batch=1, text_len=self.text_len,
                             image_size=self.config.data.image_size)
        return self.model.init(rng, **inputs)["params"]

    def _init_state(self, rng):
        params = nn.meta.unbox(self._init_boxed(rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=self.tx.init(params), nonfinite_step=jnp.full((), -1, jnp.int32))

    def _state_shardings(self, abstract_params):
        rep = parallel.replicated(self.mesh)
        opt_abstract = jax.eval_shape(self.tx.init, abstract_params)

        def for_opt_leaf(leaf, sharding, param):
            # Moments shaped like their parameter share its sharding; factored (Adafactor) or
            # scalar statistics are small and replicated.
            return sharding if getattr(leaf, "shape", None) == param.shape else rep

        opt_shardings = optax.tree_map_params(
            self.tx, for_opt_leaf, opt_abstract, self.param_shardings, abstract_params,
            transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
        return TrainState(step=rep, params=self.param_shardings, ema_params=self.param_shardings,
                          opt_state=opt_shardings, nonfinite_step=rep)

    def make_batch_shardings(self):
        m = self.mesh
        spec = {"image": parallel.batch_sharding(m, 4), "text": parallel.batch_sharding(m, 3),
                "text_mask": parallel.batch_sharding(m, 2)}
        if self.is_sr:
            spec["lowres"] = parallel.batch_sharding(m, 4)
        return spec

    def batch_struct(self, global_batch):
        """Abstract global batch (for ahead-of-time compilation)."""
        c, s = self.config, self.config.data.image_size
        dt = jnp.dtype(self.model_cfg.dtype)
        out = {"image": jax.ShapeDtypeStruct((global_batch, s, s, 3), jnp.float32),
               "text": jax.ShapeDtypeStruct((global_batch, self.text_len, self.model_cfg.text_dim), dt),
               "text_mask": jax.ShapeDtypeStruct((global_batch, self.text_len), jnp.bool_)}
        if self.is_sr:
            ls = s * c.diffusion.lowres_size // (c.data.full_size or s)
            out["lowres"] = jax.ShapeDtypeStruct((global_batch, ls, ls, 3), jnp.float32)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k]) for k, v in out.items()}

    # ---------------------------------------------------------------- step
    def loss_fn(self, params, batch, rng):
        c = self.config
        drop_rng, aug_rng, aug_noise_rng, loss_rng, dropout_rng = jax.random.split(rng, 5)
        text, mask = drop_text(drop_rng, batch["text"], batch["text_mask"].astype(bool), c.diffusion.cond_drop_prob)
        x0 = batch["image"]
        kw = {}
        if self.is_sr:
            lowres = upsample_lowres(batch["lowres"], x0.shape[1])
            if c.diffusion.noise_aug:
                # Noise conditioning augmentation: corrupt the conditioning image at a level drawn
                # per example from U(0, aug_max) (paper: U(0, 1)) and tell the network that level.
                # Levels map to noise through the one augmentation schedule, not the stage's own.
                aug_logsnr = diffusion.sample_logsnr(aug_rng, x0.shape[0], schedules.AUG_SCHEDULE,
                                                     c.diffusion.get("aug_max", 1.0))
                noise = jax.random.normal(aug_noise_rng, lowres.shape, jnp.float32)
                lowres = schedules.q_sample(lowres, aug_logsnr, noise)
            else:
                aug_logsnr = jnp.full((x0.shape[0],), schedules.LOGSNR_MAX)
            kw = dict(lowres=lowres, lowres_logsnr=aug_logsnr)

        def apply_fn(x_t, logsnr):
            return self.model.apply({"params": params}, x_t, logsnr, text, mask, train=True,
                                    rngs={"dropout": dropout_rng}, **kw)

        with nn.logical_axis_rules(self.rules):
            per_example = diffusion.diffusion_loss(
                apply_fn, x0, loss_rng, schedule=c.diffusion.schedule, prediction=c.diffusion.prediction,
                weighting=c.diffusion.weighting, min_snr_gamma=c.diffusion.min_snr_gamma)
        return jnp.mean(per_example)

    def _train_step(self, state, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        loss, grads = accumulate_gradients(self.loss_fn, state.params, batch, rng, self.microbatches,
                                           self.batch_shardings, self.param_shardings)
        grad_norm = global_norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = ema_decay(state.step, self.config.optimizer.ema_decay)
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1, params=keep(params, state.params), ema_params=keep(ema, state.ema_params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~ok, state.step, state.nonfinite_step))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.lr_fn(state.step)}
        return new_state, metrics


def check_batch(batch_size, mesh, microbatches=1):
    """Every microbatch must split evenly over the data-parallel devices (data x fsdp)."""
    dp = parallel.data_parallel_size(mesh)
    if batch_size % (dp * microbatches):
        raise parallel.MeshError(
            f"train.batch_size={batch_size} is not divisible by the data-parallel size data x fsdp = {dp}"
            + (f" times train.microbatches = {microbatches}" if microbatches > 1 else ""))


def count_state_params(abstract_params):
    return sum(x.size for x in jax.tree_util.tree_leaves(abstract_params))


def lower_train_step(config, devices, batch_size):
    """Lowers the real train step for `devices` (local, or abstract TPU topology devices) with the
    config's mesh and rules, from abstract inputs only; returns (trainer, lowered)."""
    mesh = parallel.make_mesh(config.mesh, devices)
    trainer = Trainer(config, mesh)
    check_batch(batch_size, mesh, trainer.microbatches)
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   trainer.abstract_state, trainer.state_shardings)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(mesh))
    return trainer, trainer.step.lower(state, trainer.batch_struct(batch_size), rng)


def model_flops(config, global_batch):
    """Model FLOPs of one training step: 3x the U-Net forward pass (forward + backward), counted by
    XLA's cost analysis of the forward lowered for the CPU backend (GPU lowerings hand convolutions
    to cuDNN custom calls, which the cost analysis does not count). No remat and plain XLA
    attention: the work the model needs, not the work an implementation chooses to redo."""
    from jax.sharding import SingleDeviceSharding

    cfg = UNetConfig.from_dict({**config.model.to_dict(), "remat": False, "attention_impl": "xla"})
    model = UNet(cfg)
    cpu = SingleDeviceSharding(jax.devices("cpu")[0])
    on_cpu = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), t)  # noqa: E731
    inputs = on_cpu(init_inputs(cfg, batch=global_batch, text_len=int(config.text.max_length),
                                image_size=int(config.data.image_size)))
    params = on_cpu(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **init_inputs(cfg))))
    cost = jax.jit(lambda p, i: model.apply(p, **i)).lower(params, inputs).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return 3.0 * float((cost or {}).get("flops", 0.0))
