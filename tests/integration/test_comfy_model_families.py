"""SD2.x (v-prediction), SD3.5 (MMDiT-X dual attention, qk-norm) and SDXL v-prediction models in
ComfyUI (issue 14): detection, ComfyUI against diffusers on the same weights, training, strength 0
and refusals of another family's tokens."""

import copy
import importlib

import pytest
import torch

from pack_import import submodule

FAMILIES = ("sd2", "sd35")


@pytest.fixture(scope="module")
def pack(comfy):
    return {name: submodule(mod) for name, mod in {
        "backend": "nodes.comfy_backend", "dbackend": "training.diffusers_backend", "pairs": "training.pairs",
        "layouts": "training.layouts", "tokens": "training.tokens", "trainer": "training.trainer",
        "patch": "nodes.patch", "obj": "training.objectives"}.items()}


def loaded(comfy, family, seed=0):
    """A tiny model built the way a loader node builds it: under inference mode."""
    with torch.inference_mode():
        if family == "sd2":
            return comfy.tiny_sd2(seed=seed)  # 768-v: V_PREDICTION, context 1024
        # SD3.5 Medium-class: dual attention in the first blocks, qk-norm everywhere
        return comfy.tiny_sd3(seed=seed, num_blocks=3, qk_norm="rms", x_block_self_attn_layers=(0, 1))


def twin(pack, comfy, model, family):
    if family == "sd2":
        return pack["dbackend"].DiffusersBackend(comfy.diffusers_unet(model), prediction="v")
    return pack["dbackend"].DiffusersBackend(comfy.diffusers_sd3(model))


def layout(pack, family, method="softrepa", blocks=None):
    L = pack["layouts"]
    if family == "sd2":
        return L.TokenLayout(arch="sd2", method=method, n_tokens=4, width=1024, text_width=1024,
                             blocks=blocks or ("down", "mid"))
    return L.TokenLayout(arch="sd35", method=method, n_tokens=4, width=128, text_width=128, blocks=blocks or (0, 1, 2))


def data(family, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family == "sd2":
        return torch.randn(n, 4, 8, 8, generator=g), {"context": torch.randn(n, 77, 1024, generator=g)}
    return (torch.randn(n, 16, 8, 8, generator=g),
            {"context": torch.randn(n, 20, 4096, generator=g), "pooled": torch.randn(n, 2048, generator=g)})


def backends(comfy, pack, family, method="softrepa"):
    model = loaded(comfy, family)
    lay = layout(pack, family, method)
    tok = pack["tokens"].SoftTokens(lay, generator=torch.Generator().manual_seed(1))
    return model, lay, tok, pack["backend"].ComfyBackend(model, tok), twin(pack, comfy, model, family)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_detection_and_prediction(comfy, pack):
    B = pack["backend"]
    sd2 = loaded(comfy, "sd2")
    assert B.model_arch(sd2) == "sd2" and B.prediction_of(sd2.get_model_object("model_sampling")) == "v"
    sd35 = loaded(comfy, "sd35")
    assert B.model_arch(sd35) == "sd35" and pack["patch"].model_facts(sd35)["arch"] == "sd35"
    assert B.model_arch(comfy.tiny_sd3(seed=0)) == "sd3"
    assert sd35.model.diffusion_model.joint_blocks[0].x_block.x_block_self_attn  # MMDiT-X dual attention
    assert not sd35.model.diffusion_model.joint_blocks[2].x_block.x_block_self_attn
    xl = comfy.tiny_sdxl(seed=0, v_prediction=True)
    assert B.model_arch(xl) == "sdxl" and B.prediction_of(xl.get_model_object("model_sampling")) == "v"


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_errors_match_diffusers(comfy, pack, family):
    model, lay, tok, cb, db = backends(comfy, pack, family)
    with torch.no_grad():
        for p in tok.parameters():
            p.mul_(10.0)  # tokens that clearly act
    x0, cond = data(family, n=3)
    noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(5))
    with cb.session():
        for t in (0, 251, 500, 999):
            for tokens in (None, tok):
                Ec = pack["pairs"].pair_errors(cb, x0, cond, t, noise, tokens)
                Ed = pack["pairs"].pair_errors(db, x0, cond, t, noise, tokens)
                assert rel(Ec, Ed) <= 1e-4, (t, tokens is None, Ec, Ed)
        Ec = pack["pairs"].pair_errors(cb, x0, cond, 500, noise, tok)
        Eb = pack["pairs"].pair_errors(cb, x0, cond, 500, noise, None)
        assert (Ec - Eb).abs().max() > 1e-5  # the tokens act


