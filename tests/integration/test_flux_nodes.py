"""Flux.1 through the pack's nodes on real ComfyUI: datasets encoded with Flux's CLIP-L + T5 are checked
against the model (pooled width), trained tokens saved by the trainer load in Load Soft Tokens and act
on sampling (strength 0 = none), and a Flux graph with Load Soft Tokens runs through a server's
``POST /prompt``. Training itself (SoftREPA, AGSM) is in test_train_nodes.py (family "flux")."""

import os

import pytest
import torch
from safetensors.torch import load_file

from pack_import import REPO_ROOT, submodule
from test_train_nodes import dirs, infer, load_encode, make_folder, mods, nodes, train  # noqa: F401 (fixtures)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture_pack")


@pytest.fixture(scope="module")
def flux(comfy):
    return comfy.tiny_flux_checkpoint(seed=0)


@pytest.fixture(scope="module")
def pack(comfy):
    return {name: submodule(mod) for name, mod in {
        "layouts": "training.layouts", "tokens": "training.tokens", "formats": "training.formats",
        "backend": "nodes.comfy_backend", "patch": "nodes.patch"}.items()}


def text_cond(clip, text):
    """CONDITIONING as CLIPTextEncode gives it (Flux: T5 cond (1, 256, 4096) + CLIP-L pooled_output)."""
    return infer(lambda: clip.encode_from_tokens_scheduled(clip.tokenize(text)))


def sample(model, pos, neg, steps=3, seed=0):
    import comfy.sample
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", pos, neg, latent, disable_pbar=True,
                                   seed=seed)


def test_flux_needs_pooled_text_of_its_width(comfy, nodes, mods, dirs, flux, pack):  # noqa: F811
    """Flux takes CLIP-L's pooled output through vector_in although ComfyUI gives it adm_channels 0: a dataset
    encoded with SD3's CLIP (also 4096-wide context, 16-channel latents, but pooled 2048) is refused, and the
    backend asks for 'pooled' instead of failing inside ComfyUI."""
    make_folder(dirs, "data", n=6)
    sd3 = comfy.tiny_checkpoint("sd3", seed=0)
    enc3 = load_encode(nodes, sd3)[1].result[0]
    with pytest.raises(ValueError, match="pooled text conditioning is 2048 wide, the model takes 768"):
        enc3.check_model(flux[0])
    load_encode(nodes, flux)[1].result[0].check_model(flux[0])  # its own CLIP fits
    assert pack["patch"].needs_pooled(flux[0]) and flux[0].model.adm_channels == 0
    lay = pack["layouts"].TokenLayout(arch="flux", method="softrepa", n_tokens=4, width=64, text_width=64,
                                      blocks=(0,))
    backend = pack["backend"].ComfyBackend(flux[0], pack["tokens"].SoftTokens(lay))
    with backend.session(), torch.no_grad(), pytest.raises(ValueError, match="pooled"):
        backend.predict(torch.zeros(1, 16, 8, 8), torch.tensor([500.0]), {"context": torch.zeros(1, 256, 4096)})


def test_trained_tokens_load_and_act(nodes, mods, dirs, flux):  # noqa: F811
    model, clip, _ = flux
    make_folder(dirs, "data")
    enc = load_encode(nodes, flux)[1].result[0]
    tokens = train(nodes, model, enc, steps=3, blocks="0-1", learning_rate=0.1).result[1]
    infer(nodes.SaveSoftTokens.execute, tokens, "flux_run")
    assert "flux_run.safetensors" in mods["paths"].list_token_files()
    load = mods["loader"].LoadSoftTokens.execute
    patched, loaded = infer(load, model, "flux_run.safetensors", 1.0, "both").result
    assert loaded.layout.arch == "flux" and torch.equal(loaded.static, tokens.static)
    zero = infer(load, model, "flux_run.safetensors", 0.0, "both").result[0]
    pos, neg = text_cond(clip, "a red circle"), text_cond(clip, "")
    assert pos[0][0].shape == (1, 256, 4096) and pos[0][1]["pooled_output"].shape == (1, 768)
    base = sample(model, pos, neg)
    assert torch.equal(sample(zero, pos, neg), base)
    out = sample(patched, pos, neg)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-5


# --- through a server ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(comfy):
    srv = comfy.start_server(packs=[(REPO_ROOT, "comfyui-soft-tokens"), (FIXTURES, "soft_tokens_test_fixtures")],
                             env={"OMP_NUM_THREADS": "1"})
    yield srv
    comfy.stop_server(srv)


def flux_graph(token_file=None, strength=1.0, prefix="flux"):
    """Tiny Flux dev checkpoint -> CLIPTextEncode -> FluxGuidance -> (Load Soft Tokens) -> KSampler (cfg 1, as Flux
    dev is sampled) -> SaveLatent + VAEDecode -> SaveImage."""
    g = {
        "1": {"class_type": "SoftTokensTestTinyFluxCheckpoint", "inputs": {"variant": "dev", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle on a blue square"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "13": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix}},
    }
    model = ["1", 0]
    if token_file:
        g["7"] = {"class_type": "LoadSoftTokens", "inputs": {"model": model, "token_file": token_file,
                                                             "strength": strength, "apply_to": "both", "blocks": ""}}
        model = ["7", 0]
    g["5"] = {"class_type": "KSampler", "inputs": {"model": model, "positive": ["13", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 4, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    return g


def run(server, g):
    hist = server.wait_history(server.post_prompt(g), timeout=300)
    assert hist["status"]["status_str"] == "success", (hist["status"], server.log()[-3000:])
    assert any(o.get("images") for o in hist["outputs"].values())
    f = [f for o in hist["outputs"].values() for f in o.get("latents", [])][0]
    return load_file(os.path.join(server.output_dir, f["subfolder"], f["filename"]))["latent_tensor"]


def test_server_flux_graph_with_soft_tokens(server, pack):
    assert not server.failed_custom_nodes(), server.log()[-3000:]
    lay = pack["layouts"].TokenLayout(arch="flux", method="softrepa", n_tokens=4, width=64, text_width=64,
                                      blocks=(0, 1))
    tok = pack["tokens"].SoftTokens(lay, generator=torch.Generator().manual_seed(3))
    tok.static.data.mul_(10.0)
    pack["formats"].save_tokens(tok, os.path.join(server.base_dir, "models", "soft_tokens", "tiny_flux.safetensors"))
    base = run(server, flux_graph(prefix="base"))
    tokens = run(server, flux_graph("tiny_flux.safetensors", prefix="tokens"))
    zero = run(server, flux_graph("tiny_flux.safetensors", strength=0.0, prefix="zero"))
    assert base.shape == (1, 16, 8, 8) and torch.isfinite(tokens).all()
    assert (tokens - base).abs().max() > 1e-4
    assert torch.equal(zero, base)
