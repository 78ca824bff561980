"""The PyTorch peers' side of each benchmark: imagen-pytorch (U-Net training and sampling), Hugging
Face transformers (T5 encoder) and pytorch-fid (Inception). Each job runs in its own process (see
run.py), takes a spec dict and returns a JSON-able dict. Never imports jax."""
import gc
import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import torch

from benchmarks import cases
from benchmarks.timing import is_oom, measure, short_error


def log(*a, **k):
    k.setdefault("flush", True)
    print(*a, **k)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(x=None):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


def _autocast(dev):
    """bf16 autocast on the GPU; on a CPU (the --quick smoke test) plain float32, since CPU bf16
    autocast is orders of magnitude slower and proves nothing about the GPU path."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def _setup():
    torch.backends.cudnn.benchmark = True           # the peer's best convolution algorithms
    torch.backends.cuda.matmul.allow_tf32 = True    # float32 matmuls outside autocast (none hot here)


# --------------------------------------------------------------------------- imagen-pytorch


def load_imagen_pytorch():
    """imagen_pytorch.imagen_pytorch and .elucidated_imagen, without the package __init__.

    The package __init__ pulls in its trainer and data modules (accelerate, datasets,
    pytorch-warmup, pydantic), none of which the models need, and every model module looks up
    the default T5's width on the Hugging Face hub at import time (a default argument value),
    which fails offline. So: a bare package object stands in for the __init__, and the default
    T5's config (t5-v1_1-base: d_model 768) is placed in imagen-pytorch's config cache first. All
    benchmarks pass text_embed_dim explicitly, so that default is never used.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if "imagen_pytorch" not in sys.modules:
        spec = importlib.util.find_spec("imagen_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("imagen_pytorch is not installed; install the wheels in .whl (benchmarks/README.md)")
        pkg = types.ModuleType("imagen_pytorch")
        pkg.__spec__ = spec
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        sys.modules["imagen_pytorch"] = pkg
    import transformers

    t5mod = importlib.import_module("imagen_pytorch.t5")
    t5mod.T5_CONFIGS.setdefault(t5mod.DEFAULT_T5_NAME, {"config": transformers.T5Config(d_model=768)})
    ip = importlib.import_module("imagen_pytorch.imagen_pytorch")
    ei = importlib.import_module("imagen_pytorch.elucidated_imagen")
    return ip, ei


def _imagen_version():
    try:
        return importlib.import_module("imagen_pytorch.version").__version__
    except Exception:
        return None


def _build(config, *, timesteps=1000, elucidated_steps=None):
    """imagen-pytorch Imagen (or ElucidatedImagen) around one Unet mirroring `config`; SR stages
    get a NullUnet in front, as imagen-pytorch trains and samples an upsampler on its own."""
    ip, ei = load_imagen_pytorch()
    dev = _device()
    kwargs = cases.peer_unet_kwargs(config)
    size, lowres = cases.image_sizes(config)
    common = dict(image_sizes=(lowres, size) if lowres else (size,), text_embed_dim=kwargs["text_embed_dim"],
                  cond_drop_prob=0.1, dynamic_thresholding_percentile=0.995)
    with torch.device(dev):  # parameters created on the GPU (no float32 copy on the host first)
        unet = ip.Unet(**kwargs)
        unets = (ip.NullUnet(), unet) if lowres else (unet,)
        if elucidated_steps:
            imagen = ei.ElucidatedImagen(unets, num_sample_steps=int(elucidated_steps), **common)
        else:
            imagen = ip.Imagen(unets, timesteps=int(timesteps), **common)
    imagen = imagen.to(dev)
    n_params = sum(p.numel() for p in unet.parameters())
    return imagen, unet, (2 if lowres else 1), kwargs, n_params


def _to_nchw01(x):
    """NHWC [-1, 1] NumPy -> NCHW [0, 1] on the device (imagen-pytorch normalises internally)."""
    return (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(_device()) + 1.0) * 0.5


def _optimizer(name, params):
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-4)
    return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, fused=torch.cuda.is_available())


