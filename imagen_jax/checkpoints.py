"""Training checkpoints of a workdir (orbax), shared by the trainer, the samplers, FID and export.

Layout: WORKDIR/config.json (the stage config) and WORKDIR/checkpoints/<step>/ with the items
params, ema_params, opt_state (each an orbax PyTree) and meta (JSON: step, data position,
first non-finite step). Orbax writes each step to a temporary directory and renames it when
complete, so an interrupted save never looks like a checkpoint.
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("params", "ema_params", "opt_state", "meta")


class CheckpointError(ValueError):
    pass


def checkpoint_dir(workdir):
    return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, "checkpoints")


def manager(workdir, *, keep=3, async_save=True, create=True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save_config(workdir, config):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json(indent=2))
    os.replace(tmp, path)


def load_config(workdir):
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{workdir} is not a training workdir: no config.json in it")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def available_steps(workdir):
    d = checkpoint_dir(workdir)
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def save(mngr, step, state, meta):
    args = ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                              ema_params=ocp.args.StandardSave(state.ema_params),
                              opt_state=ocp.args.StandardSave(state.opt_state),
                              meta=ocp.args.JsonSave(meta))
    mngr.save(step, args=args)


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(mngr, step, abstract_state, state_shardings, items=("params", "ema_params", "opt_state")):
    """Restores the named items of `step` straight into their shardings; returns (dict, meta)."""
    args = {k: ocp.args.StandardRestore(_abstract(getattr(abstract_state, k), getattr(state_shardings, k)))
            for k in items}
    args["meta"] = ocp.args.JsonRestore()
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many kinds; the user needs the path and the cause
        raise CheckpointError(f"checkpoint {os.path.join(str(mngr.directory), str(step))} "
                              f"could not be restored ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
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
            raise CheckpointError(f"checkpoint {os.path.join(checkpoint_dir(workdir), str(step))} could not be "
                                  f"restored ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
        return out[which], step
    finally:
        mngr.close()
