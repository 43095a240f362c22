"""Step-selected refinement (nodes/refine_nodes.py, nodes/refine_capture.py) on real ComfyUI: subjects, attention
capture against an explicit recomputation, the SAMPLER wrapper (bit-identical at 0 iterations, same sampler
afterwards), soft tokens, errors before sampling, and graphs through a real server."""

import os

import pytest
import torch

from pack_import import REPO_ROOT, submodule

PROMPT = "a photo of a cat and a red dog"
SUBJECTS = "cat, red dog"
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture_pack")


@pytest.fixture(scope="module")
def pack(comfy):
    return {name: submodule(mod) for name, mod in {
        "cap": "nodes.refine_capture", "nodes": "nodes.refine_nodes", "patch": "nodes.patch",
        "layouts": "training.layouts", "tokens": "training.tokens", "maps": "training.attention_maps",
        "refine": "training.refine", "formats": "training.formats"}.items()}


@pytest.fixture(scope="module")
def sd15(comfy):
    """(MODEL, CLIP, VAE) of a tiny SD1.5-class checkpoint, built under inference mode like a loader."""
    return comfy.tiny_checkpoint("sd15", seed=0)


@pytest.fixture(scope="module")
def sd3(comfy):
    return comfy.tiny_checkpoint("sd3", seed=0)


def infer(fn, *args, **kwargs):
    """Run like ComfyUI's executor: under inference mode."""
    with torch.inference_mode():
        return fn(*args, **kwargs)


def encode(pack, clip, text=PROMPT, subjects=SUBJECTS):
    return infer(pack["nodes"].EncodeWithSubjects.execute, clip, text, subjects).result[0]


def plain_encode(clip, text):
    def run():
        tokens = clip.tokenize(text)
        return clip.encode_from_tokens_scheduled(tokens)
    return infer(run)


def latent_for(model, hw=(8, 8), batch=1):
    ch = model.model.latent_format.latent_channels
    return torch.zeros(batch, ch, *hw)


def sigmas_for(model, steps, scheduler="normal"):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def sample_advanced(model, pos, neg, sampler, sigmas, latent, seed=0, cfg=4.0):
    """What SamplerCustomAdvanced does with RandomNoise + CFGGuider (under inference mode)."""
    import comfy.sample
    import comfy.samplers

    def run():
        lat = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(lat, seed)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(cfg)
        return guider.sample(noise, lat, sampler, sigmas, disable_pbar=True, seed=seed).cpu()
    return infer(run)


def refiner(pack, inner, iterations=3, loss="cn+iou", step=None, downscale=2, scale=20.0, refine_at=-1.0):
    settings = pack["refine"].RefineSettings(iterations=iterations, loss=loss, scale=scale)
    return pack["cap"].RefinementSampler(inner, settings, refine_at=refine_at,
                                         refine_step=-1 if step is None else step, downscale=downscale)


def ksampler(name):
    import comfy.samplers
    return comfy.samplers.ksampler(name)


class Recording:
    """A SAMPLER wrapper that records every model call (sigma, model options) on its way to the model."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def max_denoise(self, model_wrap, sigmas):
        return self.inner.max_denoise(model_wrap, sigmas)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        rec = self

        class Proxy:
            def __getattr__(self, name):
                return getattr(model_wrap, name)

            def __call__(self, x, sigma, **kw):
                rec.calls.append({"sigma": float(sigma.max()), "model_options": kw.get("model_options")})
                return model_wrap(x, sigma, **kw)

        return self.inner.sample(Proxy(), sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


def random_tokens(pack, arch, width, text_width, blocks, seed=3, scale=1.0):
    lay = pack["layouts"].TokenLayout(arch=arch, method="softrepa", n_tokens=4, width=width, text_width=text_width,
                                      blocks=blocks)
    tok = pack["tokens"].SoftTokens(lay, generator=torch.Generator().manual_seed(seed))
    tok.static.data.mul_(scale)
    return tok


def options_snapshot(model):
    """A comparable picture of a MODEL's patches and options (objects by identity)."""
    def walk(v):
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return id(v) if not isinstance(v, (int, float, str, bool, type(None))) else v
    return walk(model.model_options), dict(model.object_patches), len(model.patches)


