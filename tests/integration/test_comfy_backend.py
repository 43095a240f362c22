"""The ComfyUI training backend against the diffusers backend on the same weights, and its
behaviour on a real ComfyUI MODEL (inference tensors, input model untouched)."""

import pytest
import torch

from pack_import import submodule


@pytest.fixture(scope="module")
def pack(comfy):
    return {name: submodule(mod) for name, mod in {
        "backend": "nodes.comfy_backend", "dbackend": "training.diffusers_backend", "pairs": "training.pairs",
        "layouts": "training.layouts", "tokens": "training.tokens", "trainer": "training.trainer"}.items()}


def loaded(comfy, family, seed=0):
    """A tiny model built the way a loader node builds it: under inference mode."""
    with torch.inference_mode():
        return comfy.tiny_sd15(seed=seed) if family == "sd15" else comfy.tiny_sd3(seed=seed)


def twin(comfy, model, family):
    return comfy.diffusers_unet(model) if family == "sd15" else comfy.diffusers_sd3(model)


def layout(pack, family, method="softrepa"):
    L = pack["layouts"]
    if family == "sd15":
        return L.TokenLayout(arch="sd15", method=method, n_tokens=4, width=768, text_width=768,
                             blocks=("down", "mid"))
    return L.TokenLayout(arch="sd3", method=method, n_tokens=4, width=128, text_width=128, blocks=(0, 1))


def data(family, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family == "sd15":
        return torch.randn(n, 4, 8, 8, generator=g), {"context": torch.randn(n, 77, 768, generator=g)}
    return (torch.randn(n, 16, 8, 8, generator=g),
            {"context": torch.randn(n, 20, 4096, generator=g), "pooled": torch.randn(n, 2048, generator=g)})


def backends(comfy, pack, family, method="softrepa", **kw):
    model = loaded(comfy, family)
    lay = layout(pack, family, method)
    tok = pack["tokens"].SoftTokens(lay, generator=torch.Generator().manual_seed(1))
    cb = pack["backend"].ComfyBackend(model, tok, **kw)
    db = pack["dbackend"].DiffusersBackend(twin(comfy, model, family))
    return model, lay, tok, cb, db


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_pair_errors_match_diffusers(comfy, pack, family):
    model, lay, tok, cb, db = backends(comfy, pack, family)
    x0, cond = data(family, n=4)
    noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(5))
    with cb.session():
        for t in (0, 251, 500, 999):
            for tokens in (None, tok):
                Ec = pack["pairs"].pair_errors(cb, x0, cond, t, noise, tokens)
                Ed = pack["pairs"].pair_errors(db, x0, cond, t, noise, tokens)
                assert rel(Ec, Ed) <= 1e-4, (t, tokens is None, Ec, Ed)
        # the tokens act, the same way in both backends
        Ec = pack["pairs"].pair_errors(cb, x0, cond, 500, noise, tok)
        Eb = pack["pairs"].pair_errors(cb, x0, cond, 500, noise, None)
        assert (Ec - Eb).abs().max() > 1e-5


@pytest.mark.parametrize("family, method", [("sd15", "softrepa"), ("sd3", "softrepa"), ("sd15", "agsm")])
def test_five_training_steps_match_diffusers(comfy, pack, family, method, tmp_path):
    T = pack["trainer"]
    model, lay, tok, cb, db = backends(comfy, pack, family, method)
    x0, cond = data(family, n=8)
    # tau 1: with the official 0.07 the tiny random models' errors (~3) saturate exp(-E/tau) to 0.
    cfg = T.TrainConfig(method=method, steps=5, batch=4, seed=3, chunk=8, lr=0.01, tau=1.0, val_every=5,
                        ckpt_every=0)
    with cb.session():
        rc = T.train(cb, lay, T.TensorData(x0, cond, 4, seed=3), cfg, tmp_path / "c.safetensors", progress=False)
    rd = T.train(db, lay, T.TensorData(x0, cond, 4, seed=3), cfg, tmp_path / "d.safetensors", progress=False)
    assert rc.stopped == rd.stopped == "done"
    init = T.make_tokens(lay, torch.Generator().manual_seed(3))
    assert rel(rd.tokens.static, init.static) > 1e-3  # training moved the tokens
    assert rel(rc.tokens.static.detach(), rd.tokens.static.detach()) <= 1e-4
    assert rel(rc.tokens.time.detach(), rd.tokens.time.detach()) <= 1e-4
    lc = [s["loss"] for s in rc.history["steps"]]
    ld = [s["loss"] for s in rd.history["steps"]]
    assert lc == pytest.approx(ld, rel=1e-4)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_gradient_checkpointing_gives_the_same_gradient(comfy, pack, family):
    obj = submodule("training.objectives")
    grads = []
    for ckpt in (False, True):
        model, lay, tok, cb, db = backends(comfy, pack, family, gradient_checkpointing=ckpt)
        x0, cond = data(family, n=4)
        noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(5))
        with cb.session():
            obj.softrepa_step(cb, tok, x0, cond, 400, noise, chunk=4)
        grads.append(tok.static.grad.clone())
    assert rel(grads[1], grads[0]) <= 1e-5


