"""Load Soft Tokens on real ComfyUI models: official tokens, strength, apply-to, chaining, and
agreement with the diffusers path."""

import os

import pytest
import torch

from pack_import import submodule

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "reference_tokens", "softrepa")


@pytest.fixture(scope="module")
def pack(comfy):
    return {"patch": submodule("nodes.patch"), "formats": submodule("training.formats"),
            "layouts": submodule("training.layouts"), "tokens": submodule("training.tokens"),
            "hooks": submodule("training.diffusers_hooks")}


def official(pack, arch):
    path = os.path.join(REFERENCE, arch)
    if not os.path.isdir(path):
        pytest.skip(f"official reference tokens not found at {path}")
    return pack["formats"].load_tokens(path)


def contexts(width, n=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, width, generator=g), torch.randn(1, n, width, generator=g)


def run(comfy, model, pos, neg, **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("cfg", 5.0)
    return comfy.sample(model, pos, neg, **kw)


def random_tokens(pack, arch, width, text_width, blocks, method="softrepa", seed=3, scale=1.0):
    lay = pack["layouts"].TokenLayout(arch=arch, method=method, n_tokens=4, width=width,
                                      text_width=text_width, blocks=blocks)
    tok = pack["tokens"].SoftTokens(lay, generator=torch.Generator().manual_seed(seed))
    tok.static.data.mul_(scale)
    return tok


# --- official tokens ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch, width", [("sd1.5", 768), ("sdxl", 2048)])
def test_official_unet_tokens_load_and_change_output(comfy, pack, arch, width):
    model = comfy.tiny_sd15(seed=0, context_dim=width)
    tok = official(pack, arch)
    pos, neg = contexts(width)
    base = run(comfy, model, pos, neg)
    patched = pack["patch"].apply_soft_tokens(model, tok)
    out = run(comfy, patched, pos, neg)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3
    assert torch.equal(run(comfy, model, pos, neg), base)  # the input model is untouched


@pytest.mark.slow
def test_official_sd3_tokens_load_and_change_output(comfy, pack):
    # Official SD3 tokens are 1536 wide: ComfyUI's MMDiT needs depth 24 for that width.
    model = comfy.tiny_sd3(seed=0, depth=24, num_blocks=6)
    tok = official(pack, "sd3")
    pos, neg = contexts(4096, n=12)
    base = run(comfy, model, pos, neg, steps=2)
    out = run(comfy, pack["patch"].apply_soft_tokens(model, tok), pos, neg, steps=2)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3


def test_mismatched_tokens_fail_before_sampling(comfy, pack):
    tok = official(pack, "sdxl")
    with pytest.raises(ValueError, match=r"2048.*768"):
        pack["patch"].apply_soft_tokens(comfy.tiny_sd15(seed=0), tok, name="token file 'sdxl/'")
    with pytest.raises(ValueError, match="UNET model.*MMDIT"):
        pack["patch"].apply_soft_tokens(comfy.tiny_sd3(seed=0), tok)


def test_nan_tokens_are_refused(comfy, pack, sd15):
    tok = random_tokens(pack, "sd15", 768, 768, ("down",))
    tok.static.data[0, 0, 1, 5] = float("nan")
    with pytest.raises(ValueError, match="token file 'bad'.*'static' tensor holds 1 non-finite"):
        pack["patch"].apply_soft_tokens(sd15, tok, name="token file 'bad'")


# --- strength and apply-to ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_tokens(pack):
    return random_tokens(pack, "sd15", 768, 768, ("down", "mid"), scale=40.0)


def test_strength_zero_is_bit_identical(comfy, pack, sd15_tokens):
    model = comfy.tiny_sd15(seed=0)
    pos, neg = contexts(768)
    base = run(comfy, model, pos, neg, batch=2)
    out = run(comfy, pack["patch"].apply_soft_tokens(model, sd15_tokens, strength=0.0), pos, neg, batch=2)
    assert torch.equal(out, base)


def test_strength_is_continuous_and_one_is_official(comfy, pack, sd15_tokens):
    model = comfy.tiny_sd15(seed=0)
    pos, neg = contexts(768)
    apply = pack["patch"].apply_soft_tokens
    base = run(comfy, model, pos, neg)
    full = run(comfy, apply(model, sd15_tokens, strength=1.0), pos, neg)
    half = run(comfy, apply(model, sd15_tokens, strength=0.5), pos, neg)
    tiny = run(comfy, apply(model, sd15_tokens, strength=1e-6), pos, neg)
    near_one = run(comfy, apply(model, sd15_tokens, strength=1.0 - 1e-6), pos, neg)
    d_full = (full - base).abs().max()
    assert d_full > 1e-2
    assert (tiny - base).abs().max() < 1e-4 * d_full  # -> no tokens as strength -> 0
    assert (near_one - full).abs().max() < 1e-4 * d_full  # the bias path agrees with plain insertion at 1
    assert (half - base).abs().max() > 0.05 * d_full and (half - full).abs().max() > 0.05 * d_full


def test_cond_only_differs_from_both_and_spares_uncond(comfy, pack, sd15_tokens):
    model = comfy.tiny_sd15(seed=0)
    pos, neg = contexts(768)
    apply = pack["patch"].apply_soft_tokens
    both, calls = run(comfy, apply(model, sd15_tokens), pos, neg, return_calls=True)
    assert any(len(c["cond_or_uncond"]) == 2 for c in calls)  # batched CFG really happened
    cond_only = run(comfy, apply(model, sd15_tokens, apply_to="cond_only"), pos, neg)
    assert (both - cond_only).abs().max() > 1e-3
    # With cfg 1 only the cond branch runs, so cond_only must equal both there.
    b1 = run(comfy, apply(model, sd15_tokens), pos, neg, cfg=1.0)
    c1 = run(comfy, apply(model, sd15_tokens, apply_to="cond_only"), pos, neg, cfg=1.0)
    assert torch.allclose(b1, c1, atol=1e-5, rtol=0)


def test_cond_only_uncond_rows_match_unpatched_model(comfy, pack, sd15_tokens):
    """The uncond prediction under cond_only equals the plain model's uncond prediction."""
    model = comfy.tiny_sd15(seed=0)
    pos, neg = contexts(768)
    patched = pack["patch"].apply_soft_tokens(model, sd15_tokens, apply_to="cond_only")
    x = torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([3.0, 3.0])
    ctx = torch.cat([pos, neg])

    def denoise(m):
        to = dict(m.model_options.get("transformer_options", {}), sigmas=sigma, cond_or_uncond=[0, 1])
        with torch.no_grad():
            return m.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)

    plain, ours = denoise(model), denoise(patched)
    assert torch.allclose(ours[1], plain[1], atol=1e-5, rtol=0)
    assert (ours[0] - plain[0]).abs().max() > 1e-3


