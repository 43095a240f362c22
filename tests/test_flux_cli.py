"""Flux.1 through the standalone trainer: a tiny diffusers FluxPipeline folder (random weights,
hand-made tokenizers) is encoded exactly as FluxPipeline.encode_prompt does and trained with
``python -m training train --model FOLDER`` (SoftREPA and AGSM, dev and schnell)."""

import json
import math

import pytest
import torch

from test_encoders import clip_tokenizer, t5_tokenizer
from test_single_file import write_header
from training.cli import main as cli_main
from training.encoders import Encoders, detect_arch
from training.formats import load_tokens, train_config_of

PROMPTS = ["a cat", "red dog on a cat"]
T5_WIDTH, CLIP_WIDTH = 48, 24


def build_flux_pipeline(root, dev=True):
    """FluxPipeline.save_pretrained of tiny parts: CLIPTextModel (pooled), T5EncoderModel, Flux transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=CLIP_WIDTH, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=1,
                                 num_heads=2))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
                                         guidance_embeds=dev, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=0.3611, shift_factor=0.1159)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip,
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(root)
    for part in (clip, t5, transformer, vae):
        part.eval()  # built in train mode (T5 dropout); loading gives eval
    return root, pipe


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    base = tmp_path_factory.mktemp("flux")
    return {"dev": build_flux_pipeline(base / "dev", dev=True),
            "schnell": build_flux_pipeline(base / "schnell", dev=False)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("flux_data")
    g = torch.Generator().manual_seed(0)
    for i, cap in enumerate(["a cat", "a dog", "red dog", "a red cat"]):
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(cap)
    return root


@pytest.mark.parametrize("variant,length", [("dev", 512), ("schnell", 256)])
def test_encoding_equals_flux_pipeline(flux, variant, length):
    root, pipe = flux[variant]
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and detect_arch(index, root) == "flux"
    assert detect_arch({"_class_name": "X", "transformer": ["diffusers", "FluxTransformer2DModel"]}) == "flux"
    enc = Encoders.from_pipeline(root)
    assert enc.arch == "flux" and enc.t5_max_length == length  # dev 512, schnell 256
    cond = enc.encode_text(PROMPTS)
    assert set(cond) == {"context", "pooled"}
    assert cond["context"].shape == (2, length, T5_WIDTH) and cond["pooled"].shape == (2, CLIP_WIDTH)
    with torch.no_grad():
        ref, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=length)
    torch.testing.assert_close(cond["context"], ref, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled"], pooled, rtol=0, atol=0)
    short = Encoders.from_pipeline(root, t5_max_length=16)
    assert short.encode_text(PROMPTS)["context"].shape == (2, 16, T5_WIDTH)
    assert short.text_identity() != enc.text_identity()  # the cache key tracks the T5 length


@pytest.mark.parametrize("variant,method,extra", [("dev", "softrepa", ["--guidance", "2.5"]),
                                                  ("schnell", "agsm", [])])
def test_cli_trains_flux_tokens(flux, data, tmp_path, variant, method, extra):
    root, _ = flux[variant]
    out = tmp_path / "flux.safetensors"
    assert cli_main(["train", "--model", str(root), "--data", str(data), "--method", method, "--steps", "2",
                     "--batch", "2", "--tokens", "2", "--layers", "2", "--size", "16", "--out", str(out),
                     "--no-progress", *extra]) == 0
    tok = load_tokens(out)
    lay = tok.layout
    assert lay.arch == "flux" and lay.method == method and lay.blocks == (0, 1) and lay.width == 32
    assert lay.timestep_scale == 1000.0
    hist = json.loads(out.with_name("flux.history.json").read_text())
    losses = [r["loss"] for r in hist["steps"]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    run = train_config_of(tok)
    assert run["model"] == str(root) and run["arch"] == "flux" and run["steps_done"] == 2
    assert run.get("guidance") == (2.5 if variant == "dev" else None)  # schnell has no guidance embedding
    if variant == "dev":
        assert cli_main(["score", "--model", str(root), "--data", str(data), "--tokens", str(out), "--limit", "2",
                         "--group", "2", "--ts", "500", "--size", "16", "--guidance", "2.5"]) == 0


def test_cli_flux_refusals(flux, data, tmp_path, capsys):
    common = ["train", "--data", str(data), "--method", "softrepa", "--out", str(tmp_path / "t.safetensors"),
              "--steps", "1", "--size", "16", "--layers", "2", "--no-progress"]
    assert cli_main(common + ["--model", str(flux["schnell"][0]), "--guidance", "3"]) == 2
    assert "guidance embedding" in capsys.readouterr().err
    flux_file = write_header(tmp_path / "flux1-dev.safetensors", {"double_blocks.0.img_attn.qkv.weight": (9, 3)})
    for backend in ("diffusers", "auto"):  # a diffusion-model-only Flux file: refused, pointing to the nodes
        assert cli_main(common + ["--ckpt", str(flux_file), "--backend", backend]) == 2
        err = capsys.readouterr().err
        assert "Flux" in err and "trainer nodes" in err and "FluxPipeline folder" in err
    assert cli_main(common + ["--model", str(flux["dev"][0]), "--guidance", "3", "--layers", "9"]) == 2
    assert "only 3 joint blocks" in capsys.readouterr().err  # checked before any run file is written
    assert not (tmp_path / "t.safetensors").exists()
    assert not (tmp_path / "t.safetensors").exists()
