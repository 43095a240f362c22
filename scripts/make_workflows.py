"""Writes the example workflows in workflows/ (ComfyUI UI format, served as templates). One source for all.

    python scripts/make_workflows.py           # (re)write workflows/*.json
    python scripts/make_workflows.py --check   # exit 1 if a file in workflows/ differs from what this writes

Every graph reads left to right: columns of nodes (loaders, then conditioning and soft tokens, then
sampling, then output), framed by one group per stage, with a Note below the loaders that says which
files the graph expects and where they go. Nodes never overlap: in a column they stack with a gap that
counts the title bar (drawn above a node's position), and every node is at least as large as the
frontend draws it (it would grow a smaller node on load). Every link runs into a column further right,
or down to a node below in the same column. The graphs stay small enough that the frontend opens them
(fit to view) above its zoom threshold for drawing node text on a 1920x1080 screen.

tests/test_example_workflows.py checks the files; tests/integration/test_workflows.py validates them against a
real server and executes them; tests/integration/test_workflows_browser.py opens them in the real frontend.
After a change, also run scripts/workflow_screenshots.py (the templates' thumbnails, workflows/<name>.jpg, and
the README picture).
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "workflows")

TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar sits above a node's pos
COL_GAP = 60  # between columns (groups keep GROUP_PAD of it on each side)
ROW_GAP = 30  # between one node's bottom and the next node's title bar
GROUP_PAD = 12
GROUP_TITLE_H = 46  # a LiteGraph group's title bar (font 24) plus a margin
TOP = GROUP_TITLE_H + GROUP_PAD + TITLE_H  # y of the first node in a column

# Sockets (inputs, outputs) of the node types used here, and the smallest size the ComfyUI frontend
# draws each at (LGraphNode.computeSize(), frontend 1.27). Widget values are given per node.
NODE_TYPES = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], (210, 98)),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], [("MODEL", "MODEL"), ("CLIP", "CLIP")], (210, 126)),
    "ModelSamplingSD3": ([("model", "MODEL")], [("MODEL", "MODEL")], (210, 58)),
    "PrimitiveInt": ([], [("INT", "INT")], (210, 82)),
    "LoadSoftTokens": ([("model", "MODEL")], [("MODEL", "MODEL"), ("soft_tokens", "SOFT_TOKENS")], (210, 150)),
    "ApplySoftTokens": ([("model", "MODEL"), ("soft_tokens", "SOFT_TOKENS")], [("MODEL", "MODEL")], (210, 102)),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], (211, 88)),
    "SoftTokensEncodeWithSubjects": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], (294, 112)),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")], (210, 106)),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")], (210, 106)),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")], (210, 262)),
    "KSamplerStepSelectedRefinement": ([("model", "MODEL"), ("positive", "CONDITIONING"),
                                        ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
                                       [("LATENT", "LATENT")], (278, 430)),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], (140, 46)),
    "ImageStitch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")], (210, 150)),
    "SaveImage": ([("images", "IMAGE")], [], (210, 58)),
    "LoadCaptionedImages": ([], [("images", "CAPTIONED_IMAGES")], (210, 106)),
    "EncodeSoftTokenDataset": ([("images", "CAPTIONED_IMAGES"), ("clip", "CLIP"), ("vae", "VAE")],
                               [("dataset", "SOFT_TOKEN_DATASET")], (211, 66)),
    "TrainSoftTokens": ([("model", "MODEL"), ("dataset", "SOFT_TOKEN_DATASET")],
                        [("MODEL", "MODEL"), ("soft_tokens", "SOFT_TOKENS"), ("history", "LOSS_MAP")], (228, 602)),
    "SaveSoftTokens": ([("soft_tokens", "SOFT_TOKENS")], [], (210, 58)),
    "PlotSoftTokenTraining": ([("history", "LOSS_MAP")], [("IMAGE", "IMAGE")], (189, 26)),
    "SoftTokenAlignmentScore": ([("model", "MODEL"), ("soft_tokens", "SOFT_TOKENS"),
                                 ("dataset", "SOFT_TOKEN_DATASET")], [("report", "STRING")], (213, 146)),
    "Note": ([], [], (210, 88)),
}

# Where users get the checkpoints and LoRA under these (official) names: the frontend offers the
# download when the file is missing (node property "models").
MODEL_URLS = {
    "v1-5-pruned-emaonly.safetensors":
        "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors",
    "sd_xl_base_1.0.safetensors":
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors":
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
        "sd_xl_offset_example-lora_1.0.safetensors",
    "sd3_medium_incl_clips_t5xxlfp8.safetensors":
        "https://huggingface.co/stabilityai/stable-diffusion-3-medium/resolve/main/"
        "sd3_medium_incl_clips_t5xxlfp8.safetensors",
}

COLORS = {"note": ("#432", "#653"), "positive": ("#232", "#353"), "negative": ("#322", "#533"),
          "tokens": ("#223", "#335")}
GROUP_COLORS = {"load": "#3f789e", "condition": "#8A8", "train": "#a1309b", "sample": "#b58b2a",
                "output": "#88A"}


class Graph:
    """Builds one UI-format workflow laid out in columns, left to right.

    col = g.column("group title", "colour key") starts a new column; consecutive columns with the same title
    share one group frame. g.node(type, col, widgets) stacks a node at the bottom of a column, optionally no
    higher than another node or a given y (align=), so that rows line up across columns. Nodes added with
    group=False (the note) stay outside their column's group frame, below it.
    """

    def __init__(self):
        self.nodes, self.links, self.columns = [], [], []

    def column(self, group=None, color="load"):
        self.columns.append({"nodes": [], "bottom": TOP - TITLE_H - ROW_GAP, "group": group, "color": color})
        return len(self.columns) - 1

    def next_y(self, col):
        """The y at which the next node of a column would go."""
        return self.columns[col]["bottom"] + ROW_GAP + TITLE_H

    def node(self, type_, col, widgets=(), title=None, size=None, align=None, color=None, models=(), group=True):
        ins, outs, min_size = NODE_TYPES[type_]
        size = [max(a, b) for a, b in zip(size or min_size, min_size)]
        column = self.columns[col]
        y = self.next_y(col)
        if not group and column["group"] and column["nodes"]:
            y += 2 * GROUP_PAD  # clear the group frame of the nodes above
        if align is not None:  # line up with a node in another column, or a given y
            y = max(y, align if isinstance(align, (int, float)) else align["pos"][1])
        n = {"id": len(self.nodes) + 1, "type": type_, "pos": [0, y], "size": size, "flags": {},
             "order": len(self.nodes), "mode": 0,
             "inputs": [{"name": name, "type": t, "link": None} for name, t in ins],
             "outputs": [{"name": name, "type": t, "links": [], "slot_index": i} for i, (name, t) in enumerate(outs)],
             "properties": {} if type_ == "Note" else {"Node name for S&R": type_},
             "widgets_values": list(widgets)}
        if title:
            n["title"] = title
        if color:
            n["color"], n["bgcolor"] = COLORS[color]
        if models:
            n["properties"]["models"] = [{"name": name, "url": MODEL_URLS[name], "directory": folder}
                                         for name, folder in models]
        n["_col"], n["_group"] = col, group
        column["nodes"].append(n)
        column["bottom"] = y + size[1]
        self.nodes.append(n)
        return n

    def link(self, src, out_slot, dst, in_name, widget=False):
        """Connect src's output out_slot to dst's input in_name (widget=True: a widget turned into an input).

        Links run left to right: into a column further right, or down to a node below in the same column."""
        slots = [i for i, x in enumerate(dst["inputs"]) if x["name"] == in_name]
        if not slots:
            if not widget:
                raise KeyError(f"{dst['type']} has no input {in_name!r}")
            dst["inputs"].append({"name": in_name, "type": src["outputs"][out_slot]["type"],
                                  "widget": {"name": in_name}, "link": None})
            slots = [len(dst["inputs"]) - 1]
        slot = slots[0]
        if dst["inputs"][slot]["link"] is not None:
            raise ValueError(f"{dst['type']}.{in_name} is already linked")
        if src["_col"] > dst["_col"] or (src["_col"] == dst["_col"] and src["pos"][1] >= dst["pos"][1]):
            raise ValueError(f"link {src['type']} -> {dst['type']} does not run left to right")
        link_id = len(self.links) + 1
        t = src["outputs"][out_slot]["type"]
        self.links.append([link_id, src["id"], out_slot, dst["id"], slot, t])
        src["outputs"][out_slot]["links"].append(link_id)
        dst["inputs"][slot]["link"] = link_id

    def to_json(self):
        x = 0
        for column in self.columns:
            width = max(n["size"][0] for n in column["nodes"])
            for n in column["nodes"]:
                n["pos"][0] = x
            column["x"], column["width"] = x, width
            x += width + COL_GAP
        groups = []
        for i, column in enumerate(self.columns):
            title = column["group"]
            if title is None or (i and self.columns[i - 1]["group"] == title):
                continue
            members = [column]
            for later in self.columns[i + 1:]:
                if later["group"] != title:
                    break
                members.append(later)
            nodes = [n for c in members for n in c["nodes"] if n["_group"]]
            top = min(n["pos"][1] for n in nodes) - TITLE_H
            bottom = max(n["pos"][1] + n["size"][1] for n in nodes)
            left, right = members[0]["x"], members[-1]["x"] + members[-1]["width"]
            groups.append({"title": title, "bounding": [left - GROUP_PAD, top - GROUP_PAD - GROUP_TITLE_H,
                                                        right - left + 2 * GROUP_PAD,
                                                        bottom - top + 2 * GROUP_PAD + GROUP_TITLE_H],
                           "color": GROUP_COLORS[column["color"]], "font_size": 24, "flags": {}})
        nodes = [{k: v for k, v in n.items() if not k.startswith("_")} for n in self.nodes]
        return {"last_node_id": len(nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": self.links, "groups": groups, "config": {}, "extra": {}, "version": 0.4}


# --- pieces shared by the graphs ------------------------------------------------------------------

W_LOAD, W_COND, W_SAMPLE, W_OUT = 360, 340, 300, 420
NOTE_CHARS_PER_LINE, NOTE_LINE_H = 54, 12  # the note's textarea at W_LOAD wide (measured in frontend 1.27)


def note(g, col, text):
    """The graph's Note, below the loaders: what it shows and which files go where."""
    text = text.strip()
    lines = sum(max(1, -(-len(par) // NOTE_CHARS_PER_LINE)) for par in text.split("\n"))
    return g.node("Note", col, [text], size=(W_LOAD, 60 + NOTE_LINE_H * lines), color="note", group=False)


def checkpoint(g, col, name):
    return g.node("CheckpointLoaderSimple", col, [name], size=(W_LOAD, 98), models=[(name, "checkpoints")])


def empty_latent(g, col, width, height, sd3=False):
    return g.node("EmptySD3LatentImage" if sd3 else "EmptyLatentImage", col, [width, height, 1], size=(W_LOAD, 106))


def seed_node(g, col, seed=42):
    """One seed for every sampler of the graph (core PrimitiveInt; fixed, change it once)."""
    return g.node("PrimitiveInt", col, [seed, "fixed"], title="seed (all samplers)", size=(W_LOAD, 82))


def prompts(g, col, clip_src, clip_slot, positive, negative="", subjects=None):
    """Positive and negative prompt; subjects= (e.g. "cat, dog"): the positive through CLIP Text Encode (Refinement
    Subjects), which the step-selected refinement needs."""
    if subjects is None:
        pos = g.node("CLIPTextEncode", col, [positive], title="Positive prompt", size=(W_COND, 140), color="positive")
    else:
        pos = g.node("SoftTokensEncodeWithSubjects", col, [positive, subjects], title="Positive prompt and subjects",
                     size=(W_COND, 164), color="positive")
    neg = g.node("CLIPTextEncode", col, [negative], title="Negative prompt", size=(W_COND, 100), color="negative")
    g.link(clip_src, clip_slot, pos, "clip")
    g.link(clip_src, clip_slot, neg, "clip")
    return pos, neg


def load_tokens(g, col, model_src, token_file, strength=1.0):
    load = g.node("LoadSoftTokens", col, [token_file, strength, "both", ""], size=(W_COND, 150), color="tokens")
    g.link(model_src, 0, load, "model")
    return load


# KSampler (Step-Selected Refinement)'s own widgets at their defaults: refine_at (-1: the model's default step),
# iterations, step_size, loss, smoothing, attention_downscale, refine_step (-1: use refine_at).
REFINE_DEFAULTS = (-1.0, 20, 20.0, "cn+iou", True, 4, -1)


def ksampler(g, col, model, pos, neg, latent, settings, seed=None, title=None, align=None, width=W_SAMPLE,
             refine=None):
    """KSampler; settings = (seed, steps, cfg, sampler, scheduler); seed= a PrimitiveInt node shared by samplers;
    refine= the refinement widgets (REFINE_DEFAULTS): KSampler (Step-Selected Refinement) instead."""
    s_seed, steps, cfg, sampler, scheduler = settings
    type_, widgets = "KSampler", [s_seed, "fixed", steps, cfg, sampler, scheduler, 1.0]
    if refine is not None:
        type_, widgets = "KSamplerStepSelectedRefinement", widgets + list(refine)
    ks = g.node(type_, col, widgets, title=title, size=(width, NODE_TYPES[type_][2][1]), align=align)
    g.link(model, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(latent, 0, ks, "latent_image")
    if seed is not None:
        g.link(seed, 0, ks, "seed", widget=True)
    return ks


def decode(g, col, samples, vae_src, align=None, width=210):
    dec = g.node("VAEDecode", col, size=(width, 46), align=align)
    g.link(samples, 0, dec, "samples")
    g.link(vae_src, 2, dec, "vae")
    return dec


def save(g, col, images, prefix, size=(W_OUT, 440), align=None):
    out = g.node("SaveImage", col, [prefix], size=size, align=align)
    g.link(images, 0, out, "images")
    return out


def stitch(g, col, first, second, direction="right", align=None, title=None, width=260):
    """ImageStitch: `second` to the right of (or below) `first`, matched in size, with a 16 px white gap."""
    st = g.node("ImageStitch", col, [direction, True, 16, "white"], size=(width, 150), align=align, title=title)
    g.link(first, 0, st, "image1")
    g.link(second, 0, st, "image2")
    return st


# --- the notes --------------------------------------------------------------------------------------

SOFTREPA = "github.com/softrepa/SoftREPA"
AGSM = "github.com/jaayeon/AGSM"


def files_note(title, body, files, tips=""):
    lines = [title, "", body.strip(), "", "Files this graph expects (refresh the page after adding files):"]
    lines += [f"- {what}" for what in files]
    if tips:
        lines += ["", tips.strip()]
    return "\n".join(lines)


def ckpt_file(name, label):
    return f"{label} checkpoint: ComfyUI/models/checkpoints/{name}"


def official_tokens(folder, release_folder):
    files = "dc_tokens.pth (this release has no dc_t_tokens.pth)" if release_folder == "sdxl" else \
        "dc_tokens.pth and dc_t_tokens.pth"
    return (f"official SoftREPA tokens: ComfyUI/models/soft_tokens/{folder} with {files}, copied from "
            f"tokens/{release_folder}/ of {SOFTREPA}; the folder shows up as one entry '{folder}' in Load Soft Tokens")


STRENGTH_TIP = ("strength 1 is the official behaviour, 0 switches the tokens off (identical to the model "
                "without them); apply_to 'cond_only' keeps them out of the negative (unconditional) branch.")

# --- the workflows ----------------------------------------------------------------------------------

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
SD3 = "sd3_medium_incl_clips_t5xxlfp8.safetensors"
SDXL_LORA = "sd_xl_offset_example-lora_1.0.safetensors"

SD15_PROMPT = "three red apples and a blue cup on a wooden table"
SD15_SETTINGS = (0, 30, 7.0, "ddim", "ddim_uniform")
REFINE_PROMPT, REFINE_SUBJECTS = "a photo of a cat and a dog", "cat, dog"
SDXL_SETTINGS = (0, 30, 7.0, "ddim", "ddim_uniform")
SD3_SETTINGS = (0, 28, 4.0, "euler", "sgm_uniform")


def txt2img(ckpt, token_file, prompt, width, height, settings, note_text, sd3=False, lora=None, prefix="soft_tokens"):
    """Checkpoint [-> LoRA] [-> ModelSamplingSD3] -> Load Soft Tokens -> KSampler -> VAE Decode -> Save Image."""
    g = Graph()
    c_load = g.column("1. Load", "load")
    ckpt_n = checkpoint(g, c_load, ckpt)
    latent = empty_latent(g, c_load, width, height, sd3)
    note(g, c_load, note_text)
    model_src, clip_src = ckpt_n, ckpt_n
    if lora:
        c_lora = g.column("1. Load", "load")
        lora_n = g.node("LoraLoader", c_lora, [lora, 1.0, 1.0], size=(W_COND, 126), models=[(lora, "loras")])
        g.link(ckpt_n, 0, lora_n, "model")
        g.link(ckpt_n, 1, lora_n, "clip")
        model_src, clip_src = lora_n, lora_n
    c_cond = g.column("2. Prompt and soft tokens", "condition")
    if sd3:  # the sampling shift first: the tokens map sigma to t with the model sampling they are applied to
        shift = g.node("ModelSamplingSD3", c_cond, [3.0], size=(W_COND, 58))
        g.link(model_src, 0, shift, "model")
        model_src = shift
    load = load_tokens(g, c_cond, model_src, token_file)
    pos, neg = prompts(g, c_cond, clip_src, 1, prompt)
    c_sample = g.column("3. Sample", "sample")
    ks = ksampler(g, c_sample, load, pos, neg, latent, settings)
    c_out = g.column("4. Decode and save", "output")
    dec = decode(g, c_out, ks, ckpt_n)
    save(g, c_out, dec, prefix)
    return g.to_json()


def sd15():
    return txt2img(SD15, "softrepa-sd1.5/", SD15_PROMPT, 512, 512, SD15_SETTINGS, files_note(
        "Soft tokens on SD1.5 (official SoftREPA tokens)",
        "Load Soft Tokens sits between the checkpoint and the KSampler; the rest is a plain text-to-image graph. "
        "The tokens act on every prompt you write.",
        [ckpt_file(SD15, "SD1.5"), official_tokens("softrepa-sd1.5/", "sd1.5")], STRENGTH_TIP))


def sdxl():
    return txt2img(SDXL, "softrepa-sdxl/", "a cat sitting to the left of a green umbrella", 1024, 1024,
                   SDXL_SETTINGS, files_note(
                       "Soft tokens on SDXL (official SoftREPA tokens)",
                       "Load Soft Tokens sits between the checkpoint and the KSampler. The SDXL release has no "
                       "time table (dc_tokens.pth only) and acts on the down and mid blocks.",
                       [ckpt_file(SDXL, "SDXL base 1.0"), official_tokens("softrepa-sdxl/", "sdxl")], STRENGTH_TIP),
                   prefix="soft_tokens_sdxl")


def sd3():
    return txt2img(SD3, "softrepa-sd3/", "two dogs and one yellow ball on the grass", 1024, 1024, SD3_SETTINGS,
                   files_note(
                       "Soft tokens on SD3 medium (official SoftREPA tokens)",
                       "Load Soft Tokens goes after ModelSamplingSD3 (or straight after the checkpoint). The tokens "
                       "enter the text stream of joint blocks 0-4 and are removed after each block.",
                       [ckpt_file(SD3, "SD3 medium (text encoders included)"),
                        official_tokens("softrepa-sd3/", "sd3")], STRENGTH_TIP),
                   sd3=True, prefix="soft_tokens_sd3")


def agsm_sd15():
    return txt2img(SD15, "agsm-sd1.5/", "a green bench and a red car", 512, 512, SD15_SETTINGS, files_note(
        "Soft tokens on SD1.5 (official AGSM tokens)",
        "The same graph as with SoftREPA tokens: Load Soft Tokens reads an official AGSM folder and uses its "
        "positive tokens (psi+) in both CFG branches, as AGSM does at inference. AGSM's UNet tokens act on the "
        "down and mid blocks.",
        [ckpt_file(SD15, "SD1.5"),
         "official AGSM tokens: ComfyUI/models/soft_tokens/agsm-sd1.5/soft_tokens.pth and soft_t_tokens.pth, "
         f"copied from checkpoints/sd1.5/ of {AGSM}; the folder shows up as one entry 'agsm-sd1.5/'"],
        STRENGTH_TIP), prefix="soft_tokens_agsm")


def lora_sdxl():
    return txt2img(SDXL, "softrepa-sdxl/", "a red lantern on a dark wooden pier at night, three boats", 1024, 1024,
                   SDXL_SETTINGS, files_note(
                       "Soft tokens with a LoRA (SDXL)",
                       "Soft tokens chain with LoRAs and other model patches: the LoRA patches the weights, then "
                       "Load Soft Tokens adds the tokens to the LoRA'd model (the other order works too). Swap in "
                       "any SDXL LoRA, or chain several Load LoRA nodes.",
                       [ckpt_file(SDXL, "SDXL base 1.0"),
                        f"LoRA: ComfyUI/models/loras/{SDXL_LORA} (the offset-noise LoRA released with SDXL)",
                        official_tokens("softrepa-sdxl/", "sdxl")], STRENGTH_TIP),
                   lora=SDXL_LORA, prefix="soft_tokens_lora")


def sd15_shared_seed_loaders(g, note_text):
    """Column 1 of the multi-sampler SD1.5 graphs: checkpoint, a 512 px latent, one shared seed and the Note
    (title, text, closing line) listing the checkpoint and the official SoftREPA tokens."""
    title, text, closing = note_text
    c_load = g.column("1. Load", "load")
    ckpt_n = checkpoint(g, c_load, SD15)
    latent = empty_latent(g, c_load, 512, 512)
    seed = seed_node(g, c_load)
    note(g, c_load, files_note(title, text, [ckpt_file(SD15, "SD1.5"), official_tokens("softrepa-sd1.5/", "sd1.5")],
                               closing))
    return ckpt_n, latent, seed


def side_by_side_sd15(note_parts, prompt, first, second, stitch_title, prefix, subjects=None):
    """Two KSamplers on one prompt, latent and seed, decoded and stitched (left: first, right: second).

    first/second: (use_tokens, title, extra ksampler kwargs); use_tokens picks the model with soft tokens.
    """
    g = Graph()
    ckpt_n, latent, seed = sd15_shared_seed_loaders(g, note_parts)
    c_cond = g.column("2. Prompt and soft tokens", "condition")
    load = load_tokens(g, c_cond, ckpt_n, "softrepa-sd1.5/")
    pos, neg = prompts(g, c_cond, ckpt_n, 1, prompt, **({"subjects": subjects} if subjects else {}))
    c_sample = g.column("3. Sample", "sample")
    samples = [ksampler(g, c_sample, load if tokens else ckpt_n, pos, neg, latent, SD15_SETTINGS, seed=seed,
                        title=title, **extra) for tokens, title, extra in (first, second)]
    c_dec = g.column("3. Sample", "sample")
    decoded = [decode(g, c_dec, s, ckpt_n, align=s, width=160) for s in samples]
    c_out = g.column("4. Side by side", "output")
    grid = stitch(g, c_out, decoded[0], decoded[1], title=stitch_title, width=W_OUT)
    save(g, c_out, grid, prefix, size=(W_OUT, 300))
    return g.to_json()


def compare_sd15():
    """Same prompt, latent and seed through the model with and without tokens, stitched into one image."""
    return side_by_side_sd15((
        "With and without soft tokens, side by side (SD1.5)",
        "One prompt, one empty latent and one seed feed two KSamplers: the top one samples the plain "
        "checkpoint, the bottom one the checkpoint with soft tokens. The saved image shows both: left without "
        "tokens, right with tokens. Change the seed or the prompt once; both samplers follow.",
        "Any token file works here, e.g. your own from the training workflow."), SD15_PROMPT,
        (False, "KSampler: without tokens", {}), (True, "KSampler: with soft tokens", {}),
        "without | with tokens", "soft_tokens_compare")


def refine_sd15():
    """Step-selected refinement next to the plain KSampler (same model, prompt, latent and seed), side by side."""
    return side_by_side_sd15((
        "Step-selected refinement vs the plain KSampler (SD1.5)",
        "One two-subject prompt, one empty latent and one seed feed two samplers on the same model with soft "
        "tokens: the top one is the core KSampler, the bottom one KSampler (Step-Selected Refinement). The "
        "refinement pauses sampling at one step (refine_at -1: the paper's step, 0.16 of the way), nudges the "
        "latent so that each subject gets its own attention peak, and sampling goes on. The saved image shows "
        "both: left the plain KSampler, right with refinement. Change the seed or the prompt once; both samplers "
        "follow.",
        "The positive prompt goes through CLIP Text Encode (Refinement Subjects): list the prompt's subject words "
        "under 'subjects', separated by commas. iterations 0 gives exactly the plain KSampler's image; each "
        "iteration costs one forward and backward pass of the model."), REFINE_PROMPT,
        (True, "KSampler: plain", {}), (True, "KSampler: step-selected refinement", {"refine": REFINE_DEFAULTS}),
        "plain | refined", "soft_tokens_refine", subjects=REFINE_SUBJECTS)


SWEEP = (0.0, 0.5, 1.0, 1.5)


def sweep_sd15():
    """One token file at strengths 0, 0.5, 1 and 1.5 (same prompt, latent and seed) in a 2 x 2 grid."""
    g = Graph()
    ckpt_n, latent, seed = sd15_shared_seed_loaders(g, (
        "Strength sweep (SD1.5)",
        "Load Soft Tokens reads the tokens once; four Apply Soft Tokens nodes put them into the checkpoint at "
        "strength 0, 0.5, 1 and 1.5. Four KSamplers with the same prompt, latent and seed sample one model each, "
        "and the images go into one grid: 0 | 0.5 on top, 1 | 1.5 below. Strength 0 is exactly the model without "
        "tokens; 1 is the official behaviour; above 1 amplifies.",
        "Change a strength on its Apply Soft Tokens node (0 to 3)."))
    c_cond = g.column("2. Prompt and soft tokens", "condition")
    load = load_tokens(g, c_cond, ckpt_n, "softrepa-sd1.5/")
    pos, neg = prompts(g, c_cond, ckpt_n, 1, SD15_PROMPT)
    c_apply = g.column("2. Prompt and soft tokens", "condition")
    c_sample = g.column("3. Sample", "sample")
    c_dec = g.column("3. Sample", "sample")
    decoded = []
    for s in SWEEP:  # one row per strength: Apply Soft Tokens, KSampler and VAE Decode line up
        row = max(g.next_y(c) for c in (c_apply, c_sample, c_dec))
        apply = g.node("ApplySoftTokens", c_apply, [s, "both"], title=f"strength {s:g}", size=(240, 102),
                       color="tokens", align=row)
        g.link(ckpt_n, 0, apply, "model")
        g.link(load, 1, apply, "soft_tokens")
        ks = ksampler(g, c_sample, apply, pos, neg, latent, SD15_SETTINGS, seed=seed, align=apply,
                      title=f"KSampler: strength {s:g}", width=260)
        decoded.append(decode(g, c_dec, ks, ckpt_n, align=ks, width=140))
    c_rows = g.column("4. Grid", "output")
    top = stitch(g, c_rows, decoded[0], decoded[1], align=decoded[0], title="0 | 0.5", width=240)
    bottom = stitch(g, c_rows, decoded[2], decoded[3], align=decoded[2], title="1 | 1.5", width=240)
    c_out = g.column("4. Grid", "output")
    grid = stitch(g, c_out, top, bottom, direction="down", title="grid", width=W_OUT)
    save(g, c_out, grid, "soft_tokens_sweep", size=(W_OUT, 440))
    return g.to_json()


TRAIN_NOTE = files_note(
    "Train soft tokens for your checkpoint, then sample with them (SD1.5)",
    "Load Captioned Images reads a folder of captioned images; Encode Soft-Token Dataset encodes them once (cached "
    "on disk); Train Soft Tokens trains SoftREPA (or AGSM) tokens with a live plot of the loss and the validation "
    "alignment score; Save Soft Tokens writes a named copy; the KSampler samples with the fresh tokens right away. "
    "Cancel keeps a usable partial result.",
    [ckpt_file(SD15, "SD1.5"),
     "training images: a folder ComfyUI/input/my_dataset of images with same-name .txt captions (kohya "
     "'10_name' repeat folders and a .jsonl manifest work too)",
     "written into ComfyUI/models/soft_tokens: my_tokens.safetensors (final), .best.safetensors (best validation "
     "score), .ckpt.pt (pick it under 'resume' to continue), .history.json, and my_tokens_final.safetensors from "
     "Save Soft Tokens"],
    "Start small: 200-500 steps on 100+ images; lower 'chunk' if memory runs out. Check the result on held-out "
    "images with the alignment-score workflow.")


def train_sd15():
    g = Graph()
    c_load = g.column("1. Load and encode", "load")
    ckpt_n = checkpoint(g, c_load, SD15)
    images = g.node("LoadCaptionedImages", c_load, ["my_dataset", 512, "random"], size=(W_LOAD, 140))
    enc = g.node("EncodeSoftTokenDataset", c_load, size=(W_LOAD, 120))
    g.link(images, 0, enc, "images")
    g.link(ckpt_n, 1, enc, "clip")
    g.link(ckpt_n, 2, enc, "vae")
    note(g, c_load, TRAIN_NOTE)
    c_train = g.column("2. Train", "train")
    train = g.node("TrainSoftTokens", c_train,
                   ["softrepa", 500, 4, 16, 0.001, 4, "", "official", "official", 0.07, 4.0, 1.0, -1.0, 0.9999, 42,
                    "auto", False, 0.1, 100, 100, "my_tokens", "none"], size=(300, 720))
    g.link(ckpt_n, 0, train, "model")
    g.link(enc, 0, train, "dataset")
    c_keep = g.column("3. Keep the tokens", "output")
    save_t = g.node("SaveSoftTokens", c_keep, ["my_tokens_final"], size=(300, 110))
    g.link(train, 1, save_t, "soft_tokens")
    plot = g.node("PlotSoftTokenTraining", c_keep, size=(300, 300))
    g.link(train, 2, plot, "history")
    c_cond = g.column("4. Sample with the fresh tokens", "sample")
    pos, neg = prompts(g, c_cond, ckpt_n, 1, SD15_PROMPT)
    latent = empty_latent(g, c_cond, 512, 512)
    c_sample = g.column("4. Sample with the fresh tokens", "sample")
    ks = ksampler(g, c_sample, train, pos, neg, latent, SD15_SETTINGS, width=280)
    c_out = g.column("5. Decode and save", "output")
    dec = decode(g, c_out, ks, ckpt_n)
    save(g, c_out, dec, "soft_tokens_trained", size=(380, 420))
    return g.to_json()


def score_sd15():
    """Alignment score with and without tokens on a held-out folder."""
    g = Graph()
    c_load = g.column("1. Load", "load")
    ckpt_n = checkpoint(g, c_load, SD15)
    images = g.node("LoadCaptionedImages", c_load, ["my_heldout", 512, "first"], size=(W_LOAD, 170))
    note(g, c_load, files_note(
        "Alignment score: base vs soft tokens on held-out images (SD1.5)",
        "Soft Token Alignment Score measures how often each image's own caption explains it best among 'group' "
        "candidates (a diffusion classifier), once without and once with the tokens; chance is 1/group. Use "
        "images the tokens were not trained on. The report shows on the node (and on its 'report' output).",
        [ckpt_file(SD15, "SD1.5"),
         "held-out images: a folder ComfyUI/input/my_heldout with images and same-name .txt captions (at least "
         "'group' images; 64 or more give a steadier score)",
         official_tokens("softrepa-sd1.5/", "sd1.5") + ", or your own token file"],
        "The score node takes the model without tokens; Load Soft Tokens checks that the tokens fit it."))
    c_prep = g.column("2. Encode and load tokens", "condition")
    load = load_tokens(g, c_prep, ckpt_n, "softrepa-sd1.5/")
    enc = g.node("EncodeSoftTokenDataset", c_prep, size=(W_COND, 170), align=images)
    g.link(images, 0, enc, "images")
    g.link(ckpt_n, 1, enc, "clip")
    g.link(ckpt_n, 2, enc, "vae")
    c_score = g.column("3. Score", "output")
    score = g.node("SoftTokenAlignmentScore", c_score, [64, 4, 0], size=(W_OUT, 360))
    g.link(ckpt_n, 0, score, "model")
    g.link(load, 1, score, "soft_tokens")
    g.link(enc, 0, score, "dataset")
    return g.to_json()


# name -> (builder, one line for the README)
WORKFLOWS = {
    "soft_tokens_sd15": (sd15, "SD1.5 with the official SoftREPA tokens"),
    "soft_tokens_sdxl": (sdxl, "SDXL with the official SoftREPA tokens"),
    "soft_tokens_sd3": (sd3, "SD3 medium with the official SoftREPA tokens"),
    "soft_tokens_agsm_sd15": (agsm_sd15, "SD1.5 with the official AGSM tokens"),
    "soft_tokens_compare_sd15": (compare_sd15, "the same prompt and seed with and without tokens, side by side"),
    "soft_tokens_strength_sweep_sd15": (sweep_sd15, "strength 0, 0.5, 1 and 1.5 in one row"),
    "soft_tokens_lora_sdxl": (lora_sdxl, "a LoRA and soft tokens on one model"),
    "soft_tokens_train_sd15": (train_sd15, "train tokens on a captioned folder, save them, sample with them"),
    "soft_tokens_score_sd15": (score_sd15, "alignment score with and without tokens on held-out images"),
    "soft_tokens_refine_sd15": (refine_sd15, "step-selected refinement next to the plain KSampler, side by side"),
}


def build():
    """{name: workflow dict} of every example."""
    return {name: make() for name, (make, _) in WORKFLOWS.items()}


def dumps(workflow) -> str:
    return json.dumps(workflow, indent=1) + "\n"


def main(argv):
    check = "--check" in argv
    os.makedirs(OUT, exist_ok=True)
    stale = []
    for name, wf in build().items():
        path = os.path.join(OUT, name + ".json")
        text = dumps(wf)
        if check:
            if not os.path.isfile(path) or open(path).read() != text:
                stale.append(path)
            continue
        with open(path, "w") as f:
            f.write(text)
        print("wrote", path)
    extra = sorted(f for f in os.listdir(OUT) if f.endswith(".json") and f[:-5] not in WORKFLOWS)
    if extra:
        print("not written by this script (remove or add them here):", ", ".join(extra))
    if check and (stale or extra):
        print("out of date:", ", ".join(stale) or "-")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
