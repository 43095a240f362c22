"""Writes the example workflows in workflows/ (ComfyUI UI format). Run after changing a node's inputs.

    python scripts/make_workflows.py
"""

import json
import os

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")


class Graph:
    """A tiny builder for UI-format workflow JSON."""

    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, pos, widgets=(), inputs=(), outputs=(), size=(320, 130)):
        n = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
             "order": len(self.nodes), "mode": 0,
             "inputs": [{"name": name, "type": t, "link": None} for name, t in inputs],
             "outputs": [{"name": name, "type": t, "links": [], "slot_index": i} for i, (name, t) in enumerate(outputs)],
             "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        self.nodes.append(n)
        return n

    def link(self, src, out_slot, dst, in_name):
        slot = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == in_name)
        link_id = len(self.links) + 1
        t = src["outputs"][out_slot]["type"]
        self.links.append([link_id, src["id"], out_slot, dst["id"], slot, t])
        src["outputs"][out_slot]["links"].append(link_id)
        dst["inputs"][slot]["link"] = link_id

    def to_json(self):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def txt2img(ckpt, token_file, prompt, width, height, steps, cfg, sampler, scheduler, sd3=False):
    g = Graph()
    ckpt_n = g.node("CheckpointLoaderSimple", (20, 200), [ckpt],
                    outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], size=(320, 100))
    model_src = ckpt_n
    if sd3:
        shift = g.node("ModelSamplingSD3", (20, 40), [3.0], inputs=[("model", "MODEL")],
                       outputs=[("MODEL", "MODEL")], size=(320, 60))
        g.link(ckpt_n, 0, shift, "model")
        model_src = shift
    load = g.node("LoadSoftTokens", (380, 40), [token_file, 1.0, "both", ""], inputs=[("model", "MODEL")],
                  outputs=[("MODEL", "MODEL"), ("soft_tokens", "SOFT_TOKENS")])
    g.link(model_src, 0, load, "model")
    pos = g.node("CLIPTextEncode", (380, 220), [prompt], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], size=(400, 160))
    neg = g.node("CLIPTextEncode", (380, 420), [""], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], size=(400, 160))
    g.link(ckpt_n, 1, pos, "clip")
    g.link(ckpt_n, 1, neg, "clip")
    latent = g.node("EmptySD3LatentImage" if sd3 else "EmptyLatentImage", (20, 420), [width, height, 1],
                    outputs=[("LATENT", "LATENT")], size=(320, 110))
    sample_and_save(g, (820, 40), (1180, 40), (1180, 140), load, pos, neg, latent, ckpt_n,
                    [0, "fixed", steps, cfg, sampler, scheduler, 1.0], "soft_tokens")
    return g.to_json()


