"""Encoders from tiny local diffusers pipeline folders (random weights, hand-made tokenizers).

The reference is diffusers' own ``encode_prompt`` of each pipeline class, run on the same
components: our conditioning must equal it exactly.
"""

import json
import os

import pytest
import torch

from training.encoders import Encoders

PROMPTS = ["a cat", "red dog on a cat"]
CLIP_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
T5_WORDS = ["a", "cat", "dog", "red", "on"]


def clip_tokenizer():
    """A CLIPTokenizer built offline: GPT-2 byte alphabet (alone and as word ends) + a few merges."""
    from transformers import CLIPTokenizer

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    for a, b in CLIP_MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=CLIP_MERGES, model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in T5_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_pipeline(root, arch, t5=True):
    """A diffusers-layout folder with the text side and VAE of ``arch`` (no denoiser weights)."""
    from diffusers import AutoencoderKL
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    tok = clip_tokenizer()

    def clip(cls, width, proj):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                             projection_dim=proj, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        return cls(cfg)

    torch.manual_seed(0)
    parts = {"tokenizer": tok}
    if arch == "sd15":
        parts["text_encoder"] = clip(CLIPTextModel, 32, 32)
    else:
        parts["text_encoder"] = clip(CLIPTextModel if arch == "sdxl" else CLIPTextModelWithProjection, 32, 32)
        parts["tokenizer_2"] = tok
        parts["text_encoder_2"] = clip(CLIPTextModelWithProjection, 48, 40)
    if arch == "sd3" and t5:
        parts["tokenizer_3"] = t5_tokenizer()
        parts["text_encoder_3"] = T5EncoderModel(T5Config(vocab_size=len(parts["tokenizer_3"]), d_model=128, d_kv=8,
                                                          d_ff=64, num_layers=1, num_heads=2))
    index = {"_class_name": {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                             "sd3": "StableDiffusion3Pipeline"}[arch], "vae": ["diffusers", "AutoencoderKL"]}
    for name, obj in parts.items():
        obj.save_pretrained(root / name)
        index[name] = ["transformers", type(obj).__name__]
    if arch == "sd3":
        index.update(text_encoder_3=[None, None], tokenizer_3=[None, None]) if not t5 else None
        index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
        (root / "transformer").mkdir()
        (root / "transformer" / "config.json").write_text(json.dumps({"joint_attention_dim": 128}))
    else:
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16 if arch == "sd3" else 4,
                  norm_num_groups=4, layers_per_block=1,
                  scaling_factor={"sd15": 0.18215, "sdxl": 0.13025, "sd3": 1.5305}[arch],
                  shift_factor=0.0609 if arch == "sd3" else None).save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipes")
    return {arch: build_pipeline(base / arch, arch) for arch in ("sd15", "sdxl", "sd3")} | {
        "sd3_no_t5": build_pipeline(base / "sd3_no_t5", "sd3", t5=False)}