# --- subjects ------------------------------------------------------------------------------------

def test_subjects_sd15_positions_and_plain_encoding(pack, sd15):
    cond = encode(pack, sd15[1])
    base = plain_encode(sd15[1], PROMPT)
    assert torch.equal(cond[0][0], base[0][0])  # encoded exactly like CLIPTextEncode
    info = cond[0][1]["step_refine"]
    assert info.family == "unet" and info.n_text == 77
    (stream,) = info.streams
    assert stream.columns == (0, 77) and stream.window == (1, 76)
    # <bos> a photo of a cat and a red dog -> cat = 5, red dog = 8, 9
    assert stream.subjects == ((5,), (8, 9))


def test_subjects_sd3_clip_and_t5_streams(pack, comfy):
    clip = comfy.tiny_clip_sd3(seed=0, hidden_l=64, hidden_g=64, layers=3, t5=True)
    cond = encode(pack, clip, "a photo of a cat and a red dog, sitting")
    info = cond[0][1]["step_refine"]
    n = cond[0][0].shape[1]
    clip_s, t5_s = info.streams
    assert info.family == "mmdit" and info.n_text == n and n > 77
    assert clip_s.columns == (0, 77) and clip_s.window == (1, 12)  # stops at CLIP's EOT
    assert clip_s.subjects == ((5,), (8, 9))
    assert t5_s.columns == (77, n) and t5_s.window[0] == 1
    # T5 pieces: '_' 'a' '_photo' '_of' '_' 'a' '_cat' '_and' '_' 'a' '_red' '_dog' ',' '_sitting' '</s>'
    assert t5_s.subjects == ((6,), (10, 11)) and t5_s.window[1] == 14


def test_unknown_subject_fails_at_the_node(pack, sd15):
    with pytest.raises(ValueError, match=r"\['horse'\] not found"):
        encode(pack, sd15[1], subjects="cat, horse")
    with pytest.raises(ValueError, match="no subjects"):
        encode(pack, sd15[1], subjects=" , ")


# --- attention capture vs explicit recomputation --------------------------------------------------

def _heads(x, heads):
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _unet_reference(base, run, grid, heads, cols=None):
    """Maps from to_q/to_k outputs of every cross-attention at the grid, recomputed by hand."""
    qs, ks, hooks = {}, {}, []
    for name, mod in base.diffusion_model.named_modules():
        if name.endswith("attn2"):
            hooks.append(mod.to_q.register_forward_hook(lambda m, a, o, n=name: qs.__setitem__(n, o.detach())))
            hooks.append(mod.to_k.register_forward_hook(lambda m, a, o, n=name: ks.__setitem__(n, o.detach())))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for n in qs:
        q, k = _heads(qs[n].float(), heads), _heads(ks[n].float(), heads)
        if q.shape[2] != grid[0] * grid[1]:
            continue
        p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1)
        layers.append(p if cols is None else p[..., cols])
    return torch.stack(layers).mean(0).reshape(q.shape[0], grid[0], grid[1], -1), len(layers)


def _sd3_reference(base, run, grid, cols=None):
    """Maps from every joint block's qkv projections, the joint softmax recomputed by hand ([text ; image])."""
    dm = base.diffusion_model
    out, hooks = {}, []
    for i, blk in enumerate(dm.joint_blocks):
        for side in ("context_block", "x_block"):
            qkv = getattr(blk, side).attn.qkv
            hooks.append(qkv.register_forward_hook(lambda m, a, o, k=(i, side): out.__setitem__(k, o.detach())))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for i, blk in enumerate(dm.joint_blocks):
        heads = blk.x_block.attn.num_heads
        parts = []
        for side in ("context_block", "x_block"):
            qkv = out[(i, side)].float()
            b, n, _ = qkv.shape
            q, k, _v = qkv.reshape(b, n, 3, heads, -1).movedim(2, 0)
            parts.append((q.transpose(1, 2), k.transpose(1, 2)))
        (qt, kt), (qi, ki) = parts
        k = torch.cat([kt, ki], dim=2)
        p = (qi @ k.transpose(-1, -2) * qi.shape[-1] ** -0.5).softmax(-1).mean(1)[..., :kt.shape[2]]
        layers.append(p if cols is None else p[..., cols])
    A = torch.stack(layers).mean(0)
    return A.reshape(A.shape[0], grid[0], grid[1], -1), len(layers)


