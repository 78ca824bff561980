"""The paper's pod configurations compile for their TPU topologies (libtpu, no TPU needed) and fit
in the chips' HBM. Slow (the real TPU compiler on a 2-core CPU: 4 to 13 minutes a config), run in
CI by .ci/run after the main suite.

Each config compiles in its own `python -m imagen_jax.inspect` process, the command the README
tells users to run: the TPU compiler's host memory (up to ~18 GB here) is returned to the system
between configs, and the printed `fits=` line, which outside scripts rely on, is what is checked.
"""
import os
import re
import subprocess
import sys

import pytest

from configs import pods
from imagen_jax import topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_inspect(name):
    accelerator = (pods.PODS.get(name) or pods.SAMPLING[name])[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # libtpu makes the topology; no TPU is touched
    env.pop("XLA_FLAGS", None)  # the 8 simulated CPU devices of the unit tests play no part here
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's CPU cache (conftest.py): no pod programs in it
    cmd = [sys.executable, "-m", "imagen_jax.inspect", f"--config=configs/pods.py:{name}",
           f"--topology={accelerator}", "--compile"]
    # An hour: the 2B base steps took 16-24 min to compile on 2-core machines, and one did not finish in
    # 30 min on a 2-core Intel Xeon (README "Pod configurations").
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    return accelerator, r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(pods.PODS))
def test_pod_config_fits(name):
    accelerator, out = run_inspect(name)
    print(out[out.find("topology="):])
    chip = topology.chip_spec(accelerator)
    fits = re.search(r"^fits=(true|false) per_chip_bytes=(\d+) hbm_bytes=(\d+)$", out, re.M)
    assert fits, out[-2000:]
    assert fits.group(1) == "true", fits.group(0)
    per_chip, hbm = int(fits.group(2)), int(fits.group(3))
    assert hbm == chip.hbm_bytes and 0 < per_chip <= hbm
    _, _, _, batch, microbatches = pods.PODS[name]
    head = re.search(r"^topology=(\S+) chips=(\d+) batch=(\d+) microbatches=(\d+)", out, re.M)
    assert head and head.groups() == (accelerator, str(topology.slice_spec(accelerator).num_chips),
                                      str(batch), str(microbatches)), out[-2000:]
    # A real 2048-image step: every chip does TFLOPs of work (a U-Net forward + backward on its
    # share of the batch), not an empty or truncated program.
    flops = float(re.search(r"^flops per step per chip: (\S+);", out, re.M).group(1))
    assert flops > 1e13, flops


@pytest.mark.slow
@pytest.mark.tpu_sampling
@pytest.mark.parametrize("name", sorted(pods.SAMPLING))
def test_sampling_config_fits(name):
    """One guided sampling step of the FSDP-sharded IF U-Net (forward only) fits the slice's chips."""
    accelerator, out = run_inspect(name)
    print(out[out.find("topology="):])
    fits = re.search(r"^fits=(true|false) per_chip_bytes=(\d+) hbm_bytes=(\d+)$", out, re.M)
    assert fits and fits.group(1) == "true", out[-2000:]
    assert int(fits.group(3)) == topology.chip_spec(accelerator).hbm_bytes
    _, _, fsdp, prompts = pods.SAMPLING[name]
    head = re.search(r"^topology=(\S+) chips=(\d+) batch=(\d+) prompts=(\d+)", out, re.M)
    assert head and head.groups() == (accelerator, str(topology.slice_spec(accelerator).num_chips),
                                      str(2 * prompts), str(prompts)), out[-2000:]
    # The weights alone are 8.6 GB in bf16: a chip holding ~1/fsdp of them (plus activations) shows
    # the U-Net really is sharded, not replicated.
    assert 8.6e9 / fsdp < int(fits.group(2)) < 8.6e9, fits.group(0)


def test_pod_names_are_checked():
    with pytest.raises(ValueError, match="pod config must be one of"):
        pods.get_config("base64_v3_8")
    c = pods.get_config("base64_v4_256")
    assert (c.accelerator, c.train.batch_size, c.mesh.fsdp, c.train.microbatches) == ("v4-256", 2048, 8, 8)
