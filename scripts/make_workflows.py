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
    ks = g.node("KSampler", (820, 40), [0, "fixed", steps, cfg, sampler, scheduler, 1.0],
                inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")], size=(320, 270))
    g.link(load, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(latent, 0, ks, "latent_image")
    dec = g.node("VAEDecode", (1180, 40), inputs=[("samples", "LATENT"), ("vae", "VAE")],
                 outputs=[("IMAGE", "IMAGE")], size=(220, 50))
    g.link(ks, 0, dec, "samples")
    g.link(ckpt_n, 2, dec, "vae")
    save = g.node("SaveImage", (1180, 140), ["soft_tokens"], inputs=[("images", "IMAGE")], size=(400, 420))
    g.link(dec, 0, save, "images")
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
}

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for name, wf in WORKFLOWS.items():
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(wf, f, indent=1)
        print("wrote", os.path.join(OUT, name + ".json"))