def _forward_with_capture(pack, model, family, grid, x, sigma, context, pooled=None):
    base = model.model
    capture, mo = pack["cap"].Capture.install(model.model_options, base, family, grid)
    to = dict(mo["transformer_options"], sigmas=sigma, cond_or_uncond=[0])
    kw = {"c_crossattn": context, "transformer_options": to}
    if pooled is not None:
        kw["y"] = pooled

    def run():
        with torch.no_grad():
            base.apply_model(x, sigma, **kw)
    return capture, run


@pytest.mark.parametrize("with_tokens", [False, True])
def test_unet_capture_equals_recomputed_softmax(pack, comfy, with_tokens):
    model = comfy.tiny_sd15(seed=1)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    sigma = torch.tensor([3.0, 3.0])
    cols = None
    if with_tokens:
        tok = random_tokens(pack, "sd15", 768, 768, ("down", "mid", "up"), scale=10.0)
        model = pack["patch"].apply_soft_tokens(model, tok, strength=0.5)  # with the bias override in the chain
        cols = tok.layout.text_positions(77)
    capture, run = _forward_with_capture(pack, model, "unet", (4, 4), x, sigma, ctx)
    heads = comfy.TINY_SD15_HEADS
    if with_tokens:  # the soft-token bias changes the softmax: recompute it with the same logit bias
        import math
        start, stop = tok.layout.token_span(77)
        ref_layers = []
        qs, ks, hooks = {}, {}, []
        for name, mod in model.model.diffusion_model.named_modules():
            if name.endswith("attn2"):
                hooks.append(mod.to_q.register_forward_hook(lambda m, a, o, n=name: qs.__setitem__(n, o.detach())))
                hooks.append(mod.to_k.register_forward_hook(lambda m, a, o, n=name: ks.__setitem__(n, o.detach())))
        run()
        for h in hooks:
            h.remove()
        for n in qs:
            q, k = _heads(qs[n], heads), _heads(ks[n], heads)
            if q.shape[2] != 16:
                continue
            logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            logits[..., start:stop] += math.log(0.5)
            ref_layers.append(logits.softmax(-1).mean(1)[..., cols])
        ref = torch.stack(ref_layers).mean(0).reshape(2, 4, 4, 77)
        n_layers = len(ref_layers)
    else:
        ref, n_layers = _unet_reference(model.model, run, (4, 4), heads)
    got = capture.maps()
    assert n_layers == capture.recorded >= 3  # down + mid + up layers at 4x4
    assert got.shape == (2, 4, 4, 77)
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("with_tokens", [False, True])
def test_sd3_capture_equals_recomputed_joint_softmax(pack, comfy, with_tokens):
    model = comfy.tiny_sd3(seed=1)
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 20, 4096, generator=g), torch.randn(1, 2048, generator=g)
    sigma = torch.tensor([0.7])
    cols = None
    if with_tokens:
        tok = random_tokens(pack, "sd3", 128, 128, (0, 1), scale=3.0)
        model = pack["patch"].apply_soft_tokens(model, tok)
        cols = tok.layout.text_positions(20)
    capture, run = _forward_with_capture(pack, model, "mmdit", (4, 3), x, sigma, ctx, pooled)
    run()
    got = capture.maps()
    capture.reset()
    ref, n_layers = _sd3_reference(model.model, run, (4, 3), cols)
    assert n_layers == 2 and got.shape == (1, 4, 3, 20)
    assert (got - ref).abs().max() <= 1e-5


