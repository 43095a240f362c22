"""Single-file checkpoints without ComfyUI: tiny SD1.5- and SDXL-class checkpoints in the original key layout.

The tiny pipelines (random weights, hand-made tokenizer) are saved in diffusers layout, then their
weights are renamed to the original LDM/SGM names (the inverse of diffusers' converters) and written
as one .safetensors file. Loading that file must give exactly the diffusers models again.
"""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from training.cli import main as cli_main
from training.formats import load_tokens, train_config_of
from training.single_file import ASSETS, detect_checkpoint_arch, load_single_file

PROMPTS = ["a cat", "red dog on a cat"]
RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
OPENCLIP = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def _rename(rest, pairs):
    for new, old in pairs:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(sd, layers):
    """diffusers UNet2DConditionModel names -> model.diffusion_model.* (SD's input/middle/output blocks)."""
    n = layers + 1
    up_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = "0." + _rename(rest, RESNET) if kind == "resnets" else "1." + rest
            new = f"input_blocks.{n * i + j + 1}.{block}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            new = f"input_blocks.{n * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = "0." + _rename(rest, RESNET) if kind == "resnets" else "1." + rest
            new = f"output_blocks.{n * i + j}.{block}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k):
            i = int(m[1])
            new = f"output_blocks.{n * i + layers}.{2 if i in up_attn else 1}.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", k):
            new = f"middle_block.{2 * int(m[1])}.{_rename(m[2], RESNET)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", k):
            new = f"middle_block.1.{m[1]}"
        else:
            module, leaf = k.rsplit(".", 1)
            new = f"{UNET_TOP[module]}.{leaf}"
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(sd, levels):
    """diffusers AutoencoderKL names -> first_stage_model.* (decoder levels reversed, conv attention)."""
    attn = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
    out = {}
    for k, v in sd.items():
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            k = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", k):
            k = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            k = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k):
            k = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k):
            k = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", k):
            k = f"{m[1]}.mid.attn_1.{_rename(m[2], attn)}"
            if v.ndim == 2:  # the original VAE attention uses 1x1 convolutions
                v = v[:, :, None, None]
        out["first_stage_model." + k] = v
    return out


def clip_to_openclip(sd):
    """transformers CLIPTextModelWithProjection names -> OpenCLIP (SDXL's conditioner.embedders.1.model.*)."""
    out, qkv = {}, {}
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k):
            out[f"transformer.resblocks.{m[1]}.{_rename(m[2], OPENCLIP)}"] = v
        else:
            out[{"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding", "final_layer_norm.weight":
                 "ln_final.weight", "final_layer_norm.bias": "ln_final.bias", "text_projection.weight":
                 "text_projection"}[k]] = v.T if k == "text_projection.weight" else v
    for (i, kind), p in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([p["q"], p["k"], p["v"]])
    return out


def tiny_unet(arch):
    """A UNet with the block structure of SD1.5 (3 cross-attention levels + 1 plain) or SDXL, at tiny width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    if arch == "sd15":
        kw = dict(block_out_channels=(8, 16, 16, 16), cross_attention_dim=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    else:  # context 32 + 48 (CLIP-L || CLIP-G), pooled 40 + 6 time ids x 8
        kw = dict(block_out_channels=(8, 16, 16), cross_attention_dim=80, transformer_layers_per_block=(1, 1, 2),
                  down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=88)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=4,
                                attention_head_dim=2, **kw).eval()


def write_checkpoint(pipe, out, arch="sd15", parts=("unet", "vae", "text_encoder", "text_encoder_2")):
    """The pipeline's weights as one original-layout .safetensors file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    state = {}
    if "unet" in parts:
        unet = UNet2DConditionModel.from_pretrained(pipe / "unet")
        state.update(unet_to_ldm(unet.state_dict(), unet.config.layers_per_block))
    if "vae" in parts:
        vae = AutoencoderKL.from_pretrained(pipe / "vae")
        state.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    if "text_encoder" in parts:
        prefix = "cond_stage_model.transformer." if arch == "sd15" else "conditioner.embedders.0.transformer."
        te = CLIPTextModel.from_pretrained(pipe / "text_encoder")
        state.update({prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v
                      for k, v in te.state_dict().items()})
    if arch == "sdxl" and "text_encoder_2" in parts:
        te = CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder_2")
        state.update({"conditioner.embedders.1.model." + k: v for k, v in clip_to_openclip(te.state_dict()).items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def tiny_checkpoint(base, arch):
    """(diffusers pipeline folder, weight-free config folder, single-file checkpoint) of a tiny ``arch`` model."""
    from test_encoders import build_pipeline

    pipe = build_pipeline(base / "pipe", arch)
    tiny_unet(arch).save_pretrained(pipe / "unet")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
         "num_train_timesteps": 1000, "prediction_type": "epsilon"}))
    config = base / "config"
    shutil.copytree(pipe, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return pipe, config, write_checkpoint(pipe, base / f"tiny_{arch}.safetensors", arch)


def write_header(path, shapes):
    """A .safetensors file with these keys and shapes (zeros): enough for header-only checks."""
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("sd15"), "sd15")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    caps = ["a cat", "a dog", "red dog", "a red cat", "cat on a dog", "dog on a cat", "red cat", "a red dog"]
    for i, cap in enumerate(caps):
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(cap)
    return root


