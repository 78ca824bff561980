"""The Python pipeline: cached stages, text encoder and compiled samplers; the same images as the
sample CLI's library form."""
import numpy as np
import pytest
from PIL import Image

import imagen_jax
from imagen_jax import cascade, sampling
from stage_utils import CompileCounter


@pytest.fixture(scope="module")
def counter():
    return CompileCounter()


@pytest.fixture(scope="module")
def stage_dirs(tiny_base):
    # One stage keeps it short: the cascade of several stages is test_sample's (through this pipeline).
    return [tiny_base]


PROMPTS = ["a red circle", "a large blue square on the left"]


def test_second_call_does_not_recompile(stage_dirs, counter, tmp_path):
    pipe = imagen_jax.Pipeline.load(stage_dirs)
    kw = dict(num_images=2, seed=3, steps=(3,), guidance=(3.0,), sampler="ddim")
    with counter as first:
        a = pipe(PROMPTS, **kw)
    assert first.count > 0  # the counter sees compilations at all
    assert a.shape == (4, 16, 16, 3) and a.dtype == np.uint8 and a.std() > 1.0
    with counter as second:
        b = pipe(PROMPTS, **kw)
    assert second.count == 0, f"the second call compiled {second.count} programs"
    np.testing.assert_array_equal(a, b)
    # Guidance is traced: a sweep reuses the programs, and the images change.
    with counter as sweep:
        c = pipe(PROMPTS, **dict(kw, guidance=5.0))
    assert sweep.count == 0 and not np.array_equal(a, c)
    both = pipe(PROMPTS, **kw, return_all=True)
    assert [x.shape for x in both] == [(4, 16, 16, 3)]
    np.testing.assert_array_equal(both[-1], a)
    pil = pipe.to_pil(a)
    assert len(pil) == 4 and pil[3].size == (16, 16) and np.array_equal(np.asarray(pil[3]), a[3])
    # The sample CLI's library form is this pipeline plus files: the same images, and (given the
    # loaded pipeline) no compilation either.
    with counter as files:
        g = sampling.generate(None, PROMPTS, str(tmp_path / "o"), steps="3", guidance="3", sampler="ddim",
                              num_images=2, seed=3, log=lambda *a: None, pipeline=pipe)
    assert files.count == 0
    np.testing.assert_array_equal(g, a)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "images" / "0001_01.png")), a[3])


def test_bad_requests(stage_dirs):
    with pytest.raises(cascade.CascadeError, match="no stage directories"):
        imagen_jax.Pipeline.load([])
    pipe = imagen_jax.Pipeline.load(stage_dirs)
    with pytest.raises(cascade.CascadeError, match="prompts"):
        pipe([])
    with pytest.raises(cascade.CascadeError, match="num_images"):
        pipe("a red circle", num_images=0)
    with pytest.raises(ValueError, match="--steps has 3 values"):
        pipe("a red circle", steps=(2, 2, 2))
    assert pipe._cond is None  # refused before the text encoder was loaded