def test_v_prediction_target_and_native_output(comfy, pack):
    """A v-prediction model: the backend's prediction equals v computed from the model's own denoised output."""
    import comfy.model_sampling as ms

    model = loaded(comfy, "sd15")
    m = model.clone()

    class VSampling(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
        pass

    m.add_object_patch("model_sampling", VSampling(model.model.model_config))
    lay = layout(pack, "sd15")
    cb = pack["backend"].ComfyBackend(m, pack["tokens"].SoftTokens(lay))
    assert cb.prediction == "v"
    x0, cond = data("sd15", n=2)
    noise = torch.randn_like(x0)
    t = torch.tensor([300, 300])
    with cb.session():
        z = cb.noisy(x0, noise, t)
        v = cb.predict(z, t, cond)
        u = cb.target(x0, noise, t)
    s = cb.sigma(t).view(-1, 1, 1, 1)
    # Reconstructing x0 from (z, v) with the VP relation gives the model's own denoised output.
    alpha, sig = 1 / (1 + s * s).sqrt(), s / (1 + s * s).sqrt()
    comfy_mm = __import__("comfy.model_management").model_management
    comfy_mm.load_models_gpu([m])
    to = {"sigmas": s.flatten(), "cond_or_uncond": [0]}
    ref = m.model.apply_model(z, s.flatten(), c_crossattn=cond["context"], transformer_options=to)
    assert rel(alpha * (z * alpha) - sig * v, ref) <= 1e-4
    # the target is v of the true x0
    assert rel(alpha * (z * alpha) - sig * u, x0) <= 1e-5


def test_input_model_is_unchanged_and_loader_weights_stay_inference(comfy, pack, tmp_path):
    T = pack["trainer"]
    model = loaded(comfy, "sd15")
    pos, neg = data("sd15", n=2)[1]["context"][:1], data("sd15", n=2, seed=9)[1]["context"][:1]
    before = comfy.sample(model, pos, neg, steps=2)
    lay = layout(pack, "sd15")
    cb = pack["backend"].ComfyBackend(model, pack["tokens"].SoftTokens(lay), gradient_checkpointing=True)
    x0, cond = data("sd15", n=4)
    with cb.session():
        T.train(cb, lay, T.TensorData(x0, cond, 2), T.TrainConfig(steps=2, batch=2, ckpt_every=0),
                tmp_path / "x.safetensors", progress=False)
    after = comfy.sample(model, pos, neg, steps=2)
    assert torch.equal(before, after)
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())
    assert not any("forward" in vars(b) for b in model.model.diffusion_model.input_blocks)


def test_refuses_models_that_already_carry_tokens(comfy, pack):
    model = loaded(comfy, "sd15")
    lay = layout(pack, "sd15")
    patched = submodule("nodes.patch").apply_soft_tokens(model, pack["tokens"].SoftTokens(lay))
    with pytest.raises(ValueError, match="already carries soft tokens"):
        pack["backend"].ComfyBackend(patched, pack["tokens"].SoftTokens(lay))


def test_sdxl_class_model_uses_pooled_and_size_conditioning_and_trains(comfy, pack, tmp_path):
    T = pack["trainer"]
    with torch.inference_mode():
        model = comfy.tiny_sdxl(seed=0)
    assert pack["backend"].model_arch(model) == "sdxl"
    lay = pack["layouts"].TokenLayout(arch="sdxl", method="softrepa", n_tokens=4, width=2048, text_width=2048,
                                      blocks=("down", "mid"), time_buckets=0)
    tok = pack["tokens"].SoftTokens(lay, generator=torch.Generator().manual_seed(1))
    cb = pack["backend"].ComfyBackend(model, tok)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    cond = {"context": torch.randn(4, 77, 2048, generator=g), "pooled": torch.randn(4, 1280, generator=g)}
    t = torch.tensor([500] * 4)
    with cb.session():
        z = cb.noisy(x0, torch.randn(x0.shape, generator=g), t)
        base = cb.predict(z, t, cond)
        other_pooled = cb.predict(z, t, dict(cond, pooled=torch.zeros(4, 1280)))
        assert (base - other_pooled).abs().max() > 1e-4  # the ADM input carries the pooled text
        assert (cb.predict(z, t, cond, tok) - base).abs().max() > 1e-5
        with pytest.raises(ValueError, match="pooled"):
            cb.predict(z, t, {"context": cond["context"]})
        cfg = T.TrainConfig(steps=3, batch=2, lr=0.01, tau=1.0, ckpt_every=0)
        res = T.train(cb, lay, T.TensorData(x0, cond, 2), cfg, tmp_path / "xl.safetensors", progress=False)
    assert res.stopped == "done" and torch.isfinite(res.tokens.static).all()


def test_compute_dtype_decides_loss_scaling(comfy, pack):
    model = loaded(comfy, "sd15")
    tok = pack["tokens"].SoftTokens(layout(pack, "sd15"))
    assert pack["backend"].ComfyBackend(model, tok).compute_dtype == torch.float32
    bf16 = pack["backend"].ComfyBackend(model, tok, autocast_dtype=torch.bfloat16)
    assert bf16.compute_dtype == torch.bfloat16
    assert not pack["trainer"]._computes_in_fp16(bf16)
    assert pack["trainer"]._computes_in_fp16(pack["backend"].ComfyBackend(model, tok, autocast_dtype=torch.float16))


def test_training_attention_is_sdpa_on_the_clone_only(comfy, pack):
    model = loaded(comfy, "sd15")
    tok = pack["tokens"].SoftTokens(layout(pack, "sd15"))
    cb = pack["backend"].ComfyBackend(model, tok)
    to = cb.patcher.model_options["transformer_options"]
    assert to["optimized_attention_override"] is pack["backend"]._sdpa_attention
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    other = model.clone()
    mine = lambda func, *a, **k: func(*a, **k)  # noqa: E731  (another pack's override)
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = mine
    cb2 = pack["backend"].ComfyBackend(other, tok)
    assert cb2.patcher.model_options["transformer_options"]["optimized_attention_override"] is mine