# --- the SAMPLER ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sd3"])
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_zero_iterations_is_bit_identical(pack, request, family, name):
    model, clip, _ = request.getfixturevalue(family)
    pos, neg = encode(pack, clip), plain_encode(clip, "")
    sigmas, latent = sigmas_for(model, 6), latent_for(model)
    base = sample_advanced(model, pos, neg, ksampler(name), sigmas, latent)
    ref = refiner(pack, ksampler(name), iterations=0)
    out = sample_advanced(model, pos, neg, ref, sigmas, latent)
    assert torch.equal(out, base)
    assert ref.last_run is not None and ref.last_run["step"] == round(6 * (0.16 if family == "sd15" else 5 / 28))


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_refinement_lowers_cn_and_continues_with_the_same_sampler(pack, request, family):
    model, clip, _ = request.getfixturevalue(family)
    pos, neg = encode(pack, clip), plain_encode(clip, "")
    steps, step, iterations = 6, 2, 4
    sigmas, latent = sigmas_for(model, steps), latent_for(model)
    before = options_snapshot(model)
    base = sample_advanced(model, pos, neg, ksampler("euler"), sigmas, latent)
    rec = Recording(ksampler("euler"))
    ref = refiner(pack, rec, iterations=iterations, loss="cn", step=step)  # the default step size 20
    out = sample_advanced(model, pos, neg, ref, sigmas, latent)
    run = ref.last_run
    assert options_snapshot(model) == before  # the input MODEL is not changed
    cn = [h["cn"][0] for h in run["history"]]
    assert len(cn) == iterations and cn[-1] < cn[0], cn
    assert (out - base).abs().max() > 1e-4
    # the capture is gone after the refinement: nothing was recorded by the later steps ...
    capture = run["capture"]
    assert capture.recorded % iterations == 0 and capture.recorded > 0
    per_forward = capture.recorded // iterations
    # ... and the sampler's own calls never carried it
    for call in rec.calls:
        to = (call["model_options"] or {}).get("transformer_options", {})
        assert not isinstance(to.get("optimized_attention_override"), pack["cap"].Capture)
        assert not any(getattr(p, "__self__", None) is capture for p in to.get("patches", {}).get("attn2_patch", []))
    assert len(rec.calls) == steps
    # continues with the same sampler: euler on sigmas[step:] from the refined latent gives the same result
    import comfy.samplers
    x_after = run["x_after"]
    base_model = model.model
    ms = base_model.model_sampling
    start = base_model.process_latent_out(ms.inverse_noise_scaling(sigmas[step], x_after))
    with torch.inference_mode():
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(4.0)
        second = guider.sample(torch.zeros_like(start), start, ksampler("euler"), sigmas[step:], disable_pbar=True,
                               seed=0).cpu()
    assert torch.allclose(second, out, atol=1e-5, rtol=1e-5), (second - out).abs().max()
    # and the first part is plain euler up to the step
    with torch.inference_mode():
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(4.0)
        import comfy.sample
        first = guider.sample(comfy.sample.prepare_noise(latent, 0), latent, ksampler("euler"), sigmas[:step + 1],
                              disable_pbar=True, seed=0)
    x_before = base_model.process_latent_in(first)
    x_before = ms.noise_scaling(sigmas[step], torch.zeros_like(x_before), x_before) if family == "sd3" else x_before
    assert torch.allclose(x_before, run["x_before"], atol=1e-5, rtol=1e-5)
    assert per_forward >= 1


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_runs_with_soft_tokens_and_leaves_the_model_alone(pack, request, family):
    model, clip, _ = request.getfixturevalue(family)
    if family == "sd15":
        tok = random_tokens(pack, "sd15", 768, 768, ("down", "mid"), scale=10.0)
    else:
        tok = random_tokens(pack, "sd3", 128, 128, (0, 1), scale=3.0)
    patched = pack["patch"].apply_soft_tokens(model, tok, strength=0.7)
    before, before_base = options_snapshot(patched), options_snapshot(model)
    functions = {n: (m.__dict__.get("weight_function"), m.__dict__.get("bias_function"))
                 for n, m in patched.model.diffusion_model.named_modules()}
    pos, neg = encode(pack, clip), plain_encode(clip, "")
    sigmas, latent = sigmas_for(model, 5), latent_for(model)
    plain = sample_advanced(patched, pos, neg, ksampler("euler"), sigmas, latent)
    ref = refiner(pack, ksampler("euler"), iterations=2, step=1)
    out = sample_advanced(patched, pos, neg, ref, sigmas, latent)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 0
    assert len(ref.last_run["history"]) == 2
    assert options_snapshot(patched) == before and options_snapshot(model) == before_base
    after = {n: (m.__dict__.get("weight_function"), m.__dict__.get("bias_function"))
             for n, m in patched.model.diffusion_model.named_modules()}
    assert after == functions  # the temporary clone functions are gone
    assert all(p.is_inference() for p in patched.model.diffusion_model.parameters())  # weights are the originals


