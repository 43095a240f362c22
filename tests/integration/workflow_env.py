"""The files the example workflows expect, provided in a test server's base directory, and the swaps that let the
workflows execute with tiny models.

- models/checkpoints: empty placeholders under the official names (only the loaders' combos see them; for
  execution the checkpoint loader is replaced by the fixture pack's tiny model of the same family);
- models/loras: a real tiny LoRA for the tiny SDXL-class model, under the official SDXL offset LoRA's name;
- models/soft_tokens: official-format token folders. softrepa-sd1.5/ and softrepa-sdxl/ link the official reference
  tokens (../shared/reference_tokens, never copied; same-shape random stand-ins when they are missing), which fit
  the tiny SD1.5 (context 768) and SDXL (context 2048) models. softrepa-sd3/ holds SD3-class tokens that fit the
  tiny SD3 (hidden 128, 2 joint blocks; the official ones are 1536 wide, 5 blocks), agsm-sd1.5/ AGSM-format files
  (plain tensors, ALGORITHMS.md 5.2: psi+/psi- (2, 4, 768) and a (100, 768) time table);
- input/my_dataset and input/my_heldout: small captioned image folders.
"""

import glob
import json
import os

import numpy as np
import torch
from PIL import Image

import comfy_env
from pack_import import REPO_ROOT

PACK_NAME = "comfyui-soft-tokens"
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture_pack")
NAMES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO_ROOT, "workflows", "*.json")))
REFERENCE = os.path.join(REPO_ROOT, "..", "shared", "reference_tokens", "softrepa")
CHECKPOINTS = {  # official name -> (fixture node, its inputs): a tiny model of the same family
    "v1-5-pruned-emaonly.safetensors": ("SoftTokensTestTinyCheckpoint", {"family": "sd15", "seed": 0}),
    "sd_xl_base_1.0.safetensors": ("SoftTokensTestTinySDXLCheckpoint", {"seed": 0}),
    "sd3_medium_incl_clips_t5xxlfp8.safetensors": ("SoftTokensTestTinyCheckpoint", {"family": "sd3", "seed": 0}),
}
SDXL_LORA = "sd_xl_offset_example-lora_1.0.safetensors"
# What makes the graphs quick on tiny models (all nodes of a type).
SMALL = {"EmptyLatentImage": {"width": 64, "height": 64}, "EmptySD3LatentImage": {"width": 64, "height": 64},
         "KSampler": {"steps": 2}, "LoadCaptionedImages": {"resolution": 64},
         # the tiny SD1.5-class UNet has cross-attention at latent / 1 and / 2 only (none at latent / 4)
         "KSamplerStepSelectedRefinement": {"steps": 2, "iterations": 2, "attention_downscale": 2},
         "TrainSoftTokens": {"steps": 4, "batch": 2, "validation_fraction": 0.34, "validate_every": 2,
                             "save_every": 2},
         "SoftTokenAlignmentScore": {"pairs": 8}}
CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a yellow star", "a red square", "a blue circle",
            "three red dots", "a green star", "a yellow circle", "a blue triangle", "a green square",
            "two yellow squares"]


def load(name):
    """A shipped workflow (UI format) by name."""
    with open(os.path.join(REPO_ROOT, "workflows", name + ".json")) as f:
        return json.load(f)


def start_workflow_server():
    """A ComfyUI server on 127.0.0.1 with the pack, the test fixture pack and the files the workflows expect."""
    # One thread: on a busy 2-core machine two OpenMP threads make the tiny models many times slower.
    server = comfy_env.start_server(packs=[(REPO_ROOT, PACK_NAME), (FIXTURES, "soft_tokens_test_fixtures")],
                                    env={"OMP_NUM_THREADS": "1"})
    try:
        provide_files(server.base_dir)
    except BaseException:
        comfy_env.stop_server(server)
        raise
    return server