def test_sd15_clip_last_hidden_state(pipes):
    from diffusers import StableDiffusionPipeline

    enc = Encoders.from_pipeline(pipes["sd15"])
    assert enc.arch == "sd15"
    cond = enc.encode_text(PROMPTS)
    assert list(cond) == ["context"] and cond["context"].shape == (2, 77, 32)
    tok, te = enc.parts["tokenizer"], enc.parts["text_encoder"]
    ids = tok(PROMPTS + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert (ids[:, 0] == tok.bos_token_id).all()
    # final LayerNorm applied: last hidden state, not the raw last layer
    out = te(ids[:2], output_hidden_states=True)
    assert torch.equal(cond["context"], out.last_hidden_state)
    assert torch.equal(cond["context"], getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-1]))
    null = enc.null_text()["context"]
    assert torch.equal(null, enc.encode_text([""])["context"])
    # BOS at position 0 sees only itself (causal mask): the same row for every prompt and the null
    assert torch.allclose(cond["context"][0, 0], cond["context"][1, 0], atol=1e-6, rtol=0)
    assert torch.allclose(cond["context"][0, 0], null[0, 0], atol=1e-6, rtol=0)
    pipe = StableDiffusionPipeline(vae=enc.vae, text_encoder=te, tokenizer=tok, unet=None, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref, ref_null = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert torch.equal(cond["context"], ref)
    assert torch.equal(null, pipe.encode_prompt([""], "cpu", 1, False)[0])


def test_sdxl_penultimate_concat_pooled_time_ids_zero_null(pipes):
    from diffusers import StableDiffusionXLPipeline

    enc = Encoders.from_pipeline(pipes["sdxl"], image_size=64)
    cond = enc.encode_text(PROMPTS)
    assert {k: tuple(v.shape) for k, v in cond.items()} == {"context": (2, 77, 80), "text_embeds": (2, 40),
                                                            "time_ids": (2, 6)}
    assert cond["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    p = enc.parts
    pipe = StableDiffusionXLPipeline(vae=enc.vae, text_encoder=p["text_encoder"], tokenizer=p["tokenizer"],
                                     text_encoder_2=p["text_encoder_2"], tokenizer_2=p["tokenizer_2"],
                                     unet=None, scheduler=None)
    ref, ref_neg, ref_pooled, ref_neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu",
                                                                  do_classifier_free_guidance=True)
    assert torch.equal(cond["context"], ref) and torch.equal(cond["text_embeds"], ref_pooled)
    null = enc.null_text()
    assert not null["context"].any() and not null["text_embeds"].any()
    assert null["context"].shape == (1, 77, 80) and torch.equal(null["time_ids"], cond["time_ids"][:1])
    assert torch.equal(null["context"], ref_neg[:1]) and torch.equal(null["text_embeds"], ref_neg_pooled[:1])
    # the second encoder's penultimate layer really is in the context
    ids = p["tokenizer_2"](PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    h2 = p["text_encoder_2"](ids, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(cond["context"][..., 32:], h2)


def test_sd3_clip_t5_context_and_pooled(pipes):
    from diffusers import StableDiffusion3Pipeline

    enc = Encoders.from_pipeline(pipes["sd3"])
    cond = enc.encode_text(PROMPTS)
    assert {k: tuple(v.shape) for k, v in cond.items()} == {"context": (2, 77 + 512, 128), "pooled": (2, 72)}
    assert not cond["context"][:, :77, 80:].any()  # CLIP part zero-padded from 32 + 48 to the T5 width
    assert cond["context"][:, 77:].abs().sum() > 0
    p = enc.parts
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=enc.vae, text_encoder=p["text_encoder"],
                                    tokenizer=p["tokenizer"], text_encoder_2=p["text_encoder_2"],
                                    tokenizer_2=p["tokenizer_2"], text_encoder_3=p["text_encoder_3"],
                                    tokenizer_3=p["tokenizer_3"])
    ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu",
                                               do_classifier_free_guidance=False, max_sequence_length=512)
    assert torch.equal(cond["context"], ref) and torch.equal(cond["pooled"], ref_pooled)
    null = enc.null_text()
    r0, _, rp0, _ = pipe.encode_prompt([""], [""], [""], device="cpu", do_classifier_free_guidance=False,
                                       max_sequence_length=512)
    assert torch.equal(null["context"], r0) and torch.equal(null["pooled"], rp0) and null["pooled"].any()

    short = Encoders.from_pipeline(pipes["sd3"], t5_max_length=16)
    assert short.encode_text(PROMPTS)["context"].shape == (2, 77 + 16, 128)
    assert short.text_identity() != enc.text_identity() and short.image_identity() == enc.image_identity()
    for no_t5 in (Encoders.from_pipeline(pipes["sd3"], use_t5=False, t5_max_length=16),
                  Encoders.from_pipeline(pipes["sd3_no_t5"], t5_max_length=16)):
        c = no_t5.encode_text(PROMPTS)
        assert c["context"].shape == (2, 77 + 16, 128) and not c["context"][:, 77:].any()
        assert torch.equal(c["context"][:, :77], cond["context"][:, :77])
        assert torch.equal(c["pooled"], cond["pooled"])


def test_vae_latents_scale_shift_and_sampling(pipes):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for arch, scale, shift in (("sd15", 0.18215, 0.0), ("sd3", 1.5305, 0.0609)):
        enc = Encoders.from_pipeline(pipes[arch])
        dist = enc.vae.encode(x).latent_dist
        mean, std = enc.image_moments(x)
        assert torch.equal(mean, (dist.mean - shift) * scale) and torch.equal(std, dist.std * scale)
        z = enc.encode_images(x, generator=torch.Generator().manual_seed(1))
        ref = (dist.sample(generator=torch.Generator().manual_seed(1)) - shift) * scale
        assert z.shape == ((2, 4, 8, 8) if arch == "sd15" else (2, 16, 8, 8))
        assert torch.allclose(z, ref, rtol=1e-6, atol=1e-6)  # same draw; float rounding of the rearranged sum
        assert not torch.equal(z, mean)
        enc.sample = False
        assert torch.equal(enc.encode_images(x), mean)


def test_cache_round_trip_with_pipeline_encoders(pipes, tmp_path):
    import numpy as np
    from PIL import Image

    from training.cache import EncodeCache
    from training.datasets import open_dataset

    for i, cap in enumerate(PROMPTS):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(cap)
    ds = open_dataset(tmp_path, size=16)
    enc = Encoders.from_pipeline(pipes["sdxl"], image_size=16)
    batch = next(ds.batches(2, seed=0))
    x0, cond, _ = EncodeCache(enc, root=tmp_path / "cache").batch(ds, batch, torch.Generator().manual_seed(0))
    cache = EncodeCache(enc, root=tmp_path / "cache")
    x1, cond1, _ = cache.batch(ds, batch, torch.Generator().manual_seed(0))
    assert cache.stats["latent_hit"] == 2 and cache.stats["text_hit"] == 2
    assert torch.equal(x0, x1) and all(torch.equal(cond[k], cond1[k]) for k in cond)
    fresh = enc.encode_text(list(batch.captions))
    assert all(torch.equal(cond1[k], fresh[k]) for k in fresh)
    pix, _ = ds.load_pixels(batch)
    mean, _ = enc.image_moments(pix)
    assert x1.shape == mean.shape and not torch.equal(x1, mean)  # sampled from the cached moments


def test_identity_tracks_weights_and_settings(pipes, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    import training.encoders as encoders_mod

    a = Encoders.from_pipeline(pipes["sd15"])
    assert a.identity() == Encoders.from_pipeline(pipes["sd15"]).identity()
    assert a.identity() != Encoders.from_pipeline(pipes["sd15"], dtype=torch.float64).identity()
    assert a.identity() != Encoders.from_pipeline(pipes["sdxl"]).identity()
    copy = shutil.copytree(pipes["sd15"], tmp_path / "copy")
    assert Encoders.from_pipeline(copy).identity() != a.identity()  # another folder, another cache
    # small files are hashed by content: changed text-encoder weights change the text identity only
    w = next((copy / "text_encoder").glob("*.safetensors"))
    c0 = Encoders.from_pipeline(copy)
    sd = load_file(w)
    name = next(iter(sd))
    sd[name] = sd[name] + 1
    save_file(sd, w, metadata={"format": "pt"})
    c1 = Encoders.from_pipeline(copy)
    assert c1.text_identity() != c0.text_identity() and c1.image_identity() == c0.image_identity()
    # large files (weights) by size + mtime
    monkeypatch.setattr(encoders_mod, "_HASH_CONTENT_BELOW", 0)
    v = next((copy / "vae").glob("*.safetensors"))
    c2 = Encoders.from_pipeline(copy)
    st = v.stat()
    os.utime(v, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    c3 = Encoders.from_pipeline(copy)
    assert c3.image_identity() != c2.image_identity() and c3.text_identity() == c2.text_identity()


def test_non_local_or_bad_pipeline_fails_clearly(tmp_path, pipes):
    with pytest.raises(ValueError, match="never downloaded"):
        Encoders.from_pipeline("stabilityai/stable-diffusion-3-medium-diffusers")
    with pytest.raises(ValueError, match="not a local diffusers pipeline"):
        Encoders.from_pipeline(tmp_path)
    with pytest.raises(ValueError, match="unknown architecture"):
        Encoders.from_pipeline(pipes["sd15"], arch="sd9")
    with pytest.raises(ValueError, match="no usable .tokenizer_2. folder, which flux needs"):
        Encoders.from_pipeline(pipes["sd15"], arch="flux")
    with pytest.raises(ValueError, match="no usable .tokenizer_2. folder, which sdxl needs"):
        Encoders.from_pipeline(pipes["sd15"], arch="sdxl")
    with pytest.raises(ValueError, match="not a local AutoencoderKL"):
        Encoders.from_pipeline(pipes["sd15"], vae_path="madebyollin/sdxl-vae-fp16-fix")
    import shutil

    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(pipes["sd15"], tmp_path / "broken")
    w = next((broken / "text_encoder").glob("*.safetensors"))
    sd = load_file(w)
    sd.pop(sorted(k for k in sd if "final_layer_norm" in k)[0])
    save_file(sd, w, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weight"):
        Encoders.from_pipeline(broken)
    enc = Encoders.from_pipeline(pipes["sd15"])
    with pytest.raises(ValueError, match="non-empty list"):
        enc.encode_text([])
    with pytest.raises(ValueError, match=r"\(N,3,H,W\)"):
        enc.encode_images(torch.zeros(3, 16, 16))


def test_callable_encoders():
    enc = Encoders(lambda p: torch.ones(len(p), 5, 7) * len(p[0]), identity="demo-v1")
    cond = enc.encode_text(["ab", "c"])
    assert list(cond) == ["context"] and cond["context"].shape == (2, 5, 7)
    assert torch.equal(enc.null_text()["context"], torch.zeros(1, 5, 7))  # text_fn([""])
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(enc.encode_images(x), x)  # identity latents
    assert enc.identity() == enc.text_identity() == enc.image_identity() == "demo-v1"
    custom = Encoders(lambda p: {"context": torch.zeros(len(p), 1, 2)}, lambda x: x[:, :1],
                      identity="d2", null_fn=lambda: {"context": torch.full((1, 1, 2), 3.0)})
    assert custom.null_text()["context"].eq(3).all() and custom.encode_images(x).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="identity"):
        Encoders(lambda p: torch.zeros(1), identity="")
