"""A checkpoint written with the old HWIO conv kernels fails with one line that names the cause."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import SingleDeviceSharding

from imagen_jax import checkpoints


def test_old_hwio_conv_kernel_is_refused_with_the_layout_named(tmp_path):
    mngr = checkpoints.manager(str(tmp_path), async_save=False)
    old = {"conv": {"kernel": np.ones((3, 3, 4, 8), np.float32), "bias": np.zeros((8,), np.float32)}}
    mngr.save(1, args=ocp.args.Composite(ema_params=ocp.args.StandardSave(old)))
    mngr.wait_until_finished()
    mngr.close()
    new = {"conv": {"kernel": jax.ShapeDtypeStruct((8, 3, 3, 4), jnp.float32),
                    "bias": jax.ShapeDtypeStruct((8,), jnp.float32)}}
    shardings = jax.tree_util.tree_map(lambda _: SingleDeviceSharding(jax.devices()[0]), new)
    with pytest.raises(checkpoints.CheckpointError, match=r"now stored \[out, kh, kw, in\]") as err:
        checkpoints.restore_params(str(tmp_path), new, shardings)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