def test_sdxl_class_model(pack, comfy):
    import importlib.util
    spec = importlib.util.spec_from_file_location("soft_tokens_test_fixtures_refine", os.path.join(FIXTURES, "__init__.py"))
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    model, clip, _ = fixtures.tiny_sdxl_checkpoint(seed=0)
    pos, neg = encode(pack, clip), plain_encode(clip, "")
    info = pos[0][1]["step_refine"]
    assert info.family == "unet" and info.n_text == 77 and info.streams[0].subjects == ((5,), (8, 9))
    sigmas, latent = sigmas_for(model, 5), latent_for(model)
    base = sample_advanced(model, pos, neg, ksampler("euler"), sigmas, latent)
    assert torch.equal(sample_advanced(model, pos, neg, refiner(pack, ksampler("euler"), iterations=0), sigmas, latent),
                       base)
    ref = refiner(pack, ksampler("euler"), iterations=2, step=1)
    out = sample_advanced(model, pos, neg, ref, sigmas, latent)
    assert len(ref.last_run["history"]) == 2 and (out - base).abs().max() > 0


# --- errors before sampling -----------------------------------------------------------------------

def test_errors_before_sampling(pack, sd15):
    model, clip, _ = sd15
    pos, neg = encode(pack, clip), plain_encode(clip, "")
    sigmas, latent = sigmas_for(model, 4), latent_for(model)
    cases = [
        (dict(step=4), pos, "outside the schedule.*4 steps"),
        (dict(refine_at=0.99), pos, "outside the schedule"),
        ({}, plain_encode(clip, PROMPT), "Refinement Subjects"),
    ]
    for kw, positive, match in cases:
        rec = Recording(ksampler("euler"))
        with pytest.raises(ValueError, match=match):
            sample_advanced(model, positive, neg, refiner(pack, rec, **kw), sigmas, latent)
        assert rec.calls == []  # nothing was sampled
    with pytest.raises(ValueError, match="cannot wrap heun: its corrector"):
        sample_advanced(model, pos, neg, refiner(pack, ksampler("heun")), sigmas, latent)


def test_inpainting_mask_is_refused(pack, sd15):
    import comfy.samplers
    model, clip, _ = sd15
    pos, neg = encode(pack, clip), plain_encode(clip, "")
    rec = Recording(ksampler("euler"))

    def run():
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        lat = latent_for(model)
        return guider.sample(torch.randn_like(lat), lat, refiner(pack, rec), sigmas_for(model, 4),
                             denoise_mask=torch.ones(1, 1, 8, 8), disable_pbar=True)
    with pytest.raises(ValueError, match="inpainting"):
        infer(run)
    assert rec.calls == []


def tiny_flux():
    """A tiny Flux (comfy.supported_models.Flux, 1 double + 1 single block, hidden 64): an unsupported family."""
    import comfy.supported_models
    import comfy_env
    cfg = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
           "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
           "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
    mc = comfy.supported_models.Flux(cfg)
    mc.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        model = mc.get_model({})
        comfy_env.init_weights(model.diffusion_model, 0)
    return comfy_env._patcher(model.eval())


