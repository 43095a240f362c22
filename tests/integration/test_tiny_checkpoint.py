"""Tiny CLIP / VAE / single-file checkpoints built through ComfyUI's own classes (comfy_env.tiny_checkpoint
and friends), driven by ComfyUI's real nodes: CLIPTextEncode, VAEEncode, VAEDecode, KSampler."""

import os

import pytest
import torch

import comfy_env

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture_pack")
CONTEXT = {"sd15": (77, 768), "sd3": (77, 4096)}
POOLED = {"sd15": 768, "sd3": 2048}
LATENT_CHANNELS = {"sd15": 4, "sd3": 16}


def encode(clip, text):
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def all_tensors(model, clip, vae):
    tensors = list(model.model.state_dict().values()) + list(clip.cond_stage_model.state_dict().values())
    return tensors + list(vae.first_stage_model.state_dict().values())


@pytest.fixture(scope="module", params=comfy_env.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def parts(family):
    return comfy_env.tiny_checkpoint(family, seed=0)


def test_comfy_nodes_run_on_tiny_checkpoint(family, parts):
    import nodes
    model, clip, vae = parts
    base = model.model
    assert base.latent_format.latent_channels == LATENT_CHANNELS[family] == vae.latent_channels
    assert vae.spacial_compression_encode() == 8
    with torch.inference_mode():
        pos, neg = encode(clip, "a red cube on a table"), encode(clip, "two blue spheres")
        for cond in (pos, neg):
            assert len(cond) == 1
            assert tuple(cond[0][0].shape) == (1,) + CONTEXT[family]
            assert tuple(cond[0][1]["pooled_output"].shape) == (1, POOLED[family])
        assert (pos[0][0] - neg[0][0]).abs().max() > 0.1
        assert (pos[0][1]["pooled_output"] - neg[0][1]["pooled_output"]).abs().max() > 0.1
        if family == "sd3":  # [CLIP-L 768 | CLIP-G 1280 | zero padding to 4096], as ComfyUI's SD3 pipeline
            assert pos[0][0][..., 2048:].abs().max() == 0 and pos[0][0][..., 768:2048].abs().max() > 0

        pixels = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        (latent,) = nodes.VAEEncode().encode(vae, pixels)
        assert tuple(latent["samples"].shape) == (2, LATENT_CHANNELS[family], 8, 8)
        assert torch.isfinite(latent["samples"]).all() and latent["samples"].std() > 0.01
        (images,) = nodes.VAEDecode().decode(vae, latent)
        assert tuple(images.shape) == (2, 64, 64, 3) and 0 <= images.min() and images.max() <= 1

        (out,) = nodes.common_ksampler(model, 0, 2, 4.0, "euler", "normal", pos, neg, latent, denoise=0.8)
        assert out["samples"].shape == latent["samples"].shape and torch.isfinite(out["samples"]).all()
        (decoded,) = nodes.VAEDecode().decode(vae, out)
        assert tuple(decoded.shape) == (2, 64, 64, 3)

        # The denoiser sees the text: conditioning changes its output.
        x, sigma = torch.randn(1, LATENT_CHANNELS[family], 8, 8), torch.tensor([1.0])
        outs = [base.apply_model(x, sigma, c_crossattn=c[0][0],
                                 y=c[0][1]["pooled_output"] if base.adm_channels else None) for c in (pos, neg)]
        assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_inference_flag(family, parts):
    tensors = all_tensors(*parts)
    assert tensors and all(t.is_inference() for t in tensors)
    plain = comfy_env.tiny_checkpoint(family, seed=0, inference=False)
    plain_tensors = all_tensors(*plain)
    assert not any(t.is_inference() for t in plain_tensors)
    assert len(plain_tensors) == len(tensors) and all(torch.equal(a, b) for a, b in zip(tensors, plain_tensors))
    # As in a real graph, inference-tensor weights cannot take part in autograd; plain ones can.
    x = torch.randn(1, LATENT_CHANNELS[family], 8, 8, requires_grad=True)
    ctx = torch.randn((1,) + CONTEXT[family])
    kw = {"y": torch.zeros(1, POOLED[family])} if family == "sd3" else {}
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        parts[0].model.apply_model(x, torch.tensor([1.0]), c_crossattn=ctx, **kw).sum().backward()
    plain[0].model.apply_model(x, torch.tensor([1.0]), c_crossattn=ctx, **kw).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_seeds_differ(comfy):
    with torch.inference_mode():
        a = encode(comfy.tiny_clip_sd15(seed=0), "a cat")[0][0]
        b = encode(comfy.tiny_clip_sd15(seed=1), "a cat")[0][0]
        assert (a - b).abs().max() > 0.1
        narrow = encode(comfy.tiny_clip_sd15(seed=0, width=64), "a cat")[0][0]
    assert tuple(narrow.shape) == (1, 77, 64)


def test_sd3_text_encoder_variants(comfy):
    with torch.inference_mode():
        l_only = encode(comfy.tiny_clip_sd3(seed=0, hidden_g=None), "a cat")
        assert tuple(l_only[0][0].shape) == (1, 77, 4096) and l_only[0][0][..., 768:].abs().max() == 0
        pooled = l_only[0][1]["pooled_output"]
        assert tuple(pooled.shape) == (1, 2048) and pooled[:, 768:].abs().max() == 0 and pooled[:, :768].abs().max() > 0
        t5 = comfy.tiny_clip_sd3(seed=0, hidden_l=64, hidden_g=64, t5=True)  # small CLIPs: T5 is 4096 wide anyway
        cond = encode(t5, "a cat")
        assert tuple(cond[0][0].shape) == (1, 77 + 77, 4096) and tuple(cond[0][1]["pooled_output"].shape) == (1, 128)
        assert cond[0][0][:, 77:].abs().max() > 0  # T5 tokens
        assert (encode(t5, "a dog")[0][0][:, 77:] - cond[0][0][:, 77:]).abs().max() > 0


def test_taesd_vae(comfy):
    import nodes
    with torch.inference_mode():
        for channels in (4, 16):
            vae = comfy.tiny_vae(seed=0, latent_channels=channels, kind="taesd")
            (latent,) = nodes.VAEEncode().encode(vae, torch.rand(1, 64, 64, 3))
            assert tuple(latent["samples"].shape) == (1, channels, 8, 8)
            assert tuple(nodes.VAEDecode().decode(vae, latent)[0].shape) == (1, 64, 64, 3)


def test_checkpoint_file_roundtrip(family, tmp_path, caplog):
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd
    import nodes
    path = comfy_env.save_tiny_checkpoint(str(tmp_path / "tiny_{}.safetensors".format(family)), family, seed=0)
    assert os.path.getsize(path) < 300e6
    caplog.clear()
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    # Complete file: no "clip missing", "Missing VAE keys" or "not a checkpoint" warnings.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= 30]
    twin = comfy_env.tiny_checkpoint(family, seed=0, loadable=True)
    expected = comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SD3
    assert type(model.model.model_config) is expected
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD) and vae.latent_channels == LATENT_CHANNELS[family]
    assert all(t.is_inference() for t in all_tensors(*twin))
    with torch.inference_mode():
        cond, twin_cond = encode(clip, "a red cube"), encode(twin[1], "a red cube")
        assert tuple(cond[0][0].shape) == (1,) + CONTEXT[family]
        assert tuple(cond[0][1]["pooled_output"].shape) == (1, POOLED[family])
        assert torch.equal(cond[0][0], twin_cond[0][0])
        assert torch.equal(cond[0][1]["pooled_output"], twin_cond[0][1]["pooled_output"])
        assert (encode(clip, "two blue spheres")[0][0] - cond[0][0]).abs().max() > 0.1
        pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
        latent, twin_latent = nodes.VAEEncode().encode(vae, pixels)[0], nodes.VAEEncode().encode(twin[2], pixels)[0]
        assert torch.equal(latent["samples"], twin_latent["samples"])
        x, sigma = torch.randn(1, LATENT_CHANNELS[family], 8, 8), torch.tensor([1.0])
        kw = {"c_crossattn": cond[0][0]}
        if family == "sd3":
            kw["y"] = cond[0][1]["pooled_output"]
        out = model.model.apply_model(x, sigma, **kw)
        assert torch.equal(out, twin[0].model.apply_model(x, sigma, **kw)) and out.abs().max() > 0
        (sampled,) = nodes.common_ksampler(model, 0, 2, 4.0, "euler", "normal", cond, encode(clip, ""), latent)
        assert torch.isfinite(sampled["samples"]).all()


