"""The pack inside a real ComfyUI server on 127.0.0.1: node registration, graphs executed through /prompt, and
training from the shipped workflow. The shipped workflows themselves (validation, execution of each) are tested in
test_workflows.py, in the real frontend in test_workflows_browser.py."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from pack_import import REPO_ROOT

REFERENCE = os.path.join(REPO_ROOT, "..", "shared", "reference_tokens", "softrepa")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture_pack")
PACK_NAME = "comfyui-soft-tokens"


@pytest.fixture(scope="module")
def server():
    import comfy_env

    if not os.path.isdir(REFERENCE):
        pytest.skip(f"official reference tokens not found at {REFERENCE}")
    # One thread: on a busy 2-core machine two OpenMP threads make the tiny models many times slower.
    srv = comfy_env.start_server(packs=[(REPO_ROOT, PACK_NAME), (FIXTURES, "soft_tokens_test_fixtures")],
                                 env={"OMP_NUM_THREADS": "1"})
    folder = os.path.join(srv.base_dir, "models", "soft_tokens")
    for arch in ("sd1.5", "sdxl", "sd3"):
        os.symlink(os.path.abspath(os.path.join(REFERENCE, arch)), os.path.join(folder, "softrepa-" + arch))
    yield srv
    comfy_env.stop_server(srv)


def test_pack_loads_and_nodes_are_registered(server):
    assert not server.failed_custom_nodes(), server.log()[-3000:]
    info = server.get("/object_info")
    for node in ("LoadSoftTokens", "ApplySoftTokens", "LoadCaptionedImages", "EncodeSoftTokenDataset",
                 "TrainSoftTokens", "SaveSoftTokens", "SoftTokenAlignmentScore", "PlotSoftTokenTraining"):
        assert node in info, sorted(info)[:20]
    load = info["LoadSoftTokens"]
    assert load["display_name"] == "Load Soft Tokens"
    assert load["output"] == ["MODEL", "SOFT_TOKENS"]
    req = load["input"]["required"]
    assert req["strength"][1]["tooltip"] and req["apply_to"][1]["tooltip"]
    options = req["token_file"][1]["options"] if req["token_file"][0] == "COMBO" else req["token_file"][0]
    # Official folders placed after start show up (one entry each) when the list is refreshed.
    assert {"softrepa-sd1.5/", "softrepa-sdxl/", "softrepa-sd3/"} <= set(options), options


def graph(token_file=None, strength=1.0, apply_to="both", context_dim=768, prefix="t", blocks=""):
    g = {
        "1": {"class_type": "SoftTokensTestTinySD15", "inputs": {"context_dim": context_dim, "seed": 0}},
        "2": {"class_type": "SoftTokensTestConditioning", "inputs": {"width": context_dim, "length": 77, "seed": 1}},
        "3": {"class_type": "SoftTokensTestConditioning", "inputs": {"width": context_dim, "length": 77, "seed": 2}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }
    model = ["1", 0]
    if token_file:
        g["7"] = {"class_type": "LoadSoftTokens", "inputs": {"model": model, "token_file": token_file,
                                                             "strength": strength, "apply_to": apply_to,
                                                             "blocks": blocks}}
        model = ["7", 0]
    g["5"] = {"class_type": "KSampler", "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    return g


def execute(server, g):
    return server.wait_history(server.post_prompt(g), timeout=120)


def saved_latent(server, hist):
    files = [f for out in hist["outputs"].values() for f in out.get("latents", [])]
    assert files, hist
    f = files[0]
    return load_file(os.path.join(server.output_dir, f["subfolder"], f["filename"]))["latent_tensor"]


def test_graphs_execute_through_prompt(server):
    runs = {}
    for name, kw in {"base": {}, "tokens": dict(token_file="softrepa-sd1.5/"),
                     "zero": dict(token_file="softrepa-sd1.5/", strength=0.0),
                     "cond_only": dict(token_file="softrepa-sd1.5/", apply_to="cond_only", strength=0.6),
                     "down_mid": dict(token_file="softrepa-sd1.5/", blocks="down, mid")}.items():
        hist = execute(server, graph(prefix=name, **kw))
        assert hist["status"]["status_str"] == "success", hist["status"]
        runs[name] = saved_latent(server, hist)
    assert torch.equal(runs["zero"], runs["base"])
    assert (runs["tokens"] - runs["base"]).abs().max() > 1e-3
    assert (runs["cond_only"] - runs["tokens"]).abs().max() > 1e-4
    assert (runs["down_mid"] - runs["tokens"]).abs().max() > 1e-4  # the block override acts


def test_mismatched_tokens_fail_before_sampling(server):
    hist = execute(server, graph(token_file="softrepa-sdxl/", prefix="bad"))
    assert hist["status"]["status_str"] == "error"
    errors = [m for m in hist["status"]["messages"] if m[0] == "execution_error"]
    assert errors, hist["status"]
    err = errors[0][1]
    assert err["node_type"] == "LoadSoftTokens"
    assert "2048" in err["exception_message"] and "768" in err["exception_message"]
    assert "5" not in hist["outputs"]  # KSampler never ran


def test_bad_block_override_is_reported(server):
    hist = execute(server, graph(token_file="softrepa-sd1.5/", blocks="sideways", prefix="bad2"))
    assert hist["status"]["status_str"] == "error"
    err = [m for m in hist["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert "block groups" in err["exception_message"]


# --- training from the shipped workflow ----------------------------------------------------------

TRAIN_WORKFLOW = os.path.join(REPO_ROOT, "workflows", "soft_tokens_train_sd15.json")


def training_graph(server, **train_overrides):
    from workflow_api import ui_to_api

    wf = json.load(open(TRAIN_WORKFLOW))
    small = {"TrainSoftTokens": {"steps": 4, "batch": 2, "validation_fraction": 0.34, "validate_every": 2,
                                 "save_every": 2, **train_overrides},
             "LoadCaptionedImages": {"resolution": 64},
             "EmptyLatentImage": {"width": 64, "height": 64},
             "KSampler": {"steps": 2}}
    return ui_to_api(wf, server.get("/object_info"),
                     replace={"CheckpointLoaderSimple": ("SoftTokensTestTinyCheckpoint", {"family": "sd15", "seed": 0})},
                     overrides=small)


def make_dataset(server, n=12):
    from PIL import Image

    folder = os.path.join(server.base_dir, "input", "my_dataset")
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"{i}.png"))
        open(os.path.join(folder, f"{i}.txt"), "w").write(f"a picture number {i % 4}")


def test_training_workflow_runs_through_prompt(server):
    make_dataset(server)
    hist = execute(server, training_graph(server))
    assert hist["status"]["status_str"] == "success", hist["status"]
    folder = os.path.join(server.base_dir, "models", "soft_tokens")
    for name in ("my_tokens.safetensors", "my_tokens.ckpt.pt", "my_tokens.best.safetensors",
                 "my_tokens.history.json", "my_tokens_final.safetensors"):
        assert os.path.isfile(os.path.join(folder, name)), (name, os.listdir(folder))
    outputs = hist["outputs"]
    assert any(o.get("images") for o in outputs.values())  # the sample and the plot
    texts = [t for o in outputs.values() for t in o.get("text", [])]
    assert any("done at step 4" in t for t in texts), texts
    # the fresh files are offered by Load Soft Tokens and for resuming
    info = server.get("/object_info/LoadSoftTokens")["LoadSoftTokens"]["input"]["required"]["token_file"]
    assert "my_tokens_final.safetensors" in (info[1]["options"] if info[0] == "COMBO" else info[0])


def test_training_is_cancelled_through_interrupt(server):
    import time

    make_dataset(server)
    graph = training_graph(server, steps=100000, save_every=1, output_name="cancel_me")
    prompt_id = server.post_prompt(graph)
    ckpt = os.path.join(server.base_dir, "models", "soft_tokens", "cancel_me.ckpt.pt")
    end = time.time() + 120
    while not os.path.exists(ckpt) and time.time() < end:  # training is running once a checkpoint exists
        time.sleep(0.2)
    assert os.path.exists(ckpt), server.log()[-3000:]
    server.post("/interrupt", {})
    hist = server.wait_history(prompt_id, timeout=120)
    assert hist["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in hist["status"]["messages"]), hist["status"]
    from safetensors import safe_open

    path = os.path.join(server.base_dir, "models", "soft_tokens", "cancel_me.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["status"] == "cancelled" and 0 < int(meta["steps"]) < 100000