def test_batches_and_several_conds(comfy, pack, sd15_tokens):
    model = comfy.tiny_sd15(seed=0)
    pos, neg = contexts(768)
    pos2 = torch.cat([pos, torch.randn(1, 77, 768)])  # two positive conds in one conditioning list
    patched = pack["patch"].apply_soft_tokens(model, sd15_tokens, strength=0.7, apply_to="cond_only")
    out = run(comfy, patched, pos2, neg, batch=3)
    assert out.shape[0] == 3 and torch.isfinite(out).all()
    single = run(comfy, patched, pos2, neg, batch=1)
    # Rows do not depend on the batch (up to float32 kernel differences between batch sizes).
    assert (out[:1] - single).abs().max() <= 1e-5 * single.abs().max()


# --- composition with other packs ---------------------------------------------------------------

def test_chains_with_other_unet_patches(comfy, pack, sd15_tokens):
    model = comfy.tiny_sd15(seed=0).clone()
    seen = []

    def other_attn2(n, context, value, extra):  # another pack's attn2 patch, installed before ours
        seen.append(("patch", context.shape[1]))
        return n, context, value

    def other_replace(q, k, v, extra):  # an IP-Adapter-style attn2 replace on one block
        seen.append(("replace", k.shape[1]))
        import comfy.ldm.modules.attention as attn
        return attn.optimized_attention(q, k, v, extra["n_heads"])

    model.set_model_attn2_patch(other_attn2)
    model.set_model_attn2_replace(other_replace, "input", 1)
    patched = pack["patch"].apply_soft_tokens(model, sd15_tokens, strength=0.5)
    pos, neg = contexts(768)
    out = run(comfy, patched, pos, neg, steps=1)
    assert torch.isfinite(out).all()
    assert ("patch", 77) in seen
    assert ("replace", 81) in seen  # the replace saw our 77 + 4 tokens
    assert len(patched.model_options["transformer_options"]["patches"]["attn2_patch"]) == 2


def test_chains_with_other_dit_replace(comfy, pack):
    model = comfy.tiny_sd3(seed=0).clone()
    seen = []

    def other(args, extra):
        seen.append(args["txt"].shape[1])
        return extra["original_block"](args)

    model.set_model_patch_replace(other, "dit", "double_block", 0)
    tok = random_tokens(pack, "sd3", 128, 128, (0, 1), scale=10.0)
    patched = pack["patch"].apply_soft_tokens(model, tok)
    pos, neg = contexts(4096, n=12)
    out = run(comfy, patched, pos, neg, steps=1)
    assert torch.isfinite(out).all()
    assert seen and all(n == 16 for n in seen)  # the other replace ran, on 12 + 4 text tokens
    base = run(comfy, model, pos, neg, steps=1)
    assert (out - base).abs().max() > 1e-4


