"""Training checkpoints of a workdir (orbax), shared by the trainer, the samplers, FID and export.

Layout: WORKDIR/config.json (the stage config) and WORKDIR/checkpoints/<step>/ with the items
params, ema_params, opt_state (each an orbax PyTree) and meta (JSON: step, data position,
first non-finite step). Orbax writes each step to a temporary directory and renames it when
complete, so an interrupted save never looks like a checkpoint.
"""
import json

import jax
import ml_collections
import orbax.checkpoint as ocp

from imagen_jax import paths

ITEMS = ("params", "ema_params", "opt_state", "meta")


class CheckpointError(ValueError):
    pass


def checkpoint_dir(workdir):
    return paths.join(paths.absolute(workdir), "checkpoints")


def manager(workdir, *, keep=3, async_save=True, create=True):
    """The workdir's orbax CheckpointManager. Preemption: on a multi-host run
    `mngr.reached_preemption(step)` is true on every host at the same step once any host got
    SIGTERM (jax.distributed's preemption sync manager), so all hosts save that step."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save_config(workdir, config):
    paths.makedirs(workdir)
    paths.write_text(paths.join(workdir, "config.json"), config.to_json(indent=2))


def load_config(workdir):
    path = paths.join(workdir, "config.json")
    if not paths.isfile(path):
        raise CheckpointError(f"{workdir} is not a training workdir: no config.json in it")
    return ml_collections.ConfigDict(json.loads(paths.read_text(path)))


def available_steps(workdir):
    """The complete checkpoints' steps, as orbax lists them (unfinished saves are not steps).

    No CheckpointManager here: its constructor runs cross-host barriers, and on a pod one host can
    see the directory (another host just created it) while a slower one does not, so a manager
    built on one host only would pair its barrier with another host's different barrier."""
    return sorted(int(s) for s in ocp.utils.checkpoint_steps(checkpoint_dir(workdir)))


def save(mngr, step, state, meta):
    args = ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                              ema_params=ocp.args.StandardSave(state.ema_params),
                              opt_state=ocp.args.StandardSave(state.opt_state),
                              meta=ocp.args.JsonSave(meta))
    mngr.save(step, args=args)


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _restore_error(where, e):
    msg = str(e).splitlines()[0][:300] if str(e) else ""
    hint = ""
    if "shape" in str(e).lower():
        hint = ("; if this checkpoint predates 2026-12-02, its U-Net conv kernels are [kh, kw, in, out]: they are "
                "now stored [out, kh, kw, in] (models/layers.Conv), so retrain or transpose them")
    return CheckpointError(f"checkpoint {where} could not be restored ({type(e).__name__}: {msg}){hint}")


def restore(mngr, step, abstract_state, state_shardings, items=("params", "ema_params", "opt_state")):
    """Restores the named items of `step` straight into their shardings; returns (dict, meta)."""
    args = {k: ocp.args.StandardRestore(_abstract(getattr(abstract_state, k), getattr(state_shardings, k)))
            for k in items}
    args["meta"] = ocp.args.JsonRestore()
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many kinds; the user needs the path and the cause
        raise _restore_error(paths.join(str(mngr.directory), str(step)), e) from None
    return {k: out[k] for k in items}, dict(out["meta"])


def restore_params(workdir, abstract_params, shardings, *, step=None, which="ema_params"):
    """The EMA (default) or raw parameters of a workdir's latest (or given) checkpoint."""
    steps = available_steps(workdir)
    if not steps:
        raise CheckpointError(f"no checkpoints in {checkpoint_dir(workdir)}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"step {step} is not among the checkpoints of {workdir}: {steps}")
    mngr = manager(workdir, async_save=False, create=False)
    try:
        args = ocp.args.Composite(**{which: ocp.args.StandardRestore(_abstract(abstract_params, shardings))})
        try:
            out = mngr.restore(step, args=args)
        except Exception as e:
            raise _restore_error(paths.join(checkpoint_dir(workdir), str(step)), e) from None
        return out[which], step
    finally:
        mngr.close()