def sample_and_save(g, ks_pos, dec_pos, save_pos, model, pos, neg, latent, ckpt, ks_widgets, prefix):
    """KSampler (model output 0, conditionings, latent) -> VAEDecode (the checkpoint's VAE) -> SaveImage."""
    ks = g.node("KSampler", ks_pos, ks_widgets,
                inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")], size=(320, 270))
    g.link(model, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(latent, 0, ks, "latent_image")
    dec = g.node("VAEDecode", dec_pos, inputs=[("samples", "LATENT"), ("vae", "VAE")],
                 outputs=[("IMAGE", "IMAGE")], size=(220, 50))
    g.link(ks, 0, dec, "samples")
    g.link(ckpt, 2, dec, "vae")
    save = g.node("SaveImage", save_pos, [prefix], inputs=[("images", "IMAGE")], size=(400, 420))
    g.link(dec, 0, save, "images")


TRAIN_NOTE = """Train soft tokens for the checkpoint you use, then sample with them.

1. Put the checkpoint into models/checkpoints (here v1-5-pruned-emaonly.safetensors).
2. Put a folder of images with same-name .txt captions into ComfyUI/input (here input/my_dataset;
   kohya "10_name" repeat folders and a .jsonl manifest work too) and pick it in Load Captioned Images.
3. Queue. Encode Soft-Token Dataset encodes every image once (cached on disk). Train Soft Tokens shows a
   live plot of the loss and the validation alignment score; Cancel keeps a usable partial result.
4. The run's files appear in models/soft_tokens: my_tokens.safetensors (final), .best.safetensors (best
   validation score), .ckpt.pt (pick it under "resume" to continue) and .history.json. Save Soft Tokens
   writes a named copy. The sampler on the right already uses the fresh tokens.

Start small: 200-500 steps on 100+ images. Lower "chunk" if you run out of memory."""


def note(g, pos, text, size=(420, 330)):
    return g.node("Note", pos, [text], size=size)


def train_sd15():
    g = Graph()
    note(g, (20, 560), TRAIN_NOTE, size=(560, 330))
    ckpt = g.node("CheckpointLoaderSimple", (20, 40), ["v1-5-pruned-emaonly.safetensors"],
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], size=(320, 100))
    images = g.node("LoadCaptionedImages", (20, 200), ["my_dataset", 512, "random"],
                    outputs=[("images", "CAPTIONED_IMAGES")], size=(320, 130))
    enc = g.node("EncodeSoftTokenDataset", (20, 380), inputs=[("images", "CAPTIONED_IMAGES"), ("clip", "CLIP"),
                                                              ("vae", "VAE")],
                 outputs=[("dataset", "SOFT_TOKEN_DATASET")], size=(320, 110))
    g.link(images, 0, enc, "images")
    g.link(ckpt, 1, enc, "clip")
    g.link(ckpt, 2, enc, "vae")
    train = g.node("TrainSoftTokens", (400, 40),
                   ["softrepa", 500, 4, 16, 0.001, 4, "", "official", "official", 0.07, 4.0, 1.0, -1.0, 0.9999, 42,
                    "auto", False, 0.1, 100, 100, "my_tokens", "none"],
                   inputs=[("model", "MODEL"), ("dataset", "SOFT_TOKEN_DATASET")],
                   outputs=[("MODEL", "MODEL"), ("soft_tokens", "SOFT_TOKENS"), ("history", "LOSS_MAP")],
                   size=(360, 700))
    g.link(ckpt, 0, train, "model")
    g.link(enc, 0, train, "dataset")
    save = g.node("SaveSoftTokens", (820, 40), ["my_tokens_final"], inputs=[("soft_tokens", "SOFT_TOKENS")],
                  size=(320, 100))
    g.link(train, 1, save, "soft_tokens")
    plot = g.node("PlotSoftTokenTraining", (820, 190), inputs=[("history", "LOSS_MAP")],
                  outputs=[("IMAGE", "IMAGE")], size=(320, 300))
    g.link(train, 2, plot, "history")
    pos = g.node("CLIPTextEncode", (820, 540), ["three red apples and a blue cup on a wooden table"],
                 inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], size=(320, 130))
    neg = g.node("CLIPTextEncode", (820, 720), [""], inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], size=(320, 130))
    g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    latent = g.node("EmptyLatentImage", (1200, 540), [512, 512, 1], outputs=[("LATENT", "LATENT")], size=(320, 110))
    sample_and_save(g, (1200, 40), (1200, 360), (1580, 40), train, pos, neg, latent, ckpt,
                    [0, "fixed", 30, 7.0, "ddim", "ddim_uniform", 1.0], "soft_tokens_trained")
    return g.to_json()

WORKFLOWS = {
    "soft_tokens_sd15": txt2img("v1-5-pruned-emaonly.safetensors", "softrepa-sd1.5/",
                                "three red apples and a blue cup on a wooden table", 512, 512, 30, 7.0,
                                "ddim", "ddim_uniform"),
    "soft_tokens_sdxl": txt2img("sd_xl_base_1.0.safetensors", "softrepa-sdxl/",
                                "a cat sitting to the left of a green umbrella", 1024, 1024, 30, 7.0,
                                "ddim", "ddim_uniform"),
    "soft_tokens_sd3": txt2img("sd3_medium_incl_clips_t5xxlfp16.safetensors", "softrepa-sd3/",
                               "two dogs and one yellow ball on the grass", 1024, 1024, 28, 4.0,
                               "euler", "sgm_uniform", sd3=True),
    "soft_tokens_train_sd15": train_sd15(),
}

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for name, wf in WORKFLOWS.items():
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(wf, f, indent=1)
        print("wrote", os.path.join(OUT, name + ".json"))
