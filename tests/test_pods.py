"""The paper's pod configurations compile for their TPU topologies (libtpu, no TPU needed) and fit
in the chips' HBM. Slow (the real TPU compiler on a 2-core CPU), but run in CI."""
import importlib

import pytest

from configs import pods
from imagen_jax import topology, training


# The 2B base model's pod compile takes over 30 minutes on a 2-core CPU: those two cases carry the
# `very_slow` mark and are run by hand (README, "Pod configurations"), not in CI.
CASES = [pytest.param(n, marks=[pytest.mark.very_slow] if n.startswith("base64") else []) for n in sorted(pods.PODS)]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_pod_config_fits(name):
    config = pods.get_config(name)
    accelerator = config.accelerator
    _, lowered = training.lower_train_step(config, topology.topology_devices(accelerator), config.train.batch_size)
    compiled, report = topology.compile_and_report(lowered, accelerator)
    line = topology.format_fits_line(report)
    print(name, line, report.get("flops"))
    assert compiled is not None, line
    assert report["fits"], line
    assert 0 < report["per_chip_bytes"] <= report["hbm_bytes"]
    assert report["flops"] and report["flops"] > 1e12  # a real 2048-image step, not an empty program


def test_pod_names_are_checked():
    with pytest.raises(ValueError, match="pod config must be one of"):
        pods.get_config("base64_v3_8")
    assert importlib.import_module("configs.pods").PODS["base64_v4_256"][1] == "v4-256"
