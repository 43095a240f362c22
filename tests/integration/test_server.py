"""The pack inside a real ComfyUI server on 127.0.0.1: node registration, shipped workflows, and
graphs executed through /prompt."""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from pack_import import REPO_ROOT

REFERENCE = os.path.join(REPO_ROOT, "..", "shared", "reference_tokens", "softrepa")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture_pack")
PACK_NAME = "comfyui-soft-tokens"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def server():
    import comfy_env

    if not os.path.isdir(REFERENCE):
        pytest.skip(f"official reference tokens not found at {REFERENCE}")
    srv = comfy_env.start_server(packs=[(REPO_ROOT, PACK_NAME), (FIXTURES, "soft_tokens_test_fixtures")])
    folder = os.path.join(srv.base_dir, "models", "soft_tokens")
    for arch in ("sd1.5", "sdxl", "sd3"):
        os.symlink(os.path.abspath(os.path.join(REFERENCE, arch)), os.path.join(folder, "softrepa-" + arch))
    yield srv
    comfy_env.stop_server(srv)


def test_pack_loads_and_nodes_are_registered(server):
    assert not server.failed_custom_nodes(), server.log()[-3000:]
    info = server.get("/object_info")
    for node in ("LoadSoftTokens", "ApplySoftTokens"):
        assert node in info, sorted(info)[:20]
    load = info["LoadSoftTokens"]
    assert load["display_name"] == "Load Soft Tokens"
    assert load["output"] == ["MODEL", "SOFT_TOKENS"]
    req = load["input"]["required"]
    assert req["strength"][1]["tooltip"] and req["apply_to"][1]["tooltip"]
    options = req["token_file"][1]["options"] if req["token_file"][0] == "COMBO" else req["token_file"][0]
    # Official folders placed after start show up (one entry each) when the list is refreshed.
    assert {"softrepa-sd1.5/", "softrepa-sdxl/", "softrepa-sd3/"} <= set(options), options


def widget_count(spec):
    """How many widget values a node has in UI format (seeds carry a control_after_generate value)."""
    n = 0
    for section in ("required", "optional"):
        for name, entry in spec["input"].get(section, {}).items():
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                if opts.get("forceInput"):
                    continue
                n += 1 + bool(opts.get("control_after_generate") or name in ("seed", "noise_seed"))
    return n


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO_ROOT, "workflows", "*.json"))))
def test_shipped_workflows_validate(server, path):
    info = server.get("/object_info")
    wf = json.load(open(path))
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        assert n["type"] in info, f"{os.path.basename(path)}: unknown node {n['type']}"
        spec = info[n["type"]]
        assert len(n.get("widgets_values", [])) == widget_count(spec), (n["type"], n.get("widgets_values"))
        known = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for inp in n["inputs"]:
            assert inp["name"] in known, (n["type"], inp["name"])
            if inp["link"] is None:
                assert "optional" in spec["input"] and inp["name"] in spec["input"]["optional"], (n["type"], inp)
        # Combo values for checkpoints and token files depend on the user's files; check ours.
        if n["type"] == "LoadSoftTokens":
            assert n["widgets_values"][2] in known["apply_to"][1]["options"]
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert info[nodes[src]["type"]]["output"][src_slot] == typ
        dst_name = nodes[dst]["inputs"][dst_slot]["name"]
        spec = info[nodes[dst]["type"]]["input"]
        want = {**spec.get("required", {}), **spec.get("optional", {})}[dst_name][0]
        assert want == typ, (nodes[dst]["type"], dst_name, want, typ)


def test_workflows_are_served_as_templates(server):
    templates = server.get("/api/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == ["soft_tokens_sd15", "soft_tokens_sd3", "soft_tokens_sdxl"]


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