@pytest.mark.parametrize("kind", ["flux", "flow_unet"])
def test_unsupported_model_is_refused(pack, sd15, sd3, kind):
    import comfy.model_sampling
    if kind == "flux":
        model, clip = tiny_flux(), sd3[1]
    else:  # a UNet given flow sampling (a model-sampling node misused): not a supported model either
        model, clip = sd15[0].clone(), sd15[1]

        class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
            pass
        model.add_object_patch("model_sampling", Flow(model.model.model_config))
    pos, neg = encode(pack, clip), plain_encode(clip, "")
    rec = Recording(ksampler("euler"))
    with pytest.raises(ValueError, match=r"supports SD1.x/SD2/SDXL UNets and SD3 MMDiT models; (Flux|BaseModel)"):
        sample_advanced(model, pos, neg, refiner(pack, rec), sigmas_for(model, 4), latent_for(model))
    assert rec.calls == []  # refused before the first model call


def test_subjects_from_another_family_are_refused(pack, sd15, sd3):
    pos = encode(pack, sd3[1])
    model = sd15[0]
    neg = plain_encode(sd15[1], "")
    with pytest.raises(ValueError, match="MMDIT text encoder.*UNET model"):
        sample_advanced(model, pos, neg, refiner(pack, ksampler("euler")), sigmas_for(model, 4), latent_for(model))


# --- the KSampler node ----------------------------------------------------------------------------

def test_ksampler_node_matches_core_ksampler_at_zero_iterations(pack, sd15):
    import nodes as core
    model, clip, _ = sd15
    pos, neg = encode(pack, clip), plain_encode(clip, "")
    latent = {"samples": latent_for(model, batch=2)}
    args = dict(seed=3, steps=4, cfg=5.0, sampler_name="dpmpp_2m", scheduler="karras")
    base = infer(core.common_ksampler, model, args["seed"], args["steps"], args["cfg"], args["sampler_name"],
                 args["scheduler"], pos, neg, latent, denoise=0.8)[0]["samples"]
    node = pack["nodes"].KSamplerStepSelectedRefinement
    zero = infer(node.execute, model, positive=pos, negative=neg, latent_image=latent, denoise=0.8, refine_at=-1.0,
                 iterations=0, step_size=20.0, loss="cn+iou", attention_downscale=2, **args).result[0]["samples"]
    assert torch.equal(zero, base)
    refined = infer(node.execute, model, positive=pos, negative=neg, latent_image=latent, denoise=0.8, refine_at=0.25,
                    iterations=2, step_size=20.0, loss="cn+iou", attention_downscale=2, **args).result[0]["samples"]
    assert torch.isfinite(refined).all() and (refined - base).abs().max() > 0


def test_wrong_downscale_names_the_available_grids(pack, sd15):
    model, clip, _ = sd15
    pos, neg = encode(pack, clip), plain_encode(clip, "")
    with pytest.raises(ValueError, match=r"no cross-attention layer runs at the 2x2.*\[64, 16\]"):
        sample_advanced(model, pos, neg, refiner(pack, ksampler("euler"), downscale=4), sigmas_for(model, 4),
                        latent_for(model))


# --- through a real server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    import comfy_env
    srv = comfy_env.start_server(packs=[(REPO_ROOT, "comfyui-soft-tokens"), (FIXTURES, "soft_tokens_test_fixtures")],
                                 env={"OMP_NUM_THREADS": "1"})
    yield srv
    comfy_env.stop_server(srv)


def _graph(sampler_part):
    g = {
        "1": {"class_type": "SoftTokensTestTinyCheckpoint", "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "SoftTokensEncodeWithSubjects",
              "inputs": {"clip": ["1", 1], "text": PROMPT, "subjects": SUBJECTS}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    g.update(sampler_part)
    g["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    g["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "refined"}}
    g["11"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "refined"}}
    return g


def _ok(server, g):
    hist = server.wait_history(server.post_prompt(g), timeout=180)
    assert hist["status"]["status_str"] == "success", (hist["status"], server.log()[-3000:])
    outputs = hist["outputs"]
    assert any(o.get("images") for o in outputs.values()) and any(o.get("latents") for o in outputs.values())
    return hist