# Adam divides by sqrt(v + eps): with the default eps 1e-8, token entries whose AGSM gradient is ~0 turn ~1e-7
# forward differences between the backends into step-sized differences (SD3.5 AGSM read 1.2e-4 after 5 steps
# on one machine and 5.4e-5 on another, while one step's gradient agrees to 4e-7, see
# test_one_step_gradients_match_diffusers). This test compares the engines, not Adam's conditioning: eps 1e-6
# keeps near-zero entries from amplifying rounding (every case then drifts <= 3.5e-6), and the tolerance
# stays 1e-4.
@pytest.mark.parametrize("family, method", [("sd2", "softrepa"), ("sd2", "agsm"), ("sd35", "softrepa"),
                                            ("sd35", "agsm")])
def test_five_training_steps_match_diffusers(comfy, pack, family, method, tmp_path):
    T = pack["trainer"]
    model, lay, tok, cb, db = backends(comfy, pack, family, method)
    x0, cond = data(family, n=8)
    cfg = T.TrainConfig(method=method, steps=5, batch=4, seed=3, chunk=8, lr=0.01, tau=1.0, val_every=5,
                        ckpt_every=0, eps=1e-6)
    with cb.session():
        rc = T.train(cb, lay, T.TensorData(x0, cond, 4, seed=3), cfg, tmp_path / "c.safetensors", progress=False)
    rd = T.train(db, lay, T.TensorData(x0, cond, 4, seed=3), cfg, tmp_path / "d.safetensors", progress=False)
    assert rc.stopped == rd.stopped == "done"
    init = T.make_tokens(lay, torch.Generator().manual_seed(3))
    assert rel(rd.tokens.static, init.static) > 1e-3
    assert rel(rc.tokens.static.detach(), rd.tokens.static.detach()) <= 1e-4
    assert rel(rc.tokens.time.detach(), rd.tokens.time.detach()) <= 1e-4
    assert [s["loss"] for s in rc.history["steps"]] == pytest.approx([s["loss"] for s in rd.history["steps"]],
                                                                     rel=1e-4)


@pytest.mark.parametrize("family, method", [("sd2", "softrepa"), ("sd2", "agsm"), ("sd35", "softrepa"),
                                            ("sd35", "agsm")])
def test_one_step_gradients_match_diffusers(comfy, pack, family, method):
    model, lay, tok, cb, db = backends(comfy, pack, family, method)
    x0, cond = data(family, n=4)
    noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(5))
    ema, tok_d = copy.deepcopy(tok).requires_grad_(False), copy.deepcopy(tok)

    def step(backend, tokens):
        if method == "softrepa":
            return pack["obj"].softrepa_step(backend, tokens, x0, cond, 400, noise, tau=1.0)
        return pack["obj"].agsm_step(backend, tokens, ema, x0, cond, 400, noise)

    with cb.session():
        rc = step(cb, tok)
    rd = step(db, tok_d)
    assert rc["loss"] == pytest.approx(rd["loss"], rel=1e-5)
    assert rel(tok.static.grad, tok_d.static.grad) <= 1e-4
    assert rel(tok.time.grad, tok_d.time.grad) <= 1e-4


def lowers_loss(pack, backend, tok, x0, cond, method, steps=6, lr=0.05):
    """Losses of `steps` Adam steps on one fixed batch, timestep and noise."""
    ema = copy.deepcopy(tok).requires_grad_(False)
    opt = torch.optim.Adam(tok.parameters(), lr=lr)
    noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        if method == "softrepa":
            res = pack["obj"].softrepa_step(backend, tok, x0, cond, 400, noise, tau=1.0)
        else:
            res = pack["obj"].agsm_step(backend, tok, ema, x0, cond, 400, noise)
        losses.append(res["loss"])
        opt.step()
    return losses


@pytest.mark.parametrize("family, method", [("sd2", "softrepa"), ("sd2", "agsm"), ("sd35", "softrepa"),
                                            ("sd35", "agsm")])