def test_fixture_node_in_process():
    import importlib.util
    spec = importlib.util.spec_from_file_location("soft_tokens_test_fixtures", os.path.join(FIXTURES, "__init__.py"))
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    node = pack.NODE_CLASS_MAPPINGS["SoftTokensTestTinyCheckpoint"]
    assert node.RETURN_TYPES == ("MODEL", "CLIP", "VAE")
    assert node.INPUT_TYPES()["required"]["family"][0] == ["sd15", "sd3"]
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        model, clip, vae = getattr(node(), node.FUNCTION)(family="sd15", seed=3)
        assert tuple(encode(clip, "a cat")[0][0].shape) == (1, 77, 768) and vae.latent_channels == 4
    assert next(model.model.parameters()).is_inference()


@pytest.mark.slow
def test_fixture_node_in_server(comfy_server_factory, tmp_path):
    """SoftTokensTestTinyCheckpoint -> CLIPTextEncode -> KSampler -> VAEDecode -> SaveImage through /prompt."""
    server = comfy_server_factory(packs=[(FIXTURES, "soft_tokens_test_fixtures")])
    assert not server.failed_custom_nodes(), server.log()[-3000:]
    info = server.get("/object_info")["SoftTokensTestTinyCheckpoint"]
    assert info["output"] == ["MODEL", "CLIP", "VAE"]
    assert info["input"]["required"]["family"][0] == list(comfy_env.FAMILIES)
    graph = {
        "1": {"class_type": "SoftTokensTestTinyCheckpoint", "inputs": {"family": "sd3", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red cube"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 2, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "tiny"}},
    }
    entry = server.wait_history(server.post_prompt(graph), timeout=120)
    assert entry["status"]["status_str"] == "success", (entry["status"], server.log()[-3000:])
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1 and os.path.isfile(os.path.join(server.output_dir, images[0]["subfolder"],
                                                            images[0]["filename"]))
