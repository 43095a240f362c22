"""The shipped example workflows on a real ComfyUI server on 127.0.0.1 (one server for the module):

- every workflow passes the validator (scripts/validate_workflow.py) against /object_info, with placeholder model
  files under the names it expects, and uses only our and core node types; the validator rejects broken graphs;
- every workflow executes end to end through POST /prompt, with the checkpoint loader replaced by the fixture
  pack's tiny model of the same family (SD1.5-, SDXL- and SD3-class); outputs exist, /history reports success;
- (test_workflows_browser.py: every workflow opens cleanly in the real frontend.)

Files and swaps: workflow_env.py.
"""

import json
import os
import urllib.request

import numpy as np
import pytest
from PIL import Image

import comfy_env
from workflow_api import ui_to_api, validate_prompt, validate_workflow
from workflow_env import NAMES, PACK_NAME, SDXL_LORA, load, start_workflow_server, tiny_graph

# Executed in this order: workflows of one family share the cached tiny model.
EXECUTED = ["soft_tokens_sd15", "soft_tokens_agsm_sd15", "soft_tokens_compare_sd15", "soft_tokens_strength_sweep_sd15",
            "soft_tokens_refine_sd15", "soft_tokens_score_sd15", "soft_tokens_train_sd15", "soft_tokens_sdxl", "soft_tokens_lora_sdxl",
            "soft_tokens_sd3"]


@pytest.fixture(scope="module")
def server():
    srv = start_workflow_server()
    yield srv
    comfy_env.stop_server(srv)


@pytest.fixture(scope="module")
def info(server):
    assert not server.failed_custom_nodes(), server.log()[-3000:]
    return server.get("/object_info", timeout=60)


# --- validation ---------------------------------------------------------------------------------------------