# --- architecture detection ----------------------------------------------------------------

D = "model.diffusion_model."
SD15 = {D + "input_blocks.0.0.weight": (320, 4, 3, 3), D + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
        (320, 768), "first_stage_model.encoder.conv_out.weight": (8, 4, 1, 1),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}
SDXL = {D + "input_blocks.0.0.weight": (320, 4, 3, 3), D + "label_emb.0.0.weight": (1280, 2816),
        D + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        "first_stage_model.encoder.conv_out.weight": (8, 4, 1, 1),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.ln_final.weight": (1280,)}
SD3 = {D + "x_embedder.proj.weight": (1536, 16, 2, 2), "first_stage_model.encoder.conv_out.weight": (32, 4, 1, 1),
       "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (768,),
       "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": (1280,),
       **{D + f"joint_blocks.{i}.context_block.adaLN_modulation.1.bias": (1,) for i in range(24)}}


def test_detects_the_architecture_from_the_header(tiny, tmp_path):
    assert detect_checkpoint_arch(tiny[2]) == "sd15"
    assert detect_checkpoint_arch(write_header(tmp_path / "sd15.safetensors", SD15)) == "sd15"
    assert detect_checkpoint_arch(write_header(tmp_path / "sdxl.safetensors", SDXL)) == "sdxl"
    assert detect_checkpoint_arch(write_header(tmp_path / "sd3.safetensors", SD3)) == "sd3"


@pytest.mark.parametrize("shapes, what", [
    ({D + "double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "Flux"),
    ({D + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
      "cond_stage_model.model.ln_final.weight": (1024,)}, "Stable Diffusion 2"),
    ({**SDXL, D + "input_blocks.0.0.weight": (320, 9, 3, 3)}, "9 input channels"),
    ({**SD15, "v_pred": (1,)}, "v-prediction"),
    ({"lora_unet_down_blocks_0.alpha": (1,)}, "LoRA"),
    ({"foo": (1,)}, "unknown architecture"),
])
def test_unknown_checkpoints_fail_clearly(tmp_path, shapes, what):
    path = write_header(tmp_path / "odd.safetensors", shapes)
    with pytest.raises(ValueError, match=what) as e:
        detect_checkpoint_arch(path)
    assert str(path) in str(e.value)


def test_bad_files_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_single_file(tmp_path / "nope.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        load_single_file(tmp_path / "model.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a header")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_single_file(tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="unknown architecture"):
        load_single_file(write_header(tmp_path / "flux.safetensors", {D + "double_blocks.0.x": (1,)}))


@pytest.mark.parametrize("arch, shapes", [("sd15", SD15), ("sdxl", SDXL), ("sd3", SD3)])
def test_shipped_configs_fit_and_ask_for_tokenizers(tmp_path, arch, shapes):
    """Checkpoints of the shipped architectures pass the config checks and stop at the missing vocabularies."""
    path = write_header(tmp_path / f"{arch}.safetensors", shapes)
    with pytest.raises(ValueError, match="--config") as e:
        load_single_file(path)
    assert "tokenizer" in str(e.value) and str(ASSETS / arch) in str(e.value)


def test_other_variants_do_not_fit_the_shipped_configs(tmp_path):
    sd35 = {**SD3, D + "joint_blocks.0.x_block.attn2.qkv.weight": (1,)}  # SD3.5 medium: dual attention
    with pytest.raises(ValueError, match="does not fit the configs shipped for SD3 medium.*dual-attention"):
        load_single_file(write_header(tmp_path / "sd35.safetensors", sd35))
    with pytest.raises(ValueError, match="cross-attention width: file 32, config 768"):
        load_single_file(write_header(tmp_path / "t.safetensors", {
            **SD15, D + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 32)}))


def test_config_folder_checks(tiny, tmp_path):
    pipe, config, ckpt = tiny
    with pytest.raises(ValueError, match="not a local diffusers pipeline folder"):
        load_single_file(ckpt, config=tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline", "unet": [], "text_encoder": [], "text_encoder_2": []}))
    with pytest.raises(ValueError, match="is a sdxl pipeline but the checkpoint is sd15"):
        load_single_file(ckpt, config=tmp_path)
    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(config, no_vocab, ignore=shutil.ignore_patterns("vocab.json", "merges.txt", "tokenizer.json"))
    with pytest.raises(ValueError, match="no tokenizer vocabulary in tokenizer/"):
        load_single_file(ckpt, config=no_vocab)


# --- loading ---------------------------------------------------------------------------------

def test_load_equals_the_diffusers_pipeline(tiny):
    from diffusers import UNet2DConditionModel

    from training.diffusers_backend import DiffusersBackend, schedule_from_folder
    from training.encoders import Encoders

    pipe, config, ckpt = tiny
    backend, enc, arch = load_single_file(ckpt, config=config, image_size=32)
    assert arch == "sd15" and isinstance(backend, DiffusersBackend)
    ref = DiffusersBackend(UNet2DConditionModel.from_pretrained(pipe / "unet"),
                           alphas_cumprod=schedule_from_folder(pipe))
    assert torch.equal(backend.alphas_cumprod, ref.alphas_cumprod)  # the config's (linear) schedule
    ref_enc = Encoders.from_pipeline(pipe, image_size=32)
    cond, ref_cond = enc.encode_text(PROMPTS), ref_enc.encode_text(PROMPTS)
    assert cond.keys() == ref_cond.keys() == {"context"}
    assert torch.equal(cond["context"], ref_cond["context"])
    assert torch.equal(enc.null_text()["context"], ref_enc.null_text()["context"])
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    for a, b in zip(enc.image_moments(px), ref_enc.image_moments(px)):
        assert torch.equal(a, b)
    assert enc.scaling_factor == ref_enc.scaling_factor
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])
    assert torch.equal(backend.predict(z, t, cond, None), ref.predict(z, t, ref_cond, None))
    again = load_single_file(ckpt, config=config, image_size=32)[1]
    assert again.identity() == enc.identity() != ref_enc.identity()


def test_sdxl_load_equals_the_diffusers_pipeline(tmp_path):
    from diffusers import UNet2DConditionModel

    from training.diffusers_backend import DiffusersBackend
    from training.encoders import Encoders

    pipe, config, ckpt = tiny_checkpoint(tmp_path, "sdxl")
    assert detect_checkpoint_arch(ckpt) == "sdxl"
    backend, enc, arch = load_single_file(ckpt, config=config, image_size=32)
    assert arch == "sdxl" and backend.sdxl
    cond, ref_cond = enc.encode_text(PROMPTS), Encoders.from_pipeline(pipe, image_size=32).encode_text(PROMPTS)
    assert cond.keys() == ref_cond.keys() == {"context", "text_embeds", "time_ids"}
    for k in cond:  # CLIP-L || OpenCLIP-G penultimate, projected pooled G, time ids
        assert torch.equal(cond[k], ref_cond[k]), k
    ref = DiffusersBackend(UNet2DConditionModel.from_pretrained(pipe / "unet"))
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    assert torch.equal(backend.predict(z, t, cond, None), ref.predict(z, t, ref_cond, None))


def test_sd3_text_side_equals_the_diffusers_pipeline(tmp_path):
    """CLIP-L (identity projection, as single files have none), CLIP-G and T5 from text_encoders.*."""
    from diffusers import AutoencoderKL
    from test_encoders import build_pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from training.encoders import Encoders, _load_tokenizer
    from training.single_file import SingleFileEncoders, _plan

    pipe = build_pipeline(tmp_path / "pipe", "sd3")
    clip_l = CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder")
    clip_l.text_projection.weight.data = torch.eye(clip_l.config.hidden_size)
    clip_l.save_pretrained(pipe / "text_encoder")
    state = {D + "joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)}  # the denoiser is not loaded here
    state.update(vae_to_ldm(AutoencoderKL.from_pretrained(pipe / "vae").state_dict(), 2))
    for part, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        sd = CLIPTextModelWithProjection.from_pretrained(pipe / part).state_dict()
        state.update({f"text_encoders.{name}.transformer.{k}": v for k, v in sd.items()
                      if not (name == "clip_l" and k == "text_projection.weight")})
    sd = T5EncoderModel.from_pretrained(pipe / "text_encoder_3").state_dict()
    state.update({"text_encoders.t5xxl.transformer." + k: v for k, v in sd.items()
                  if k != "encoder.embed_tokens.weight"})  # tied to shared.weight
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sd3.safetensors"))
    config = tmp_path / "config"
    shutil.copytree(pipe, config, ignore=shutil.ignore_patterns("*.safetensors"))

    plan = _plan(tmp_path / "sd3.safetensors", config, "sd3")
    assert plan.tokenizers == ["tokenizer", "tokenizer_2", "tokenizer_3"]
    enc = SingleFileEncoders(plan, {t: _load_tokenizer(plan.root, t, plan.index) for t in plan.tokenizers})
    cond, ref = enc.encode_text(PROMPTS), Encoders.from_pipeline(pipe).encode_text(PROMPTS)
    assert cond.keys() == ref.keys() == {"context", "pooled"}
    for k in cond:
        assert torch.equal(cond[k], ref[k]), k
    assert enc.shift_factor == 0.0609


def test_parts_missing_from_the_file_come_from_the_config_folder(tiny, tmp_path):
    pipe, config, _ = tiny
    ckpt = write_checkpoint(pipe, tmp_path / "no_vae.safetensors", parts=("unet", "text_encoder"))
    with pytest.raises(ValueError, match="vae is not in the file nor in"):
        load_single_file(ckpt, config=config)
    _, enc, _ = load_single_file(ckpt, config=pipe)  # pipe holds the VAE weights
    assert enc.vae.config.scaling_factor == 0.18215


# --- command line ----------------------------------------------------------------------------

def test_cli_trains_on_a_single_file_checkpoint(tiny, data, tmp_path, capsys):
    _, config, ckpt = tiny
    out = tmp_path / "X.safetensors"
    assert cli_main(["train", "--ckpt", str(ckpt), "--config", str(config), "--data", str(data), "--method",
                     "softrepa", "--steps", "2", "--batch", "2", "--size", "32", "--out", str(out),
                     "--no-progress"]) == 0
    tok = load_tokens(out)
    assert tok.layout.arch == "sd15" and tok.layout.width == 32
    run = train_config_of(tok)
    assert run["ckpt"] == str(ckpt) and "model" not in run and run["steps_done"] == 2
    assert cli_main(["score", "--ckpt", str(ckpt), "--config", str(config), "--data", str(data), "--tokens",
                     str(out), "--limit", "4", "--group", "2", "--ts", "500", "--size", "32"]) == 0
    assert "with tokens" in capsys.readouterr().out


def test_cli_source_errors(tiny, data, tmp_path, capsys):
    pipe, config, ckpt = tiny
    common = ["train", "--data", str(data), "--method", "softrepa", "--out", str(tmp_path / "t.safetensors"),
              "--backend", "diffusers"]  # the fallback without ComfyUI, also where COMFYUI_PATH is set
    for bad in ([], ["--model", str(pipe), "--ckpt", str(ckpt)]):  # neither / both
        with pytest.raises(SystemExit):
            cli_main(common + bad)
    assert "--ckpt" in capsys.readouterr().err
    cases = [(["--ckpt", str(tmp_path / "nope.safetensors")], "does not exist"),
             (["--ckpt", str(pipe / "model_index.json")], "not a .safetensors file"),
             (["--ckpt", str(write_header(tmp_path / "f.safetensors", {D + "double_blocks.0.x": (1,)}))], "Flux"),
             (["--ckpt", str(write_header(tmp_path / "sd15.safetensors", SD15))], "no tokenizer vocabularies"),
             (["--model", str(pipe), "--config", str(config)], "only applies to --ckpt")]
    for args, message in cases:
        assert cli_main(common + args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()