def test_sd3_strength_zero_and_cond_only(comfy, pack):
    model = comfy.tiny_sd3(seed=0)
    tok = random_tokens(pack, "sd3", 128, 128, (0, 1), scale=10.0)
    pos, neg = contexts(4096, n=12)
    apply = pack["patch"].apply_soft_tokens
    base = run(comfy, model, pos, neg, steps=2)
    assert torch.equal(run(comfy, apply(model, tok, strength=0.0), pos, neg, steps=2), base)
    both = run(comfy, apply(model, tok), pos, neg, steps=2)
    cond = run(comfy, apply(model, tok, apply_to="cond_only"), pos, neg, steps=2)
    assert (both - base).abs().max() > 1e-4 and (both - cond).abs().max() > 1e-5


def test_clone_shares_tokens_and_keeps_patch(comfy, pack, sd15_tokens):
    model = comfy.tiny_sd15(seed=0)
    patched = pack["patch"].apply_soft_tokens(model, sd15_tokens)
    again = patched.clone()
    p1 = patched.model_options["transformer_options"]["patches"]["attn2_patch"][0].__self__
    p2 = again.model_options["transformer_options"]["patches"]["attn2_patch"][0].__self__
    assert p1 is p2 and p1.tokens is sd15_tokens
    assert "patches" not in model.model_options.get("transformer_options", {})


# --- ComfyUI vs diffusers ----------------------------------------------------------------------

def test_comfy_and_diffusers_agree_unet(comfy, pack):
    model = comfy.tiny_sd15(seed=0)
    unet = comfy.diffusers_unet(model)
    tok = random_tokens(pack, "sd15", 768, 768, ("down",), scale=30.0)
    patched = pack["patch"].apply_soft_tokens(model, tok)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 768)
    sigma = torch.tensor([5.0, 0.7])
    to = dict(patched.model_options["transformer_options"], sigmas=sigma, cond_or_uncond=[0])
    with torch.no_grad():
        denoised = patched.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)
        t = model.model.model_sampling.timestep(sigma).float()
        inj = pack["hooks"].TokenInjector(unet, tok)
        eps = unet(x / (sigma[:, None, None, None] ** 2 + 1).sqrt(), t, encoder_hidden_states=ctx).sample
        inj.remove()
        plain = model.model.apply_model(x, sigma, c_crossattn=ctx)
    ref = x - sigma[:, None, None, None] * eps
    assert (denoised - ref).abs().max() <= 1e-4
    assert (denoised - plain).abs().max() > 1e-3


def test_comfy_and_diffusers_agree_mmdit(comfy, pack):
    model = comfy.tiny_sd3(seed=0, num_blocks=3)
    dit = comfy.diffusers_sd3(model)
    for width, blocks in [(128, (0, 1)), (4096, (1, 2))]:
        tok = random_tokens(pack, "sd3", width, 128, blocks, scale=10.0)
        patched = pack["patch"].apply_soft_tokens(model, tok)
        x, ctx, pooled = torch.randn(2, 16, 8, 8), torch.randn(2, 12, 4096), torch.randn(2, 2048)
        sigma = torch.tensor([1.0, 0.37])
        to = dict(patched.model_options["transformer_options"], sigmas=sigma, cond_or_uncond=[0])
        with torch.no_grad():
            denoised = patched.model.apply_model(x, sigma, c_crossattn=ctx, y=pooled, transformer_options=to)
            inj = pack["hooks"].TokenInjector(dit, tok)
            v = dit(x, ctx, pooled, sigma * 1000).sample
            inj.remove()
        ref = x - sigma[:, None, None, None] * v
        assert (denoised - ref).abs().max() <= 1e-4, width


def test_timestep_follows_a_model_sampling_node_placed_after(comfy, pack, sd15_tokens):
    """A model-sampling node after Load Soft Tokens (here zero-terminal-SNR sigmas) changes sigma -> t."""
    import comfy.model_sampling as ms

    model = comfy.tiny_sd15(seed=0)
    patched = pack["patch"].apply_soft_tokens(model, sd15_tokens)

    class ZSNR(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    later = patched.clone()
    zsnr = ZSNR(model.model.model_config, zsnr=True)
    later.add_object_patch("model_sampling", zsnr)
    seen = []
    original = sd15_tokens.layer_tokens

    def record(layer, t, *args, **kwargs):
        seen.append(t.clone())
        return original(layer, t, *args, **kwargs)

    sd15_tokens.layer_tokens = record
    try:
        pos, neg = contexts(768)
        _, calls = run(comfy, later, pos, neg, return_calls=True)
    finally:
        del sd15_tokens.layer_tokens
    want = [zsnr.timestep(c["sigma"]).float() for c in calls]
    assert len(seen) == len(calls)
    for t, w in zip(seen, want):
        assert torch.equal(t, w.expand_as(t))
    old = model.get_model_object("model_sampling")
    assert any(not torch.equal(old.timestep(c["sigma"]).float(), w) for c, w in zip(calls, want))