def test_workflows_are_served_as_templates(server):
    assert sorted(server.get("/api/workflow_templates").get(PACK_NAME, [])) == NAMES
    for name in NAMES:
        assert server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json") == load(name)
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK_NAME}/{name}.jpg") as r:
            assert r.headers["Content-Type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff"  # the thumbnail


@pytest.mark.parametrize("name", NAMES)
def test_workflow_validates(info, name):
    problems = validate_workflow(load(name), info)
    assert not problems, "\n".join(problems)


def test_node_types_are_ours_or_core(info):
    for name in NAMES:
        for node in load(name)["nodes"]:
            if node["type"] in ("Note", "MarkdownNote"):
                continue
            module = info[node["type"]]["python_module"]
            assert module == f"custom_nodes.{PACK_NAME}" or module == "nodes" or module.startswith("comfy_extras."), \
                (name, node["type"], module)


def test_validator_rejects_broken_workflows(info):
    def broken(change):
        wf = load("soft_tokens_sd15")
        change({n["type"]: n for n in wf["nodes"]}, wf)
        return "\n".join(validate_workflow(wf, info))

    def rename(nodes, wf):
        nodes["LoadSoftTokens"]["type"] = "LoadSoftTokensRenamed"

    assert "'LoadSoftTokensRenamed' does not exist on the server" in broken(rename)

    def bogus_combo(nodes, wf):
        nodes["KSampler"]["widgets_values"][4] = "not_a_sampler"

    assert "sampler_name: 'not_a_sampler' is not one of the options" in broken(bogus_combo)

    def missing_file(nodes, wf):
        nodes["LoadSoftTokens"]["widgets_values"][0] = "softrepa-sd2/"

    assert "token_file: 'softrepa-sd2/' is not one of the options" in broken(missing_file)

    def out_of_range(nodes, wf):
        nodes["LoadSoftTokens"]["widgets_values"][1] = 5.0

    assert "strength: 5.0 is above the maximum 3.0" in broken(out_of_range)

    def not_a_number(nodes, wf):
        nodes["KSampler"]["widgets_values"][2] = "thirty"

    assert "steps: 'thirty' is not a number" in broken(not_a_number)

    def widget_count(nodes, wf):
        nodes["KSampler"]["widgets_values"].pop(1)  # the seed's control value

    assert "6 widget values, the server's node has 7" in broken(widget_count)

    def wrong_link(nodes, wf):  # the checkpoint's CLIP output into the sampler's model input
        link = next(l for l in wf["links"] if l[3] == nodes["KSampler"]["id"] and l[4] == 0)
        link[1], link[2], link[5] = nodes["CheckpointLoaderSimple"]["id"], 1, "CLIP"
        nodes["CheckpointLoaderSimple"]["outputs"][1]["links"].append(link[0])

    assert "output 1 gives CLIP, but node" in broken(wrong_link) and "takes MODEL" in broken(wrong_link)

    def unlinked(nodes, wf):
        nodes["KSampler"]["inputs"][0]["link"] = None

    assert "required input 'model' (MODEL) is not connected" in broken(unlinked)
    # the API-format check (what the browser check applies to the frontend's queued graph)
    graph = ui_to_api(load("soft_tokens_sd15"), info)
    assert validate_prompt(graph, info) == []
    next(n for n in graph.values() if n["class_type"] == "KSampler")["inputs"]["sampler_name"] = "not_a_sampler"
    assert any("'not_a_sampler' is not one of the options" in p for p in validate_prompt(graph, info))


# --- execution ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(server, info):
    """run(name, **overrides) -> (history entry, API graph): the workflow executed with tiny models (memoized)."""
    done = {}

    def execute(name, **overrides):
        key = (name, json.dumps(overrides, sort_keys=True))
        if key not in done:
            graph = tiny_graph(load(name), info, **overrides)
            hist = server.wait_history(server.post_prompt(graph), timeout=300)
            assert hist["status"]["status_str"] == "success", (name, hist["status"], server.log()[-3000:])
            done[key] = hist, graph
        return done[key]

    return execute


def saved_images(server, hist, graph, class_type="SaveImage"):
    """[(node id, [H x W x 3 uint8 arrays])] of the given output nodes, read from the output folder."""
    out = []
    for node_id, node in graph.items():
        if node["class_type"] != class_type:
            continue
        files = hist["outputs"].get(node_id, {}).get("images", [])
        assert files, (node_id, class_type, sorted(hist["outputs"]))
        arrays = []
        for f in files:
            path = os.path.join(server.output_dir if f["type"] == "output" else os.path.join(server.base_dir, "temp"),
                                f["subfolder"], f["filename"])
            assert os.path.isfile(path), path
            arrays.append(np.asarray(Image.open(path).convert("RGB")))
        out.append((node_id, arrays))
    return out


def the_image(server, run, name, **overrides):
    """The one saved image of a workflow run (int16, so that differences do not wrap)."""
    hist, graph = run(name, **overrides)
    (_, [image]), = saved_images(server, hist, graph)
    return image.astype(np.int16)


def test_every_workflow_is_executed():
    assert sorted(EXECUTED) == NAMES


@pytest.mark.parametrize("name", EXECUTED)
def test_workflow_executes(server, run, name):
    hist, graph = run(name)
    assert hist["status"]["completed"]
    saved = saved_images(server, hist, graph)
    if name == "soft_tokens_score_sd15":
        assert not saved  # a report, no image
    else:
        assert len(saved) == 1 and saved[0][1][0].shape[2] == 3


def test_compare_puts_both_images_side_by_side(server, run):
    image = the_image(server, run, "soft_tokens_compare_sd15")
    assert image.shape == (64, 64 + 16 + 64, 3)  # without | 16 px gap | with tokens
    without, with_tokens = image[:, :64], image[:, 80:]
    assert (image[:, 64:80] == 255).all()
    assert np.abs(without - with_tokens).max() > 8  # the tokens change the image; same seed, prompt and latent


def test_sweep_is_one_grid_of_four_strengths(server, run):
    image = the_image(server, run, "soft_tokens_strength_sweep_sd15")
    assert image.shape == (144, 144, 3)  # 0 | 0.5 over 1 | 1.5, 16 px gaps
    tiles = [image[:64, :64], image[:64, 80:], image[80:, :64], image[80:, 80:]]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(tiles[i] - tiles[j]).max() > 8, (i, j)
    # strength 0 is the model without tokens: the same image as the comparison's left half (same seed 42)
    without = the_image(server, run, "soft_tokens_compare_sd15")[:, :64]
    assert np.array_equal(tiles[0], without)


def test_refine_puts_plain_and_refined_side_by_side(server, run):
    image = the_image(server, run, "soft_tokens_refine_sd15")
    assert image.shape == (64, 64 + 16 + 64, 3)  # plain KSampler | 16 px gap | step-selected refinement
    plain, refined = image[:, :64], image[:, 80:]
    assert (image[:, 64:80] == 255).all()
    assert np.abs(plain - refined).max() > 8  # the refinement moves the latent; same model, prompt, seed and latent
    # with 0 iterations the refinement sampler is the core KSampler: both halves agree exactly
    off = the_image(server, run, "soft_tokens_refine_sd15", KSamplerStepSelectedRefinement={"iterations": 0})
    assert np.array_equal(off[:, :64], off[:, 80:]) and np.array_equal(off[:, :64], plain)


def test_lora_and_tokens_chain(server, run):
    full = the_image(server, run, "soft_tokens_lora_sdxl")
    lora_off = the_image(server, run, "soft_tokens_lora_sdxl", LoraLoader={"strength_model": 0.0, "strength_clip": 0.0})
    tokens_off = the_image(server, run, "soft_tokens_lora_sdxl", LoadSoftTokens={"strength": 0.0})
    assert np.abs(full - lora_off).max() > 8  # the LoRA acts under the tokens
    assert np.abs(full - tokens_off).max() > 8  # the tokens act on the LoRA'd model
    assert np.abs(lora_off - tokens_off).max() > 8
    assert "lora key not loaded" not in server.log(), [l for l in server.log().splitlines() if "lora key" in l][:5]
    assert os.path.getsize(os.path.join(server.base_dir, "models", "loras", SDXL_LORA)) > 0


def test_training_workflow_trains_saves_and_samples(server, run):
    hist, graph = run("soft_tokens_train_sd15")
    folder = os.path.join(server.base_dir, "models", "soft_tokens")
    for name in ("my_tokens.safetensors", "my_tokens.ckpt.pt", "my_tokens.best.safetensors", "my_tokens.history.json",
                 "my_tokens_final.safetensors"):
        assert os.path.isfile(os.path.join(folder, name)), (name, sorted(os.listdir(folder)))
    texts = [t for o in hist["outputs"].values() for t in o.get("text", [])]
    assert any("done at step 4" in t for t in texts), texts
    assert saved_images(server, hist, graph, "PlotSoftTokenTraining")  # the training plot


def test_score_workflow_reports_with_and_without_tokens(server, run):
    hist, graph = run("soft_tokens_score_sd15")
    texts = [t for o in hist["outputs"].values() for t in o.get("text", [])]
    report = next(t for t in texts if "alignment score" in t)
    assert "with tokens:" in report and "without tokens:" in report, report