def train(spec):
    """Forward + backward + global-norm clipping + optimizer step + EMA update through
    imagen(images, text_embeds, text_masks, unet_number) under bf16 autocast, at spec['batches'][0]
    or the first smaller batch that fits."""
    _setup()
    dev = _device()
    config = cases.spec_config(spec)
    imagen, unet, unet_number, kwargs, n_params = _build(config)
    imagen.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt_name = config.optimizer.name
    opt = _optimizer(opt_name, params)
    ema = [p.detach().clone() for p in params]
    decay = float(config.optimizer.ema_decay)
    size, lowres = cases.image_sizes(config)
    tried = []
    batches = list(spec["batches"])
    log(f"  peer train imagen-pytorch Unet({kwargs}) {n_params / 1e6:.1f}M params, {opt_name}, "
        f"{'bf16 autocast' if dev.type == 'cuda' else 'float32 (CPU)'}")
    for i, b in enumerate(batches):
        b = int(b)
        try:
            host = cases.random_inputs(b, size, 0, int(spec["text_len"]), kwargs["text_embed_dim"], seed=1)
            images = _to_nchw01(host["image"])
            text = torch.from_numpy(host["text"]).to(dev)
            mask = torch.from_numpy(host["text_mask"]).to(dev)
            state = {}

            def step():
                with _autocast(dev):
                    loss = imagen(images, text_embeds=text, text_masks=mask, unet_number=unet_number)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    torch._foreach_lerp_(ema, params, 1.0 - decay)
                state["loss"] = loss.detach()
                return loss

            log(f"  peer train batch {b}")
            t = measure(step, _sync, warmup=int(spec["warmup"]), iters=int(spec["iters"]),
                        budget_s=float(spec["budget_s"]) * 0.7, log=log, pipelined=int(spec.get("pipelined", 0)))
            mem = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
            return {"batch": b, "params": int(n_params), "timing": t, "images_per_s": b / t["median_s"],
                    "images_per_s_pipelined": b / t["pipelined_median_s"] if "pipelined_median_s" in t else None,
                    "loss": float(state["loss"]), "optimizer": opt_name, "unet_kwargs": _jsonable(kwargs),
                    "max_memory_bytes": mem, "tried": tried, "imagen_pytorch": _imagen_version(),
                    "settings": (f"{'bf16 autocast' if dev.type == 'cuda' else 'float32'}, no remat, "
                                 f"{opt_name} (torch.optim{', fused' if opt_name == 'adam' and dev.type == 'cuda' else ''}), "
                                 f"clip 1.0, EMA {decay}")}
        except Exception as e:
            if not is_oom(e) or i == len(batches) - 1:
                raise
            log(f"    batch {b} does not fit: {short_error(e, 160)}")
            tried.append({"batch": b, "error": short_error(e, 160)})
        # Outside the except block: the traceback no longer pins the activations.
        opt.zero_grad(set_to_none=True)
        images = text = mask = state = step = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    raise RuntimeError("no batch given")


def sample(spec):
    """Imagen.sample (DDPM, `steps` timesteps) or ElucidatedImagen.sample (`steps` Karras/Heun
    steps; imagen-pytorch has no DDIM) with classifier-free guidance and dynamic thresholding."""
    _setup()
    dev = _device()
    config = cases.spec_config(spec)
    steps = int(spec["steps"])
    elucidated = spec["sampler"] != "ddpm"
    imagen, unet, unet_number, kwargs, n_params = _build(
        config, timesteps=steps, elucidated_steps=steps if elucidated else None)
    imagen.eval()
    b = int(spec["batch"])
    size, lowres = cases.image_sizes(config)
    host = cases.random_inputs(b, size, lowres, int(spec["text_len"]), kwargs["text_embed_dim"], seed=3)
    call = dict(text_embeds=torch.from_numpy(host["text"]).to(dev),
                text_masks=torch.from_numpy(host["text_mask"]).to(dev),
                cond_scale=float(spec["guidance"]), cfg_remove_parallel_component=False, use_tqdm=False,
                use_one_unet_in_gpu=False)  # True would move every U-Net to the host and back per call
    if lowres:
        call.update(start_at_unet_number=2, start_image_or_video=_to_nchw01(host["lowres"]))
    kind = "ElucidatedImagen (Karras/Heun)" if elucidated else "Imagen DDPM"
    log(f"  peer sample {kind} {steps} steps, batch {b}, cond_scale {spec['guidance']}, dynamic thresholding, "
        f"{n_params / 1e6:.1f}M params")
    out = {}

    def step():
        with torch.no_grad(), _autocast(dev):
            out["images"] = imagen.sample(**call)
        return out["images"]

    t = measure(step, _sync, warmup=1, iters=int(spec["iters"]), budget_s=float(spec["budget_s"]) * 0.7, log=log)
    imgs = out["images"].float()
    # imagen-pytorch runs the conditional and the null-text pass as two forward calls per step.
    evals = 2 * (2 * steps - 1) if elucidated else 2 * steps
    return {"batch": b, "params": int(n_params), "timing": t, "images_per_s": b / t["median_s"], "steps": steps,
            "sampler": kind, "network_evals": evals, "finite": bool(torch.isfinite(imgs).all()),
            "image_shape": list(imgs.shape), "imagen_pytorch": _imagen_version()}


def _jsonable(d):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# --------------------------------------------------------------------------- T5 (transformers)