def test_server_graphs_execute(server):
    assert not server.failed_custom_nodes(), server.log()[-3000:]
    info = server.get("/object_info")
    for node in ("SoftTokensEncodeWithSubjects", "StepSelectedRefinement", "KSamplerStepSelectedRefinement"):
        assert node in info
        for name, spec in {**info[node]["input"]["required"], **info[node]["input"].get("optional", {})}.items():
            assert spec[1].get("tooltip"), (node, name)
    ks = {"5": {"class_type": "KSamplerStepSelectedRefinement", "inputs": {
        "model": ["1", 0], "seed": 0, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0, "refine_at": 0.25,
        "iterations": 2, "step_size": 20.0, "loss": "cn+iou", "attention_downscale": 2}}}
    _ok(server, _graph(ks))
    custom = _custom_sampling(["1", 0], "euler_ancestral", "normal", 4, 5.0, loss="cn", attention_downscale=2,
                              refine_step=1)
    _ok(server, _graph(custom))


def _custom_sampling(model, sampler_name, scheduler, steps, cfg, **refine):
    """KSamplerSelect -> Step-Selected Refinement -> SamplerCustomAdvanced (node "5") on ``model``."""
    refinement = {"sampler": ["6", 0], "refine_at": -1.0, "iterations": 2, "step_size": 20.0, "loss": "cn+iou",
                  "smoothing": True, "attention_downscale": 4, "refine_step": -1, **refine}
    return {
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler_name}},
        "7": {"class_type": "StepSelectedRefinement", "inputs": refinement},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler, "steps": steps,
                                                         "denoise": 1.0}},
        "12": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "13": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": cfg}},
        "5": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["12", 0], "guider": ["13", 0],
                                                                "sampler": ["7", 0], "sigmas": ["8", 0],
                                                                "latent_image": ["4", 0]}},
    }


def test_server_with_soft_tokens_sd15_and_sd3(server, pack):
    """Load Soft Tokens -> refinement, through the server: SD1.5 (KSampler node) and SD3 (SamplerCustomAdvanced)."""
    folder = os.path.join(server.base_dir, "models", "soft_tokens")
    sd15 = random_tokens(pack, "sd15", 768, 768, ("down", "mid"), scale=10.0)
    sd3 = random_tokens(pack, "sd3", 128, 128, (0, 1), scale=3.0)
    pack["formats"].save_tokens(sd15, os.path.join(folder, "tiny_sd15.safetensors"))
    pack["formats"].save_tokens(sd3, os.path.join(folder, "tiny_sd3.safetensors"))

    def load(file):
        return {"class_type": "LoadSoftTokens", "inputs": {"model": ["1", 0], "token_file": file, "strength": 1.0,
                                                           "apply_to": "both", "blocks": ""}}

    ks = {"14": load("tiny_sd15.safetensors"),
          "5": {"class_type": "KSamplerStepSelectedRefinement", "inputs": {
              "model": ["14", 0], "seed": 0, "steps": 4, "cfg": 5.0, "sampler_name": "dpmpp_2m",
              "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
              "denoise": 1.0, "refine_at": 0.25, "iterations": 2, "step_size": 20.0, "loss": "cn+iou",
              "attention_downscale": 2}}}
    _ok(server, _graph(ks))
    g = _graph({"14": load("tiny_sd3.safetensors"), **_custom_sampling(["14", 0], "euler", "simple", 6, 4.0)})
    g["1"]["inputs"]["family"] = "sd3"
    g["4"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    _ok(server, g)


def test_server_reports_unknown_subject(server):
    ks = {"5": {"class_type": "KSamplerStepSelectedRefinement", "inputs": {
        "model": ["1", 0], "seed": 0, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0, "refine_at": 0.25,
        "iterations": 2, "step_size": 20.0, "loss": "cn+iou", "attention_downscale": 2}}}
    g = _graph(ks)
    g["2"]["inputs"]["subjects"] = "cat, unicorn"
    hist = server.wait_history(server.post_prompt(g), timeout=180)
    assert hist["status"]["status_str"] == "error"
    err = [m for m in hist["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert err["node_type"] == "SoftTokensEncodeWithSubjects" and "unicorn" in err["exception_message"]
