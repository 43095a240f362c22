"""A token file trained in the CLI (``python -m training train --model <diffusers pipeline folder>``) loads in
the Load Soft Tokens node and changes the ComfyUI output exactly (1e-4 relative) as it changes the diffusers
output, for the families of issue 14 and Flux.1: SD2.x (v-prediction UNet, context 1024), SD3.5 (MMDiT with
qk-norm and MMDiT-X dual attention) and Flux.1 dev (guidance embedding).

Each family gets one tiny ComfyUI model (tests/comfy_env.py) and a diffusers pipeline folder whose denoiser is
that model converted to diffusers (same weights), with tiny text encoders and VAE of the widths the denoiser
takes. The CLI trains on that folder (diffusers route, 2 steps) straight into models/soft_tokens; the node
loads the file onto the ComfyUI MODEL; the patched model's ``apply_model`` is compared with the diffusers
backend of the same folder, with the same file loaded by ``training.formats.load_tokens``."""

import json
import shutil

import pytest
import torch

from pack_import import submodule

TOL = 1e-4  # the project's equivalence tolerance: never loosen
# Large enough that 2 Adam steps take the tokens well away from their init and they change the output by
# 0.7-70 %: the change itself then agrees to <= 2e-5. (At lr 0.05 the SD2 tokens change the output by only 0.3 %, and
# fp32 round-off of the outputs, ~5e-7 of them, is 2e-4 of that change.)
LR = "0.5"
GUIDANCE = 3.5  # Flux dev: the CLI's default --guidance (FluxPipeline's) and the diffusers backend's default
CAPTIONS = ["a cat", "a dog", "red dog", "a red cat", "cat on a dog", "dog on a cat"]
CASES = [("sd2", "softrepa"), ("sd2", "agsm"), ("sd35", "softrepa"), ("sd35", "agsm"), ("flux", "softrepa"),
         ("flux", "agsm")]

# SD3.5 pipeline (tests/test_encoders.build_pipeline "sd3"): CLIP-L 32 + CLIP-G 48 padded to T5's 128 wide
# context; pooled = the two projections 32 + 40. Flux pipeline (tests/test_flux_cli.build_flux_pipeline): T5 48
# wide, CLIP pooled 24.
SD35_CONTEXT, SD35_POOLED = 128, 72
FLUX_CONTEXT, FLUX_POOLED = 48, 24


@pytest.fixture(scope="module")
def pack(comfy):
    return {"loader": submodule("nodes.loader_nodes"), "paths": submodule("nodes.paths")}


def comfy_model(comfy, family):
    """The tiny ComfyUI MODEL, built under inference mode as a loader node builds it."""
    with torch.inference_mode():
        if family == "sd2":
            return comfy.tiny_sd2(seed=0)  # 768-v: V_PREDICTION, context 1024
        if family == "sd35":  # SD3.5 Medium-class: dual attention in blocks 0-1, qk-norm everywhere
            return comfy.tiny_sd3(seed=0, num_blocks=3, context_dim=SD35_CONTEXT, adm_in_channels=SD35_POOLED,
                                  qk_norm="rms", x_block_self_attn_layers=(0, 1))
        return comfy.tiny_flux(seed=0, overrides={"context_in_dim": FLUX_CONTEXT, "vec_in_dim": FLUX_POOLED})


def tiny_vae(latent_channels, **kw):
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                         norm_num_groups=4, layers_per_block=1, **kw)


def build_pipeline_folder(comfy, model, family, root):
    """A diffusers pipeline folder whose denoiser has the ComfyUI model's weights (VAE /2: size 16 -> 8x8)."""
    if family == "sd2":
        from test_encoders import build_pipeline, clip_tokenizer
        from transformers import CLIPTextConfig, CLIPTextModel

        build_pipeline(root, "sd15")
        tok = clip_tokenizer()
        torch.manual_seed(0)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id))
        shutil.rmtree(root / "text_encoder")
        te.save_pretrained(root / "text_encoder")
        comfy.diffusers_unet(model).save_pretrained(root / "unet")
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"}))
        index = json.loads((root / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "DDIMScheduler"]
        (root / "model_index.json").write_text(json.dumps(index))
    elif family == "sd35":
        from test_encoders import build_pipeline

        build_pipeline(root, "sd3")
        shutil.rmtree(root / "transformer")
        comfy.diffusers_sd3(model).save_pretrained(root / "transformer")
    else:
        from test_flux_cli import CLIP_WIDTH, T5_WIDTH, build_flux_pipeline

        assert (T5_WIDTH, CLIP_WIDTH) == (FLUX_CONTEXT, FLUX_POOLED)
        build_flux_pipeline(root, dev=True)
        for part in ("transformer", "vae"):
            shutil.rmtree(root / part)
        comfy.diffusers_flux(model).save_pretrained(root / "transformer")
        tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159).save_pretrained(root / "vae")  # Flux: 16 channels
    return root


@pytest.fixture(scope="module")
def family_setup(comfy, tmp_path_factory):
    """family -> (ComfyUI MODEL, pipeline folder), built once per family."""
    made = {}

    def get(family):
        if family not in made:
            model = comfy_model(comfy, family)
            made[family] = model, build_pipeline_folder(comfy, model, family,
                                                        tmp_path_factory.mktemp(family) / "pipe")
        return made[family]

    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for i, cap in enumerate(CAPTIONS):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(cap)
    return root


