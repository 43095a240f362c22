"""The diffusers backend: forward processes, plain and token predictions, frozen backbone,
gradient checkpointing, autocast, and loading denoisers from local files only."""

import copy
import json
import math
import socket

import pytest
import torch
from safetensors.torch import save_file

from tiny_models import tiny_sd3, tiny_unet
from training.diffusers_backend import DiffusersBackend, load_denoiser, sdxl_time_ids
from training.diffusers_hooks import TokenInjector
from training.layouts import TokenLayout
from training.objectives import agsm_step, softrepa_step
from training.tokens import SoftTokens

W = 32


def tiny_sdxl(seed=0):
    """A UNet with SDXL's text_time added conditioning (text_embeds 16 + 6 time ids)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, attention_head_dim=8, cross_attention_dim=W,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    ).eval()


def tiny_model(kind):
    if kind == "sd15":
        return tiny_unet(W)
    if kind == "sdxl":
        return tiny_sdxl()
    return tiny_sd3(num_layers=2, heads=2, head_dim=16, joint_attention_dim=W)


def make_cond(kind, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "sd3":
        return {"context": torch.randn(n, 6, W, generator=g), "pooled": torch.randn(n, 64, generator=g)}
    cond = {"context": torch.randn(n, 7, W, generator=g)}
    if kind == "sdxl":
        cond["text_embeds"] = torch.randn(n, 16, generator=g)
        cond["time_ids"] = sdxl_time_ids(8, 8, n)
    return cond


def plain_call(model, kind, z, t, cond):
    if kind == "sd3":
        return model(z, cond["context"], cond["pooled"], t).sample
    extra = {}
    if kind == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return model(z, t, encoder_hidden_states=cond["context"], **extra).sample


def make_tokens(kind, method="agsm", seed=1, gain=30.0):
    if kind == "sd3":
        lay = TokenLayout(arch="sd3", method=method, n_tokens=2, width=W, text_width=W, blocks=(0, 1))
    else:
        lay = TokenLayout(arch=kind, method=method, n_tokens=2, width=W, text_width=W, blocks=("down", "mid"))
    tok = SoftTokens(lay, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tok.static.mul_(gain)
        tok.time.mul_(gain)
    return tok


# --- forward processes -------------------------------------------------------------------------

def test_epsilon_forward_process_matches_ddim_add_noise():
    from diffusers import DDIMScheduler

    backend = DiffusersBackend(tiny_unet(W))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 17, 500, 999])
    assert (backend.noisy(x0, noise, t) - sched.add_noise(x0, noise, t)).abs().max().item() <= 1e-6
    assert torch.equal(backend.target(x0, noise, t), noise)
    # shared noise (1, C, h, w) broadcasts over the batch
    assert torch.allclose(backend.noisy(x0, noise[:1], t), backend.noisy(x0, noise[:1].expand_as(x0), t))
    assert backend.prediction == "epsilon"


def test_flow_forward_process():
    backend = DiffusersBackend(tiny_model("sd3"))
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 250, 999])
    z = backend.noisy(x0, noise, t)
    for k, tk in enumerate(t.tolist()):
        s = tk / 1000
        assert (z[k] - ((1 - s) * x0[k] + s * noise[k])).abs().max().item() <= 1e-6
    assert torch.equal(backend.target(x0, noise, t), noise - x0)
    assert backend.prediction == "flow"


def test_construction_checks():
    unet = tiny_unet(W)
    with pytest.raises(ValueError, match="predicts 'epsilon'"):
        DiffusersBackend(unet, prediction="flow")
    with pytest.raises(ValueError, match="autocast_dtype"):
        DiffusersBackend(unet, autocast_dtype="fp8")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiffusersBackend(unet, alphas_cumprod=torch.ones(10))
    with pytest.raises(ValueError, match="not a supported denoiser"):
        DiffusersBackend(torch.nn.Linear(2, 2))


# --- predictions -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_predict_plain_and_with_tokens(kind):
    model = tiny_model(kind)
    backend = DiffusersBackend(model)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    z, t, cond = torch.randn(3, 4, 8, 8), torch.tensor([999, 400, 3]), make_cond(kind, 3)
    with torch.no_grad():
        base = plain_call(model, kind, z, t, cond)
        assert torch.equal(backend.predict(z, t, cond, None), base)
        tok = make_tokens(kind)
        sets = torch.tensor([0, 1, 1])
        ours = backend.predict(z, t, cond, tok, sets)
        assert torch.equal(backend.predict(z, t, cond, None), base)  # the injector is inactive outside predict
        ref_inj = TokenInjector(model, tok)
        with ref_inj.using(tok, sets):
            ref = plain_call(model, kind, z, t, cond)
        ref_inj.remove()
    assert torch.equal(ours, ref)
    assert (ours - base).abs().max().item() > 1e-4
    backend.remove()
    with torch.no_grad():
        assert torch.equal(plain_call(model, kind, z, t, cond), base)


def test_sd3_receives_integer_timestep():
    model = tiny_model("sd3")
    backend = DiffusersBackend(model)
    seen = []
    h = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    with torch.no_grad():
        backend.predict(torch.randn(2, 4, 8, 8), torch.tensor([731]), make_cond("sd3", 2), None)
    h.remove()
    assert seen[0].dtype == torch.int64 and seen[0].tolist() == [731, 731]


def test_sdxl_needs_added_cond():
    backend = DiffusersBackend(tiny_sdxl())
    cond = make_cond("sdxl", 2)
    del cond["time_ids"]
    with pytest.raises(ValueError, match="time_ids"):
        backend.predict(torch.randn(2, 4, 8, 8), torch.tensor([5]), cond, None)
    assert sdxl_time_ids(64, 96, 2).tolist() == [[512, 768, 0, 0, 512, 768]] * 2


def test_gradients_reach_tokens_only():
    model = tiny_model("sd15")
    backend = DiffusersBackend(model)
    tok = make_tokens("sd15")
    out = backend.predict(torch.randn(2, 4, 8, 8), torch.tensor([100]), make_cond("sd15", 2), tok, 1)
    out.square().mean().backward()
    assert tok.static.grad[1].abs().max() > 0 and tok.static.grad[0].abs().max() == 0
    assert tok.time.grad.abs().max() > 0
    assert all(p.grad is None for p in model.parameters())


# --- gradient checkpointing and autocast -------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_gradient_checkpointing_gives_identical_results(kind, monkeypatch):
    model = tiny_model(kind)
    plain = DiffusersBackend(model)
    ckpt_model = copy.deepcopy(model)
    ckpt = DiffusersBackend(ckpt_model, gradient_checkpointing=True)
    calls = []
    inner = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or inner(*a, **k))

    g = torch.Generator().manual_seed(0)
    x0, eps, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), make_cond(kind, 2)
    results = []
    for backend in (plain, ckpt):
        tok, ema = make_tokens(kind, seed=1), make_tokens(kind, seed=2)
        sr = make_tokens(kind, "softrepa", seed=3)
        a = agsm_step(backend, tok, ema, x0, cond, 640, eps, chunk=3)  # per-pair token sets
        s = softrepa_step(backend, sr, x0, cond, 640, eps, chunk=1)  # two-pass path
        results.append((a["loss"], s["loss"], [p.grad for p in (tok.static, tok.time, sr.static, sr.time)]))
    assert calls, "checkpointing did not run"
    assert not ckpt_model.training  # stays in eval mode: dropout off
    (a0, s0, g0), (a1, s1, g1) = results
    assert abs(a0 - a1) <= 1e-6 and abs(s0 - s1) <= 1e-6
    for x, y in zip(g0, g1):
        assert (x - y).abs().max().item() <= 1e-6 * y.abs().max().item()


def test_autocast_bf16_keeps_fp32_master_tokens():
    model = tiny_model("sd15")
    fp32 = DiffusersBackend(model)
    bf16 = DiffusersBackend(copy.deepcopy(model), autocast_dtype="bf16")
    z, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([300]), make_cond("sd15", 2)
    outs = []
    for backend in (fp32, bf16):
        tok = make_tokens("sd15")
        out = backend.predict(z, t, cond, tok, 0)
        out.square().mean().backward()
        outs.append(out.detach())
        assert out.dtype == torch.float32
        assert tok.static.dtype == torch.float32 and tok.static.grad.dtype == torch.float32
        assert torch.isfinite(tok.static.grad).all() and tok.static.grad.abs().max() > 0
    rel = (outs[1] - outs[0]).norm() / outs[0].norm()
    assert 0 < rel.item() < 0.05  # autocast is active, and close to fp32 within bf16 precision


# --- loading local weights ---------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _same(a, b, kind):
    """Equal outputs (up to float kernel-path differences: loaded weights may be laid out differently)."""
    z, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([123, 877]), make_cond(kind, 2)
    with torch.no_grad():
        return (plain_call(a, kind, z, t, cond) - plain_call(b, kind, z, t, cond)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kind, sub", [("sd15", "unet"), ("sd3", "transformer")])
def test_load_denoiser_from_local_files(kind, sub, tmp_path, no_network):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path / "model")
    pipe = tmp_path / "pipe"
    model.save_pretrained(pipe / sub)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    single = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, single)

    for loaded in (load_denoiser(tmp_path / "model"), load_denoiser(pipe),
                   load_denoiser(single, config=tmp_path / "model"), load_denoiser(single, config=pipe)):
        assert type(loaded) is type(model)
        assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
        assert _same(loaded, model, kind)


def test_load_denoiser_weight_variant(tmp_path, no_network):
    model = tiny_unet(W)
    model.save_pretrained(tmp_path / "m", variant="fp16")
    names = [f.name for f in (tmp_path / "m").glob("diffusion_pytorch_model*")]
    assert names == ["diffusion_pytorch_model.fp16.safetensors"]
    assert _same(load_denoiser(tmp_path / "m"), model, "sd15")


def test_from_local_reads_pipeline_schedule(tmp_path, no_network):
    from diffusers import DDIMScheduler

    tiny_unet(W).save_pretrained(tmp_path / "unet")
    (tmp_path / "model_index.json").write_text("{}")
    cfg = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    backend = DiffusersBackend.from_local(tmp_path)
    ref = DDIMScheduler(**cfg).alphas_cumprod
    assert (backend.alphas_cumprod.float() - ref).abs().max().item() <= 1e-6
    # a model folder without a scheduler keeps SD's scaled_linear schedule
    default = DiffusersBackend.from_local(tmp_path / "unet").alphas_cumprod
    assert math.isclose(default[999].item(), DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear").alphas_cumprod[999].item(), rel_tol=1e-5)


def test_load_denoiser_fails_clearly(tmp_path, no_network):
    with pytest.raises(ValueError, match="never downloads"):
        load_denoiser("stabilityai/stable-diffusion-3-medium-diffusers")
    with pytest.raises(ValueError, match="no such local"):
        load_denoiser(tmp_path / "missing")
    model = tiny_unet(W)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no diffusion_pytorch_model"):
        load_denoiser(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a diffusers model folder"):
        load_denoiser(tmp_path / "empty")
    single = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, single)
    with pytest.raises(ValueError, match="needs config="):
        load_denoiser(single)
    with pytest.raises(ValueError, match="no such local folder"):
        load_denoiser(single, config="stabilityai/stable-diffusion-xl-base-1.0")
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=".safetensors"):
        load_denoiser(tmp_path / "w.ckpt")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not supported"):
        load_denoiser(tmp_path / "vae")