def provide_files(base_dir):
    """Put every file the example workflows name into a server's base directory (see the module docstring)."""
    models = os.path.join(base_dir, "models")
    os.makedirs(os.path.join(models, "checkpoints"), exist_ok=True)
    for name in CHECKPOINTS:
        open(os.path.join(models, "checkpoints", name), "wb").close()
    os.makedirs(os.path.join(models, "loras"), exist_ok=True)
    save_tiny_sdxl_lora(os.path.join(models, "loras", SDXL_LORA))
    tokens = os.path.join(models, "soft_tokens")
    os.makedirs(tokens, exist_ok=True)
    for arch, static, time in (("sd1.5", (4, 768), (100, 768)), ("sdxl", (4, 2048), None)):
        folder = os.path.join(tokens, "softrepa-" + arch)
        if os.path.isdir(os.path.join(REFERENCE, arch)):
            os.symlink(os.path.abspath(os.path.join(REFERENCE, arch)), folder)
        else:
            official_folder(folder, "softrepa", static, time, seed=len(arch))
    official_folder(os.path.join(tokens, "softrepa-sd3"), "softrepa", (2, 4, 128), (100, 2 * 128), seed=3, std=0.5)
    official_folder(os.path.join(tokens, "agsm-sd1.5"), "agsm", (2, 4, 768), (100, 768), seed=4, std=1.0)
    captioned_folder(os.path.join(base_dir, "input", "my_dataset"), 12)
    captioned_folder(os.path.join(base_dir, "input", "my_heldout"), 8, seed=1)


def official_folder(folder, method, static_shape, time_shape, seed, std=0.5):
    """An official-format token folder of plain tensors (torch.save), as the SoftREPA / AGSM releases lay them out."""
    names = {"softrepa": ("dc_tokens.pth", "dc_t_tokens.pth"), "agsm": ("soft_tokens.pth", "soft_t_tokens.pth")}[method]
    os.makedirs(folder)
    g = torch.Generator().manual_seed(seed)
    torch.save(torch.randn(static_shape, generator=g) * std, os.path.join(folder, names[0]))
    if time_shape:
        torch.save(torch.randn(time_shape, generator=g) * 0.1, os.path.join(folder, names[1]))


def save_tiny_sdxl_lora(path, rank=4, seed=0):
    """A LoRA (kohya keys lora_unet_*: lora_down, lora_up, alpha) on every linear layer of the tiny SDXL-class
    UNet's transformer blocks (fixture pack: comfy_env.tiny_sdxl), strong enough to change its samples."""
    from safetensors.torch import save_file

    with torch.inference_mode(False):
        unet = comfy_env.tiny_sdxl(seed=0).model.diffusion_model
        shapes = {k[:-len(".weight")]: v.shape for k, v in unet.state_dict().items()
                  if ".transformer_blocks." in k and k.endswith(".weight") and v.ndim == 2}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (out_f, in_f) in sorted(shapes.items()):
        name = "lora_unet_" + key.replace(".", "_")
        sd[name + ".lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
        sd[name + ".lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.5
        sd[name + ".alpha"] = torch.tensor(float(rank))
    save_file(sd, path)
    return len(shapes)


def captioned_folder(folder, n, seed=0, size=64):
    """n images (a coloured square on a coloured background) with same-name .txt captions."""
    os.makedirs(folder, exist_ok=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        arr = np.zeros((size, size, 3), dtype=np.uint8)
        arr[...] = g.integers(0, 255, 3)
        y, x = g.integers(0, size // 2, 2)
        arr[y:y + size // 3, x:x + size // 3] = g.integers(0, 255, 3)
        Image.fromarray(arr).save(os.path.join(folder, f"img{i:02d}.png"))
        with open(os.path.join(folder, f"img{i:02d}.txt"), "w") as f:
            f.write(CAPTIONS[i % len(CAPTIONS)])


def checkpoint_of(workflow):
    return next(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple")


def tiny_graph(workflow, object_info, **overrides):
    """The API graph of a UI workflow with its checkpoint loader swapped for a tiny model of the same family and
    small sizes (SMALL); overrides={node type: {input: value}} on top."""
    from workflow_api import ui_to_api

    small = {t: dict(v) for t, v in SMALL.items()}
    for t, v in overrides.items():
        small.setdefault(t, {}).update(v)
    return ui_to_api(workflow, object_info, replace={"CheckpointLoaderSimple": CHECKPOINTS[checkpoint_of(workflow)]},
                     overrides=small)