@pytest.fixture
def token_dir(comfy, pack, tmp_path, monkeypatch):
    """ComfyUI's models/soft_tokens in tmp_path, as a fresh install has it."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "soft_tokens", ([], set()))
    pack["paths"].register_folder()
    return pack["paths"].token_folder()


def inputs(family, n=2, seed=0):
    """Random latents (ComfyUI's x, sigma space) and conditioning of the family's widths."""
    g = torch.Generator().manual_seed(seed)
    if family == "sd2":
        return torch.randn(n, 4, 8, 8, generator=g), {"context": torch.randn(n, 77, 1024, generator=g)}
    ctx, pooled = (SD35_CONTEXT, SD35_POOLED) if family == "sd35" else (FLUX_CONTEXT, FLUX_POOLED)
    return (torch.randn(n, 16, 8, 8, generator=g),
            {"context": torch.randn(n, 20, ctx, generator=g), "pooled": torch.randn(n, pooled, generator=g)})


def sigma_of(model, family, t):
    """ComfyUI's sigma for the diffusers backend's timestep t (0..999): the discrete schedule's sigma for the
    v-prediction UNet, t/1000 for the flow models (the backends feed t and t/1000 to SD3 and Flux)."""
    if family == "sd2":
        return model.get_model_object("model_sampling").sigma(torch.tensor(float(t)))
    return torch.tensor(t / 1000.0)


def comfy_denoised(model, family, x, cond, sigma):
    """ComfyUI's denoised output of a (patched) MODEL: BaseModel.apply_model with its transformer_options."""
    n = x.shape[0]
    sigma = sigma.expand(n)
    to = dict(model.model_options.get("transformer_options", {}), sigmas=sigma, cond_or_uncond=[0] * n)
    kw = {"c_crossattn": cond["context"]}
    if "pooled" in cond:
        kw["y"] = cond["pooled"]
    if family == "flux":
        kw["guidance"] = torch.full((n,), GUIDANCE)
    with torch.no_grad():
        return model.model.apply_model(x, sigma, transformer_options=to, **kw)


def diffusers_denoised(model, backend, x, cond, t, sigma, tokens):
    """The diffusers backend's prediction at timestep t, mapped to ComfyUI's denoised output through the
    model's own model_sampling (input scaling and v / flow parametrisation)."""
    ms = model.get_model_object("model_sampling")
    n = x.shape[0]
    sigma = sigma.expand(n)
    with torch.no_grad():
        out = backend.predict(ms.calculate_input(sigma, x), torch.full((n,), float(t)), cond, tokens)
        return ms.calculate_denoised(sigma, out, x)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family, method", CASES)
def test_cli_trained_tokens_change_comfy_exactly_as_diffusers(comfy, pack, family_setup, data, token_dir,
                                                             family, method):
    from training.cli import main as cli_main
    from training.diffusers_backend import DiffusersBackend
    from training.formats import load_tokens, train_config_of

    model, pipe = family_setup(family)
    name = f"{family}_{method}.safetensors"
    args = ["train", "--model", str(pipe), "--data", str(data), "--method", method, "--out", f"{token_dir}/{name}",
            "--steps", "2", "--batch", "2", "--tokens", "2", "--size", "16", "--lr", LR, "--tau", "1.0",
            "--seed", "1", "--val-every", "100", "--no-progress"]
    if family != "sd2":
        args += ["--layers", "2"]  # first 2 joint / double blocks (the tiny models have 3)
    assert cli_main(args) == 0

    file_tokens = load_tokens(f"{token_dir}/{name}")
    assert file_tokens.layout.arch == family and file_tokens.layout.method == method
    assert train_config_of(file_tokens)["steps_done"] == 2
    assert name in pack["paths"].list_token_files()  # the node's dropdown offers it

    with torch.inference_mode():  # as ComfyUI's executor runs a node
        patched, node_tokens = pack["loader"].LoadSoftTokens.execute(model, name, 1.0, "both").result
    assert torch.equal(node_tokens.static, file_tokens.static) and torch.equal(node_tokens.time, file_tokens.time)

    backend = DiffusersBackend.from_local(pipe)
    assert backend.prediction == {"sd2": "v"}.get(family, "flow")
    x, cond = inputs(family)
    for t in (251, 700):
        sigma = sigma_of(model, family, t)
        plain_c = comfy_denoised(model, family, x, cond, sigma)
        tok_c = comfy_denoised(patched, family, x, cond, sigma)
        plain_d = diffusers_denoised(model, backend, x, cond, t, sigma, None)
        tok_d = diffusers_denoised(model, backend, x, cond, t, sigma, file_tokens)
        assert rel(plain_c, plain_d) <= TOL, (t, rel(plain_c, plain_d))
        assert rel(tok_c, tok_d) <= TOL, (t, rel(tok_c, tok_d))
        assert rel(tok_c, plain_c) > 5e-3, (t, rel(tok_c, plain_c))  # the tokens act materially ...
        change_c, change_d = tok_c - plain_c, tok_d - plain_d
        assert rel(change_c, change_d) <= TOL, (t, rel(change_c, change_d))  # ... and the same in both
