"""Flux.1 (dev, schnell) soft tokens on real ComfyUI models: agreement with diffusers'
FluxTransformer2DModel on the same weights, strength 0, chaining, refusal on SD3, and training."""

import pytest
import torch

from pack_import import submodule

HIDDEN = 64  # comfy_env.TINY_FLUX's hidden size


@pytest.fixture(scope="module")
def pack(comfy):
    return {name: submodule(mod) for name, mod in {
        "patch": "nodes.patch", "layouts": "training.layouts", "tokens": "training.tokens",
        "hooks": "training.diffusers_hooks", "backend": "nodes.comfy_backend",
        "dbackend": "training.diffusers_backend", "pairs": "training.pairs"}.items()}


def tiny_flux(comfy, seed=0, guidance=True, inference=False):
    """comfy_env's tiny Flux (dev with guidance, else schnell), optionally built under inference mode."""
    with torch.inference_mode(inference):
        return comfy.tiny_flux(seed=seed, guidance=guidance)


def diffusers_flux(comfy, model):
    """diffusers FluxTransformer2DModel with the same weights."""
    return comfy.diffusers_flux(model)


def flux_tokens(pack, width=HIDDEN, blocks=(0, 1), method="softrepa", seed=3, scale=10.0, arch="flux"):
    lay = pack["layouts"].TokenLayout(arch=arch, method=method, n_tokens=4, width=width, text_width=HIDDEN,
                                      blocks=blocks)
    tok = pack["tokens"].SoftTokens(lay, generator=torch.Generator().manual_seed(seed))
    tok.static.data.mul_(scale)
    return tok


def inputs(n=2, n_text=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 16, 8, 8, generator=g), torch.randn(n, n_text, 4096, generator=g),
            torch.randn(n, 768, generator=g))


def comfy_denoised(model, x, ctx, pooled, sigma, guidance=None):
    to = dict(model.model_options.get("transformer_options", {}), sigmas=sigma, cond_or_uncond=[0])
    kw = {} if guidance is None else {"guidance": guidance}
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=ctx, y=pooled, transformer_options=to, **kw)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_comfy_and_diffusers_agree(comfy, pack, guidance):
    model = tiny_flux(comfy, guidance=guidance)
    dit = diffusers_flux(comfy, model)
    db = pack["dbackend"].DiffusersBackend(dit)
    x, ctx, pooled = inputs()
    g = torch.tensor([3.5, 3.5]) if guidance else None
    for width, blocks, method in [(HIDDEN, (0, 1), "softrepa"), (4096, (1, 2), "softrepa"), (HIDDEN, (0, 2), "agsm")]:
        tok = flux_tokens(pack, width, blocks, method)
        patched = pack["patch"].apply_soft_tokens(model, tok)
        for sigma in ([1.0, 0.37], [0.731, 0.05], [0.5, 0.999]):
            sigma = torch.tensor(sigma)
            denoised = comfy_denoised(patched, x, ctx, pooled, sigma, g)
            plain = comfy_denoised(model, x, ctx, pooled, sigma, g)
            cond = {"context": ctx, "pooled": pooled}
            with torch.no_grad():
                v = db.predict(x, sigma * 1000, cond, tok)
                v_plain = db.predict(x, sigma * 1000, cond, None)
            s = sigma[:, None, None, None]
            assert rel(denoised, x - s * v) <= 1e-4, (width, blocks, method, sigma)
            assert rel(plain, x - s * v_plain) <= 1e-4
            assert (denoised - plain).abs().max() > 1e-4  # the tokens act


def test_token_rows_get_text_rotary_entries(comfy, pack):
    """The tokens' rotary rows are the text rows (identity: Flux's text ids are zero); image rows are kept."""
    model = tiny_flux(comfy)
    tok = flux_tokens(pack, blocks=(0,))
    patched = pack["patch"].apply_soft_tokens(model, tok)
    seen = {}
    block = patched.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]

    def spy(args, extra):
        seen["in"] = args["pe"]
        return extra["original_block"](args)

    def original(args):
        seen["out"] = args["pe"]
        return {"img": args["img"], "txt": args["txt"]}

    block.previous = spy
    try:
        x, ctx, pooled = inputs()
        comfy_denoised(patched, x, ctx, pooled, torch.tensor([0.5, 0.5]))
    finally:
        block.previous = None
    # spy saw the extended table (previous replaces run inside our insertion)
    pe = seen["in"]
    assert pe.shape[2] == 4 + 12 + 16
    ident = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(pe[:, :, :16], ident.expand_as(pe[:, :, :16]))  # 4 tokens + 12 text rows
    assert not torch.allclose(pe[:, :, 16:], ident.expand_as(pe[:, :, 16:]))


def test_strength_zero_bit_identical_and_strength_acts(comfy, pack):
    model = tiny_flux(comfy)
    tok = flux_tokens(pack)
    pos, neg = torch.randn(1, 12, 4096), torch.randn(1, 12, 4096)
    pooled = torch.randn(1, 768)
    run = lambda m: comfy.sample(m, pos, neg, pooled, pooled, steps=2, cfg=1.0)  # noqa: E731
    base = run(model)
    apply = pack["patch"].apply_soft_tokens
    assert torch.equal(run(apply(model, tok, strength=0.0)), base)
    one, half = run(apply(model, tok)), run(apply(model, tok, strength=0.5))
    assert (one - base).abs().max() > 1e-4
    assert 0 < (half - base).abs().max() < (one - base).abs().max() + 1e-6
    tiny = run(apply(model, tok, strength=1e-6))
    assert (tiny - base).abs().max() < 1e-3