def test_a_few_steps_lower_the_loss_in_both_backends(comfy, pack, family, method):
    model, lay, tok, cb, db = backends(comfy, pack, family, method)
    x0, cond = data(family, n=3)
    tok_d = copy.deepcopy(tok)
    with cb.session():
        lc = lowers_loss(pack, cb, tok, x0, cond, method)
    ld = lowers_loss(pack, db, tok_d, x0, cond, method)
    assert lc[-1] < lc[0] and ld[-1] < ld[0], (lc, ld)


def run(comfy, model, pos, neg, pooled=None):
    return comfy.sample(model, pos, neg, positive_pooled=pooled, negative_pooled=pooled, steps=3, cfg=5.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_zero_is_bit_identical_and_one_changes_the_output(comfy, pack, family):
    model = loaded(comfy, family)
    tok = pack["tokens"].SoftTokens(layout(pack, family), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tok.static.mul_(10.0)
    _, cond = data(family, n=2)
    pos, neg = cond["context"][:1], cond["context"][1:]
    pooled = cond["pooled"][:1] if "pooled" in cond else None
    base = run(comfy, model, pos, neg, pooled)
    zero = run(comfy, pack["patch"].apply_soft_tokens(model, tok, strength=0.0), pos, neg, pooled)
    assert torch.equal(zero, base)
    one = run(comfy, pack["patch"].apply_soft_tokens(model, tok), pos, neg, pooled)
    assert torch.isfinite(one).all() and (one - base).abs().max() > 1e-4
    half = run(comfy, pack["patch"].apply_soft_tokens(model, tok, strength=0.5), pos, neg, pooled)
    assert torch.isfinite(half).all()  # the attention bias finds the joint attention next to attn2


def test_tokens_of_another_family_are_refused_naming_both(comfy, pack):
    apply = pack["patch"].apply_soft_tokens
    sd2_tokens = pack["tokens"].SoftTokens(layout(pack, "sd2"))
    with pytest.raises(ValueError, match=r"sd2_tokens.*sd2.*1024.*768 wide \(SD1.5-like\)"):
        apply(comfy.tiny_sd15(seed=0), sd2_tokens, name="sd2_tokens.safetensors")
    with pytest.raises(ValueError, match=r"sd2_tokens.*sd2.*UNET model.*MMDIT model \(SD3.5\)"):
        apply(loaded(comfy, "sd35"), sd2_tokens, name="sd2_tokens.safetensors")
    sd3_tokens = pack["tokens"].SoftTokens(layout(pack, "sd35").replace(arch="sd3"))
    with pytest.raises(ValueError, match="made for SD3, but the loaded model is SD3.5"):
        apply(loaded(comfy, "sd35"), sd3_tokens)
    with pytest.raises(ValueError, match="made for SD3.5, but the loaded model is SD3"):
        apply(comfy.tiny_sd3(seed=0, num_blocks=3), pack["tokens"].SoftTokens(layout(pack, "sd35")))


def test_sdxl_v_prediction_model_trains(comfy, pack, tmp_path):
    """An SDXL derivative with v-prediction (ModelSamplingDiscrete, V_PREDICTION) trains in ComfyUI."""
    T = pack["trainer"]
    with torch.inference_mode():
        model = comfy.tiny_sdxl(seed=0, v_prediction=True)
    ms = importlib.import_module("comfy.model_sampling")
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, ms.ModelSamplingDiscrete) and isinstance(sampling, ms.V_PREDICTION)
    lay = pack["layouts"].TokenLayout(arch="sdxl", method="softrepa", n_tokens=4, width=2048, text_width=2048,
                                      blocks=("down", "mid"), time_buckets=0)
    tok = pack["tokens"].SoftTokens(lay, generator=torch.Generator().manual_seed(1))
    cb = pack["backend"].ComfyBackend(model, tok)
    assert cb.prediction == "v"
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    cond = {"context": torch.randn(4, 77, 2048, generator=g), "pooled": torch.randn(4, 1280, generator=g)}
    with cb.session():
        losses = lowers_loss(pack, cb, copy.deepcopy(tok), x0[:3], {k: v[:3] for k, v in cond.items()}, "softrepa")
        cfg = T.TrainConfig(steps=3, batch=2, lr=0.01, tau=1.0, ckpt_every=0)
        res = T.train(cb, lay, T.TensorData(x0, cond, 2), cfg, tmp_path / "xlv.safetensors", progress=False)
    assert losses[-1] < losses[0], losses
    assert res.stopped == "done" and torch.isfinite(res.tokens.static).all()
