"""The example workflows in workflows/ (no ComfyUI needed): they parse, use only our and core node types, carry a
Note naming every file they expect, read left to right without overlapping nodes, and are what
scripts/make_workflows.py writes. tests/integration/test_workflows*.py check them on a real server and frontend."""

import glob
import importlib.util
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
TITLE_H = 30  # the frontend draws a node's title bar above its pos

# Core ComfyUI node types the examples may use (tests/integration/test_workflows.py checks on a real server that
# each comes from ComfyUI itself), and the frontend's own note nodes.
CORE = {"CheckpointLoaderSimple", "LoraLoader", "ModelSamplingSD3", "PrimitiveInt", "CLIPTextEncode",
        "EmptyLatentImage", "EmptySD3LatentImage", "KSampler", "VAEDecode", "ImageStitch", "SaveImage"}
FRONTEND_NOTES = {"Note", "MarkdownNote"}
# Widgets that name a file or folder the user must provide: (node type, widget index).
FILE_WIDGETS = {"CheckpointLoaderSimple": 0, "LoraLoader": 0, "LoadSoftTokens": 0, "LoadCaptionedImages": 0}
OFFICIAL_CHECKPOINTS = {"v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors",
                        "sd3_medium_incl_clips_t5xxlfp8.safetensors"}


def our_node_types():
    """node_id="..." of every node class in nodes/ (read from the source: nodes/ imports ComfyUI)."""
    ids = set()
    for path in glob.glob(os.path.join(ROOT, "nodes", "*.py")):
        ids.update(re.findall(r'node_id="(\w+)"', open(path).read()))
    return ids


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def box(node):
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE_H, w, h + TITLE_H


def overlap(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_every_use_has_an_example():
    names = {os.path.basename(p)[:-5] for p in WORKFLOWS}
    assert {"soft_tokens_sd15", "soft_tokens_sdxl", "soft_tokens_sd3", "soft_tokens_agsm_sd15",
            "soft_tokens_compare_sd15", "soft_tokens_strength_sweep_sd15", "soft_tokens_train_sd15",
            "soft_tokens_score_sd15", "soft_tokens_lora_sdxl", "soft_tokens_refine_sd15"} <= names, names


def test_every_workflow_has_a_thumbnail():
    """ComfyUI's template browser shows workflows/<name>.jpg beside each template (scripts/workflow_screenshots.py)."""
    for path in WORKFLOWS:
        with open(path[:-5] + ".jpg", "rb") as f:
            assert f.read(3) == b"\xff\xd8\xff", path  # a JPEG


def test_files_are_what_make_workflows_writes():
    make = load_script("make_workflows")
    built = make.build()
    assert sorted(built) == sorted(os.path.basename(p)[:-5] for p in WORKFLOWS)
    for name, wf in built.items():
        with open(os.path.join(ROOT, "workflows", name + ".json")) as f:
            assert f.read() == make.dumps(wf), f"{name}.json is stale: run python scripts/make_workflows.py"


@pytest.fixture(params=WORKFLOWS, ids=lambda p: os.path.basename(p)[:-5])
def workflow(request):
    with open(request.param) as f:
        return json.load(f)


def test_parses_as_ui_format(workflow):
    assert isinstance(workflow["nodes"], list) and isinstance(workflow["links"], list)
    assert workflow.get("version") == 0.4
    ids = [n["id"] for n in workflow["nodes"]]
    assert len(ids) == len(set(ids)) and workflow["last_node_id"] >= max(ids)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    link_ids = [l[0] for l in workflow["links"]]
    assert len(link_ids) == len(set(link_ids)) and workflow["last_link_id"] >= max(link_ids)
    for lid, src, src_slot, dst, dst_slot, typ in workflow["links"]:
        assert lid in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[src]["outputs"][src_slot]["type"] == typ
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid
        assert nodes[dst]["inputs"][dst_slot]["type"] == typ


def test_only_our_and_core_node_types(workflow):
    allowed = our_node_types() | CORE | FRONTEND_NOTES
    assert {"LoadSoftTokens", "ApplySoftTokens", "TrainSoftTokens", "SoftTokenAlignmentScore"} <= our_node_types()
    unknown = sorted({n["type"] for n in workflow["nodes"]} - allowed)
    assert not unknown, unknown


def test_has_a_note_naming_every_file_it_expects(workflow):
    notes = [n for n in workflow["nodes"] if n["type"] in FRONTEND_NOTES]
    assert notes, "no Note"
    text = "\n".join(n["widgets_values"][0] for n in notes)
    for n in workflow["nodes"]:
        if n["type"] in FILE_WIDGETS:
            name = n["widgets_values"][FILE_WIDGETS[n["type"]]]
            assert name in text, f"the Note does not mention {name!r} ({n['type']})"
    assert "models/" in text or "input/" in text  # says where the files go


def test_checkpoints_use_official_file_names(workflow):
    for n in workflow["nodes"]:
        if n["type"] in ("CheckpointLoaderSimple", "LoraLoader"):
            name = n["widgets_values"][0]
            if n["type"] == "CheckpointLoaderSimple":
                assert name in OFFICIAL_CHECKPOINTS, name
            models = n["properties"].get("models", [])  # the frontend's download offer when the file is missing
            assert [m["name"] for m in models] == [name], models
            assert all(m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + name)
                       for m in models)


def test_nodes_do_not_overlap(workflow):
    nodes = workflow["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            assert not overlap(box(a), box(b)), (a["id"], a["type"], box(a), b["id"], b["type"], box(b))


def test_reads_left_to_right(workflow):
    """Every link goes to a node further right, or down to a node below in the same column."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for lid, src, _, dst, _, _ in workflow["links"]:
        a, b = nodes[src], nodes[dst]
        right = b["pos"][0] >= a["pos"][0] + a["size"][0]
        below = b["pos"][0] == a["pos"][0] and box(b)[1] >= a["pos"][1] + a["size"][1]
        assert right or below, (lid, a["type"], a["pos"], b["type"], b["pos"])
    # the stages: loaders in the leftmost column, output nodes in the rightmost columns
    xs = {n["type"]: n["pos"][0] for n in workflow["nodes"]}
    if "CheckpointLoaderSimple" in xs:
        assert xs["CheckpointLoaderSimple"] == min(n["pos"][0] for n in workflow["nodes"])
    if "SaveImage" in xs:
        assert xs["SaveImage"] == max(n["pos"][0] for n in workflow["nodes"])


def test_groups_frame_their_nodes_without_overlapping(workflow):
    groups = workflow.get("groups", [])
    for i, g in enumerate(groups):
        for h in groups[i + 1:]:
            assert not overlap(g["bounding"], h["bounding"]), (g["title"], h["title"])
    for n in workflow["nodes"]:
        inside = [g["title"] for g in groups if overlap(g["bounding"], box(n))]
        assert len(inside) <= 1, (n["type"], inside)
        if inside:
            gx, gy, gw, gh = next(g["bounding"] for g in groups if g["title"] == inside[0])
            x, y, w, h = box(n)
            assert gx <= x and x + w <= gx + gw and gy <= y and y + h <= gy + gh, (n["type"], inside[0])
