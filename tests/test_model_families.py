"""SD2.x, SD3.5 and v-prediction UNets without ComfyUI: presets, detection, refusals, the diffusers
backend's v-prediction, and a few training steps lowering the loss (issue 14)."""

import copy
import json

import pytest
import torch

from tiny_models import tiny_unet
from training.diffusers_backend import DiffusersBackend, prediction_from_folder, schedule_from_folder
from training.diffusers_hooks import TokenInjector, describe_model
from training.encoders import detect_arch
from training.layouts import ARCH_FAMILY, TokenLayout, default_blocks, default_position, uses_time_table
from training.objectives import agsm_step, softrepa_step
from training.tokens import SoftTokens


def tiny_sd35(num_layers=3, dual=(0, 1), heads=2, head_dim=16, embed=32, seed=0):
    """An SD3.5-class SD3Transformer2DModel: qk-norm (RMSNorm) and MMDiT-X dual attention in `dual`."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=embed,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=16, pos_embed_max_size=16,
        qk_norm="rms_norm", dual_attention_layers=tuple(dual)).eval()


# --- presets and refusals --------------------------------------------------------------------

def test_presets():
    assert ARCH_FAMILY["sd2"] == "unet" and ARCH_FAMILY["sd35"] == "mmdit"
    assert default_position("sd2", "softrepa") == "after_bos"
    assert default_position("sd35", "softrepa") == "prepend" and default_position("sd35", "agsm") == "append"
    assert default_blocks("sd2", "softrepa") == ("down",) and default_blocks("sd2", "agsm") == ("down", "mid")
    assert default_blocks("sd35", "softrepa", 5) == (0, 1, 2, 3, 4)
    assert uses_time_table("sd2", "softrepa") and uses_time_table("sd35", "agsm")
    lay = TokenLayout(arch="sd35", method="softrepa", n_tokens=4, width=4096, text_width=2432, blocks=range(5))
    assert lay.projected and lay.n_layers == 5


def sd2_tokens():
    return TokenLayout(arch="sd2", method="softrepa", n_tokens=4, width=1024, text_width=1024, blocks=("down",))


def test_sd2_tokens_are_refused_by_sd15_and_sd35_naming_both():
    with pytest.raises(ValueError, match=r"sd2.*text width 1024.*768 wide \(SD1.5-like\)"):
        sd2_tokens().check_model("unet", 768, model_arch="sd15")
    with pytest.raises(ValueError, match=r"sd2.*UNET model.*MMDIT model \(SD3.5\)"):
        sd2_tokens().check_model("mmdit", 1536, n_blocks=24, embed_width=4096, model_arch="sd35")
    sd2_tokens().check_model("unet", 1024, model_arch="sd2")


def test_sd3_and_sd35_tokens_do_not_mix():
    sd3 = TokenLayout(arch="sd3", method="softrepa", n_tokens=4, width=1536, text_width=1536, blocks=range(5))
    sd35 = sd3.replace(arch="sd35")
    with pytest.raises(ValueError, match="made for SD3, but the loaded model is SD3.5"):
        sd3.check_model("mmdit", 1536, 24, 4096, model_arch="sd35")
    with pytest.raises(ValueError, match="made for SD3.5, but the loaded model is SD3"):
        sd35.check_model("mmdit", 1536, 24, 4096, model_arch="sd3")
    sd35.check_model("mmdit", 1536, 24, 4096, model_arch="sd35")
    with pytest.raises(ValueError, match=r"2432 wide \(SD3.5-large-like\)"):
        sd35.check_model("mmdit", 2432, 38, 4096, model_arch="sd35")


def test_detection_from_diffusers_models_and_pipeline_configs(tmp_path):
    assert describe_model(tiny_unet(1024))["arch"] == "sd2"
    assert describe_model(tiny_unet(768))["arch"] == "sd15"
    info = describe_model(tiny_sd35())
    assert info["arch"] == "sd35" and info["n_blocks"] == 3
    lay = TokenLayout(arch="sd3", method="softrepa", n_tokens=2, width=32, text_width=32, blocks=(0,))
    with pytest.raises(ValueError, match="made for SD3, but the loaded model is SD3.5"):
        TokenInjector(tiny_sd35(), SoftTokens(lay))
    for part, cfg, index, arch in [
            ("unet", {"cross_attention_dim": 1024}, {"_class_name": "StableDiffusionPipeline", "unet": [],
                                                     "text_encoder": []}, "sd2"),
            ("unet", {"cross_attention_dim": 768}, {"_class_name": "StableDiffusionPipeline", "unet": [],
                                                    "text_encoder": []}, "sd15"),
            ("transformer", {"qk_norm": "rms_norm"}, {"_class_name": "StableDiffusion3Pipeline"}, "sd35"),
            ("transformer", {"qk_norm": None}, {"_class_name": "StableDiffusion3Pipeline"}, "sd3")]:
        root = tmp_path / arch
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps(cfg))
        assert detect_arch(index, root) == arch


# --- v-prediction --------------------------------------------------------------------------

def test_v_target_is_diffusers_velocity_and_noisy_is_add_noise():
    from diffusers import DDPMScheduler

    b = DiffusersBackend(tiny_unet(1024), prediction="v")
    assert b.prediction == "v"
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="v_prediction")
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 17, 500, 999])
    assert (b.target(x0, noise, t) - sched.get_velocity(x0, noise, t)).abs().max() <= 1e-5
    assert (b.noisy(x0, noise, t) - sched.add_noise(x0, noise, t)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="predicts 'flow'"):
        DiffusersBackend(tiny_sd35(), prediction="v")


def write_scheduler(root, **cfg):
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    base = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(base, **cfg)))


def test_prediction_and_zero_snr_schedule_from_the_pipeline(tmp_path):
    from diffusers import DDPMScheduler

    assert prediction_from_folder(tmp_path) == "epsilon"  # no scheduler config
    write_scheduler(tmp_path, prediction_type="v_prediction")
    assert prediction_from_folder(tmp_path) == "v"
    tiny_unet(1024).save_pretrained(tmp_path / "unet")
    (tmp_path / "model_index.json").write_text("{}")
    assert DiffusersBackend.from_local(tmp_path).prediction == "v"
    write_scheduler(tmp_path, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        rescale_betas_zero_snr=True).alphas_cumprod
    abar = schedule_from_folder(tmp_path)
    assert abar[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert (abar.float() - ref).abs().max().item() <= 1e-6
    write_scheduler(tmp_path, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        prediction_from_folder(tmp_path)


# --- a few training steps lower the loss -------------------------------------------------------

def lowers_loss(backend, tok, x0, cond, method, steps=6, lr=0.05):
    ema = copy.deepcopy(tok).requires_grad_(False)
    opt = torch.optim.Adam(tok.parameters(), lr=lr)
    noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        if method == "softrepa":
            res = softrepa_step(backend, tok, x0, cond, 400, noise, tau=1.0)
        else:
            res = agsm_step(backend, tok, ema, x0, cond, 400, noise)
        losses.append(res["loss"])
        opt.step()
    return losses


@pytest.mark.parametrize("method", ["softrepa", "agsm"])
def test_v_prediction_unet_trains(method):
    b = DiffusersBackend(tiny_unet(1024), prediction="v")
    lay = TokenLayout(arch="sd2", method=method, n_tokens=2, width=1024, text_width=1024, blocks=("down", "mid"))
    tok = SoftTokens(lay, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(3, 4, 8, 8, generator=g), {"context": torch.randn(3, 7, 1024, generator=g)}
    losses = lowers_loss(b, tok, x0, cond, method)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("method", ["softrepa", "agsm"])
def test_sd35_dual_attention_qk_norm_trains(method):
    b = DiffusersBackend(tiny_sd35())
    lay = TokenLayout(arch="sd35", method=method, n_tokens=2, width=32, text_width=32, blocks=(0, 1, 2))
    tok = SoftTokens(lay, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    cond = {"context": torch.randn(3, 6, 32, generator=g), "pooled": torch.randn(3, 16, generator=g)}
    z, t = b.noisy(x0, torch.randn_like(x0), torch.tensor([500] * 3)), torch.tensor([500] * 3)
    assert (b.predict(z, t, cond, tok) - b.predict(z, t, cond, None)).abs().max() > 1e-5  # the tokens act
    losses = lowers_loss(b, tok, x0, cond, method)
    assert losses[-1] < losses[0], losses


# --- single-file checkpoints ----------------------------------------------------------------------

def test_single_file_headers_sd2_sd35_and_v_prediction_sdxl(tmp_path):
    from test_single_file import D, SD3, SDXL, write_header
    from training.single_file import detect_checkpoint_arch

    sd2 = write_header(tmp_path / "sd2.safetensors", {
        D + "input_blocks.0.0.weight": (320, 4, 3, 3), D + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
        (320, 1024), "cond_stage_model.model.ln_final.weight": (1024,)})
    sd35 = write_header(tmp_path / "sd35.safetensors",
                        {**SD3, D + "joint_blocks.0.context_block.attn.ln_q.weight": (64,)})
    xlv = write_header(tmp_path / "xlv.safetensors", {**SDXL, "v_pred": (0,)})
    # through ComfyUI's loader (the CLI's ComfyUI route) they are supported
    assert detect_checkpoint_arch(sd2, comfy=True) == "sd2"
    assert detect_checkpoint_arch(sd35, comfy=True) == "sd35"
    assert detect_checkpoint_arch(xlv, comfy=True) == "sdxl"
    # the diffusers single-file conversion refuses them clearly
    for path, what in [(sd2, "Stable Diffusion 2"), (sd35, "SD3.5"), (xlv, "v-prediction")]:
        with pytest.raises(ValueError, match=what):
            detect_checkpoint_arch(path)