def test_chains_with_other_double_block_replace(comfy, pack):
    model = tiny_flux(comfy).clone()
    seen = []

    def other(args, extra):
        seen.append((args["txt"].shape[1], args["pe"].shape[2]))
        return extra["original_block"](args)

    model.set_model_patch_replace(other, "dit", "double_block", 0)
    tok = flux_tokens(pack)
    patched = pack["patch"].apply_soft_tokens(model, tok)
    x, ctx, pooled = inputs()
    sigma = torch.tensor([0.6, 0.6])
    out = comfy_denoised(patched, x, ctx, pooled, sigma)
    assert torch.isfinite(out).all()
    assert seen and all(s == (16, 32) for s in seen)  # 12 + 4 text tokens, pe rows for all of them
    assert (out - comfy_denoised(model, x, ctx, pooled, sigma)).abs().max() > 1e-4


def test_flux_and_sd3_tokens_do_not_mix(comfy, pack):
    sd3 = comfy.tiny_sd3(seed=0, depth=1)  # hidden 64, like the tiny Flux
    with pytest.raises(ValueError, match=r"(?s)Flux\.1.*SD3"):
        pack["patch"].apply_soft_tokens(sd3, flux_tokens(pack), name="token file 'flux.safetensors'")
    with pytest.raises(ValueError, match=r"(?s)SD3.*Flux\.1"):
        pack["patch"].apply_soft_tokens(tiny_flux(comfy), flux_tokens(pack, arch="sd3"))
    dit = diffusers_flux(comfy, tiny_flux(comfy))
    with pytest.raises(ValueError, match="Flux"):
        pack["hooks"].TokenInjector(dit, flux_tokens(pack, arch="sd3"))


def test_comfy_backend_matches_diffusers_and_trains(comfy, pack):
    model = tiny_flux(comfy, inference=True)
    tok = flux_tokens(pack, scale=1.0)
    cb = pack["backend"].ComfyBackend(model, tok)
    db = pack["dbackend"].DiffusersBackend(diffusers_flux(comfy, model))
    assert pack["backend"].model_arch(model) == "flux"
    x0, ctx, pooled = inputs(n=3)
    cond = {"context": ctx, "pooled": pooled}
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    with cb.session():
        for t in (0, 251, 999):
            for tokens in (None, tok):
                Ec = pack["pairs"].pair_errors(cb, x0, cond, t, noise, tokens)
                Ed = pack["pairs"].pair_errors(db, x0, cond, t, noise, tokens)
                assert rel(Ec, Ed) <= 1e-4, (t, tokens is None)


def test_comfy_backend_softrepa_steps_lower_the_loss_with_checkpointing(comfy, pack):
    objectives = submodule("training.objectives")
    model = tiny_flux(comfy, inference=True)
    x0, ctx, pooled = inputs(n=3)
    cond = {"context": ctx, "pooled": pooled}
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    grads = []
    for ckpt in (False, True):
        tok = flux_tokens(pack, scale=1.0)
        cb = pack["backend"].ComfyBackend(model, tok, gradient_checkpointing=ckpt)
        opt = torch.optim.AdamW(tok.parameters(), lr=0.05, weight_decay=0.0)
        losses = []
        with cb.session():
            for step in range(5):
                opt.zero_grad()
                # tau 1: a random tiny model has errors ~1, where tau 0.07 saturates exp(-E/tau)
                losses.append(objectives.softrepa_step(cb, tok, x0, cond, 500, noise, tau=1.0)["loss"])
                if step == 0:
                    grads.append(tok.static.grad.clone())
                opt.step()
        assert losses[-1] < losses[0] - 1e-3, (ckpt, losses)
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()


def test_attention_mask_gets_token_rows_and_cond_only(comfy, pack):
    model = tiny_flux(comfy)
    tok = flux_tokens(pack)
    x, ctx, pooled = inputs()
    sigma = torch.tensor([0.6, 0.6])
    n = 12 + 16  # text + image tokens

    def run(m, mask=None, **to):
        t = dict(m.model_options.get("transformer_options", {}), sigmas=sigma, cond_or_uncond=[0])
        t.update(to)
        kw = {} if mask is None else {"attention_mask": mask}
        with torch.no_grad():
            return m.model.apply_model(x, sigma, c_crossattn=ctx, y=pooled, transformer_options=t, **kw)

    apply = pack["patch"].apply_soft_tokens
    patched = apply(model, tok)
    # an all-zero additive mask over (text, image) is extended for the tokens and changes nothing
    assert torch.allclose(run(patched, torch.zeros(2, 1, n, n)), run(patched), atol=1e-6)
    block = torch.zeros(2, 1, n, n)
    block[..., 3] = -float("inf")  # hide text token 3 from every query
    assert (run(patched, block) - run(patched)).abs().max() > 1e-5
    # cond only: the rows of an uncond chunk are exactly the unpatched model's
    cond_only = apply(model, tok, apply_to="cond_only")
    out = run(cond_only, cond_or_uncond=[0, 1])
    base = run(model, cond_or_uncond=[0, 1])
    assert torch.allclose(out[1], base[1], atol=1e-5) and (out[0] - base[0]).abs().max() > 1e-4
