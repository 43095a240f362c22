"""Flux.1 in the diffusers backend: token insertion into FluxTransformer2DModel's double-stream
blocks (with rotary rows), sigma timesteps, checkpointing, and SoftREPA lowering the loss."""

import copy

import pytest
import torch

from training.diffusers_backend import DiffusersBackend, _flux_pack, _flux_unpack
from training.diffusers_hooks import TokenInjector
from training.layouts import TokenLayout, default_blocks, time_bucket
from training.objectives import softrepa_step
from training.tokens import SoftTokens

W, EMBED = 32, 48


def tiny_flux(guidance=True, seed=0):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=EMBED,
                                  pooled_projection_dim=24, guidance_embeds=guidance,
                                  axes_dims_rope=(4, 6, 6)).eval()


def make_cond(n, seed=0, n_text=6):
    g = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(n, n_text, EMBED, generator=g), "pooled": torch.randn(n, 24, generator=g)}


def make_tokens(width=W, blocks=(0, 1), method="softrepa", seed=1, gain=10.0, arch="flux"):
    lay = TokenLayout(arch=arch, method=method, n_tokens=2, width=width, text_width=W, blocks=blocks)
    tok = SoftTokens(lay, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tok.static.mul_(gain)
    return tok


def test_layout_preset_and_rope_rows():
    lay = TokenLayout(arch="flux", method="softrepa", n_tokens=3, width=3072, text_width=3072,
                      blocks=default_blocks("flux", "softrepa"))
    assert lay.blocks == (0, 1, 2, 3, 4) and lay.position == "prepend" and not lay.projected
    assert lay.timestep_scale == 1000.0 and TokenLayout(**{**vars(lay), "arch": "sd3"}).timestep_scale == 1.0
    assert time_bucket(torch.tensor([1.0, 0.5]) * lay.timestep_scale).tolist() == [99, 49]  # official ">= 1000" rule
    pe = torch.arange(5.0)[:, None].expand(5, 2)  # 2 text rows, 3 image rows
    assert lay.rope_rows(pe, 2, 0)[:, 0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    agsm = lay.replace(method="agsm", position="")
    assert agsm.position == "append" and agsm.rope_rows(pe, 2, 0)[:, 0].tolist() == [0, 1, 1, 1, 1, 2, 3, 4]


def test_pack_roundtrip():
    z = torch.randn(2, 16, 4, 6)
    img, ids = _flux_pack(z)
    assert img.shape == (2, 6, 64) and ids.shape == (6, 3) and ids[5].tolist() == [0, 1, 2]
    assert torch.equal(_flux_unpack(img, z.shape), z)


@pytest.mark.parametrize("guidance", [True, False])
def test_predict_tokens_act_and_removal_restores(guidance):
    model = tiny_flux(guidance)
    backend = DiffusersBackend(model)
    assert backend.prediction == "flow"
    z, cond = torch.randn(2, 4, 4, 4), make_cond(2)
    t = torch.tensor([999, 300])
    plain = backend.predict(z, t, cond, None)
    with_tok = backend.predict(z, t, cond, make_tokens())
    projected = backend.predict(z, t, cond, make_tokens(width=EMBED, blocks=(2,)))
    assert plain.shape == z.shape
    assert (with_tok - plain).abs().max() > 1e-3 and (projected - plain).abs().max() > 1e-3
    backend.remove()
    assert torch.equal(backend.predict(z, t, cond, None), plain)
    if guidance:  # guidance is conditioning: it changes the output, tokens or not
        other = backend.predict(z, t, dict(cond, guidance=torch.tensor([1.0, 1.0])), None)
        assert (other - plain).abs().max() > 1e-5


def test_time_table_sees_1000_sigma():
    model = tiny_flux()
    tok = make_tokens()
    inj = TokenInjector(model, tok)
    backend = DiffusersBackend(model)
    z, cond = torch.randn(2, 4, 4, 4), make_cond(2)
    with inj.using(tok):
        model(**backend._model_inputs(z, torch.tensor([999, 40]), cond))
    assert torch.allclose(inj._t, torch.tensor([999.0, 40.0]), atol=1e-3)
    inj.remove()


def test_sd3_tokens_refused_by_flux():
    with pytest.raises(ValueError, match=r"(?s)SD3.*Flux\.1"):
        TokenInjector(tiny_flux(), make_tokens(arch="sd3"))


def test_gradient_checkpointing_gives_identical_results():
    model = tiny_flux()
    g = torch.Generator().manual_seed(0)
    x0, eps, cond = torch.randn(2, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g), make_cond(2)
    out = []
    for backend in (DiffusersBackend(model), DiffusersBackend(copy.deepcopy(model), gradient_checkpointing=True)):
        tok = make_tokens(seed=3, gain=1.0)
        s = softrepa_step(backend, tok, x0, cond, 640, eps, chunk=1)
        out.append((s["loss"], tok.static.grad.clone(), tok.time.grad.clone()))
    (l0, *g0), (l1, *g1) = out
    assert abs(l0 - l1) <= 1e-6
    for a, b in zip(g0, g1):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_softrepa_steps_lower_the_loss():
    backend = DiffusersBackend(tiny_flux())
    g = torch.Generator().manual_seed(0)
    x0, eps, cond = torch.randn(3, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g), make_cond(3)
    tok = make_tokens(gain=1.0)
    opt = torch.optim.AdamW(tok.parameters(), lr=0.05, weight_decay=0.0)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        # tau 1: a random tiny model has errors ~2, where tau 0.07 saturates exp(-E/tau) to 0
        losses.append(softrepa_step(backend, tok, x0, cond, 500, eps, tau=1.0)["loss"])
        opt.step()
    assert losses[-1] < losses[0] - 1e-3, losses
