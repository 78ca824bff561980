"""Each sampled image draws its noise from its own key (seed, stage, image id): the images of a
cascade do not depend on the batch size or the device count, so a resumed FID run with another
--batch_size or on another machine size reproduces the uninterrupted run's images exactly.
(Checked on the base stage; the tiny SR stage on XLA:CPU differs by 1 uint8 level on a few pixels
between per-device batch sizes: float round-off of its kernels, not the noise.)"""
import jax
import numpy as np
import pytest

from imagen_jax import cascade, parallel
from imagen_jax.diffusion import keys


@pytest.fixture(scope="module")
def stages(tiny_base):  # the session's tiny base64 workdir (conftest)
    return [tiny_base]


def _text(sts, n=6):
    length, dim = sts[0].config.text.max_length, sts[0].model_cfg.text_dim
    text = np.random.default_rng(0).normal(size=(n, length, dim)).astype(np.float32)
    mask = np.ones((n, length), bool)
    mask[:, 5:] = False
    return text, mask


def _samplers(dirs, devices):
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=devices)
    sts = [cascade.load_stage(d, mesh) for d in dirs]
    return [cascade.make_sampler(st, mesh, cascade.StageSettings(steps=2, guidance=2.0)) for st in sts]


def _run(samplers, batch_size, rows=slice(None), ids=None):
    text, mask = _text([s.stage for s in samplers])
    outs, _ = cascade.run_cascade(samplers, text[rows], mask[rows], 7, batch_size=batch_size, log=None,
                                  progress=False, image_ids=ids)
    return outs[-1]


def test_images_do_not_depend_on_batch_size_or_devices(stages):
    one_device, eight_devices = _samplers(stages, jax.devices()[:1]), _samplers(stages, jax.devices())
    one = _run(one_device, 2)                  # 1 device, batches of 2
    eight = _run(eight_devices, 8)             # 8 devices, one padded batch of 8
    eight_three = _run(eight_devices, 3)       # 8 devices, batches of 3 padded to 8
    assert one.shape[0] == 6
    np.testing.assert_array_equal(one, eight)
    np.testing.assert_array_equal(one, eight_three)
    assert len({one[i].tobytes() for i in range(6)}) == 6  # different ids, different noise
    # A resumed FID shard: captions 3..5 sampled on their own, with their ids, are those images.
    part = _run(eight_devices, 8, rows=slice(3, 6), ids=[3, 4, 5])
    np.testing.assert_array_equal(part, one[3:])


def test_batched_keys_draw_each_row_alone():
    k = keys.per_image(1, 0, [5, 9])
    full = keys.normal(k, (2, 3, 4))
    np.testing.assert_array_equal(full[1], keys.normal(k[1:], (1, 3, 4))[0])
    a, b = keys.split(k, 2)
    assert a.shape == (2, 2) and not np.array_equal(a, b)
    single = jax.random.PRNGKey(3)  # one key keeps jax.random's batch-wide draw
    np.testing.assert_array_equal(keys.normal(single, (2, 3)), jax.random.normal(single, (2, 3)))