def t5(spec):
    """Hugging Face T5EncoderModel with the same shapes, random weights, bf16: tokens/s."""
    _setup()
    import transformers
    from transformers import T5Config, T5EncoderModel

    dev = _device()
    d = spec["dims"]
    cfg = T5Config(d_model=d["d_model"], d_ff=d["d_ff"], num_layers=d["num_layers"], num_heads=d["num_heads"],
                   d_kv=d["d_kv"], feed_forward_proj="gated-gelu", vocab_size=d["vocab_size"], dropout_rate=0.0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no float32 copy anywhere
    try:
        with torch.device(dev):
            model = T5EncoderModel(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(dev).eval()
    n_params = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    attn = getattr(model.config, "_attn_implementation", None)
    b, L = int(spec["batch"]), int(spec["length"])
    ids = torch.randint(1, d["vocab_size"], (b, L), device=dev)
    mask = torch.ones((b, L), dtype=torch.long, device=dev)
    log(f"  peer T5EncoderModel ({n_params / 1e9:.2f}B params, {dtypes}, attention {attn}), batch {b} x {L}")

    def step():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    t = measure(step, _sync, warmup=2, iters=int(spec["iters"]), budget_s=float(spec["budget_s"]) * 0.7, log=log)
    return {"batch": b, "length": L, "params": int(n_params), "param_dtypes": dtypes, "attn_implementation": attn,
            "timing": t, "tokens_per_s": b * L / t["median_s"], "transformers": transformers.__version__}


# --------------------------------------------------------------------------- FID Inception (pytorch-fid)


def random_fid_state_dict(seed=0):
    """pytorch-fid's FID Inception3 with random weights, built without downloading: the weight
    loaders are replaced by no-ops while the network is built, then BatchNorm gets random affine
    parameters and running statistics from one train-mode pass, so the features are not degenerate
    (the same recipe as tests/test_inception.py)."""
    import pytorch_fid.inception as pfi
    import torchvision

    torch.manual_seed(seed)
    cls = torchvision.models.inception.Inception3
    orig_url, orig_load = pfi.load_state_dict_from_url, cls.load_state_dict
    pfi.load_state_dict_from_url = lambda *a, **k: {}
    cls.load_state_dict = lambda self, *a, **k: None
    try:
        net = pfi.fid_inception_v3()
    finally:
        pfi.load_state_dict_from_url, cls.load_state_dict = orig_url, orig_load
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0.0, 0.2, generator=g)
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 299, 299, generator=g) * 2 - 1)
    return {k: v.detach().cpu() for k, v in net.eval().state_dict().items()}


def fid(spec):
    """pytorch-fid InceptionV3([pool3]) features of uint8 images (its get_activations path: /255,
    NCHW, model(batch)[0], to host): images/s. Writes the random weights for our side."""
    import pytorch_fid
    import pytorch_fid.inception as pfi

    _setup()
    dev = _device()
    state = random_fid_state_dict(0)
    if spec.get("weights_npz"):
        np.savez(spec["weights_npz"], **{k: v.numpy() for k, v in state.items()})
    orig = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: state
    try:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True)
    finally:
        pfi.load_state_dict_from_url = orig
    model = model.to(dev).eval()
    images = cases.random_images(int(spec["n_images"]), int(spec["size"]), seed=5)
    bs = int(spec["batch_size"])

    def feats(imgs):
        outs = []
        for s in range(0, imgs.shape[0], bs):
            x = torch.from_numpy(imgs[s:s + bs]).to(dev).permute(0, 3, 1, 2).float() / 255.0
            with torch.no_grad():
                f = model(x)[0]
            outs.append(f[:, :, 0, 0].cpu().numpy())  # .cpu() waits for the device
        return np.concatenate(outs)

    log(f"  peer pytorch-fid features float32: {images.shape[0]} images {images.shape[1]}px, batch {bs}")
    t = measure(lambda: feats(images), lambda x: x, warmup=1, iters=int(spec["iters"]),
                budget_s=float(spec["budget_s"]) * 0.6, log=log)
    if spec.get("feats_out"):
        np.save(spec["feats_out"], feats(images[:8]))
    return {"n_images": images.shape[0], "size": images.shape[1], "batch_size": bs, "timing": t,
            "images_per_s": images.shape[0] / t["median_s"], "pytorch_fid": getattr(pytorch_fid, "__version__", None),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}


# --------------------------------------------------------------------------- device


def info(spec):
    out = {"torch_version": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["device_name"] = torch.cuda.get_device_name(0)
        out["device_count"] = torch.cuda.device_count()
        n = int(spec.get("matmul_n", 8192))
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        t = measure(lambda: a @ b, _sync, warmup=3, iters=20, budget_s=20, min_iters=3, log=log)
        out["matmul_tflops_bf16"] = 2.0 * n ** 3 / t["median_s"] / 1e12
    try:
        load_imagen_pytorch()
        out["imagen_pytorch"] = _imagen_version()
    except Exception as e:
        out["imagen_pytorch_error"] = short_error(e)
    for name in ("transformers", "pytorch_fid"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:
            out[f"{name}_error"] = short_error(e)
    return out
