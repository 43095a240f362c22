"""Training data in ComfyUI: captioned folders under input/, encoded with the graph's CLIP and VAE.

``open_captioned_folder`` opens a folder of ComfyUI's input directory (``.txt`` sidecars, kohya
``N_name`` repeat folders, or one ``.jsonl`` manifest) through training/datasets.py, refusing
paths and manifest entries that leave the folder.

``ComfyEncoders`` adapts a ComfyUI CLIP and VAE to the engine's ``Encoders`` interface, so the
engine's on-disk ``EncodeCache`` (training/cache.py) caches their outputs. Latents are the raw
VAE latents (ComfyUI's LATENT "samples"); the trainer maps them into the model's space with the
model's own ``process_latent_in``. Every caption is encoded alone and cut to the length of the
empty prompt's conditioning (77 CLIP tokens; SD3: 77 CLIP + the T5 part), so rows stack; cut
captions are counted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..training.cache import EncodeCache
from ..training.checkpoint import safe_subfolder
from ..training.datasets import CaptionDataset, open_dataset
from ..training.encoders import Encoders
from ..training.layouts import FLUX
from .patch import model_facts, needs_pooled

OUTSIDE = "image outside the dataset folder"


def fingerprint(*modules) -> str:
    """A quick identity of modules' weights: names, shapes, dtypes and a strided sample of values.

    Used for cache keys and the base-model identifier; reading a few values per tensor keeps
    it fast for multi-GB models while any re-trained or swapped weight changes it.
    """
    h = hashlib.sha256()
    for module in modules:
        for name, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].float().cpu()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:24]


def folder_state(input_dir, folder: str) -> str:
    """A hash of every file's path, size and mtime under the folder: changes when the data changes."""
    h = hashlib.sha256()
    root = safe_subfolder(input_dir, folder)
    for dirpath, dirnames, filenames in sorted(os.walk(root, followlinks=True)):
        dirnames.sort()
        for f in sorted(filenames):
            st = os.stat(os.path.join(dirpath, f))
            h.update(f"{os.path.relpath(os.path.join(dirpath, f), root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def open_captioned_folder(input_dir, folder: str, size: int, caption_mode: str = "random") -> CaptionDataset:
    """The dataset in ``input_dir/folder`` (see module docstring); ValueError for bad or empty input."""
    root = safe_subfolder(input_dir, folder)
    manifests = sorted(p for p in root.glob("*.jsonl") if p.is_file())
    if len(manifests) > 1:
        raise ValueError(f"{folder} holds several .jsonl manifests ({', '.join(p.name for p in manifests)}); "
                         "keep one, or none to read the images with .txt captions")
    ds = open_dataset(manifests[0] if manifests else root, size=size, caption_mode=caption_mode)
    inside, outside = [], []
    for e in ds.entries:
        (inside if root in Path(os.path.realpath(e.image)).parents else outside).append(e)
    if outside:
        ds = CaptionDataset(inside, ds.size, ds.caption_mode, ds.source, ds.skipped, ds.problems,
                            ds.exif_transpose)
        for e in outside:
            ds.skipped[OUTSIDE] += 1
            ds.problems.append((str(e.image), OUTSIDE))
    if not ds.entries:
        raise ValueError(f"dataset {folder} has no usable images: {ds.summary()}")
    return ds


class ComfyEncoders(Encoders):
    """Captions -> {"context", "pooled"} through a ComfyUI CLIP; pixels -> raw VAE latents."""

    def __init__(self, clip, vae):
        self.clip, self.vae = clip, vae
        self._text_id = f"comfy-clip-{type(clip.cond_stage_model).__name__}-{fingerprint(clip.cond_stage_model)}"
        self._image_id = f"comfy-vae-{type(vae.first_stage_model).__name__}-{fingerprint(vae.first_stage_model)}"
        super().__init__(self._encode, identity=f"{self._text_id}+{self._image_id}")
        self.truncated = set()
        empty = self._encode_one("")
        self.length = empty["context"].shape[0]
        self.widths = {k: tuple(v.shape[1:]) if k == "context" else tuple(v.shape) for k, v in empty.items()}

    def _encode_one(self, caption: str) -> dict:
        out = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True, return_dict=True)
        row = {"context": out["cond"][0].float().cpu()}
        if out.get("pooled_output") is not None:
            row["pooled"] = out["pooled_output"][0].float().cpu()
        return row

    def _encode(self, captions) -> dict:
        rows = []
        for c in captions:
            row = self._encode_one(c)
            if row["context"].shape[0] > self.length:
                row["context"] = row["context"][:self.length]
                self.truncated.add(c)
            rows.append(row)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def image_moments(self, pixels: torch.Tensor) -> tuple:
        """Raw VAE latents (mean; ComfyUI's VAE is deterministic) of pixels (N, 3, H, W) in [-1, 1]."""
        images = ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)
        with torch.no_grad():  # also when a cache miss is encoded during training
            return self.vae.encode(images).float().cpu(), None

    def text_identity(self) -> str:
        return self._text_id

    def image_identity(self) -> str:
        return self._image_id

    def describe(self) -> dict:
        """What a model must accept to train on these encodings."""
        lat = getattr(self.vae, "latent_channels", None)
        return {"context_width": self.widths["context"][-1], "context_length": self.length,
                "pooled_width": self.widths["pooled"][0] if "pooled" in self.widths else None,
                "latent_channels": lat}


@dataclass
class EncodedDataset:
    """The SOFT_TOKEN_DATASET value: images and captions with their cached encodings."""
    dataset: CaptionDataset
    cache: EncodeCache
    facts: dict
    report: dict = field(default_factory=dict)

    def check_model(self, model) -> None:
        """ValueError when this dataset was encoded for a model that cannot take it."""
        f = model_facts(model)
        base = model.model
        want_ctx = f["embed_width"] if f["family"] == "mmdit" else f["text_width"]
        lat = base.latent_format.latent_channels
        problems = []
        if self.facts["context_width"] != want_ctx:
            problems.append(f"text conditioning is {self.facts['context_width']} wide, the model takes {want_ctx}")
        if self.facts["latent_channels"] not in (None, lat):
            problems.append(f"latents have {self.facts['latent_channels']} channels, the model {lat}")
        pooled = self.facts["pooled_width"]
        if needs_pooled(model) and pooled is None:
            problems.append("the model needs pooled text conditioning, which this CLIP does not give")
        if f.get("arch") == FLUX and pooled is not None and pooled != base.diffusion_model.params.vec_in_dim:
            problems.append(f"pooled text conditioning is {pooled} wide, the model takes "
                            f"{base.diffusion_model.params.vec_in_dim}")
        if problems:
            raise ValueError(f"the dataset was encoded for another model ({'; '.join(problems)}). Encode it with "
                             "the CLIP and VAE of the checkpoint you train on.")


def encode_dataset(dataset: CaptionDataset, clip, vae, cache_root, progress=None) -> EncodedDataset:
    """Encode every image and caption (cached on disk under ``cache_root``) before training."""
    if dataset.n_images == 0:
        raise ValueError(f"dataset {dataset.source} is empty: {dataset.summary()}")
    enc = ComfyEncoders(clip, vae)
    cache = EncodeCache(enc, root=cache_root)
    stats = cache.prepare(dataset, progress=progress)
    if dataset.n_images == 0:
        raise ValueError(f"no readable images in {dataset.source}: {dataset.summary()}")
    report = {**dataset.report(), "encoded": stats.get("latent_miss", 0), "from_cache": stats.get("latent_hit", 0),
              "captions_cut": len(enc.truncated)}
    return EncodedDataset(dataset, cache, enc.describe(), report)


def summary_text(report: dict) -> str:
    """A few lines for a node's UI: counts and skips."""
    lines = [f"{report['images']} images ({report['samples']} samples per epoch) from {report['source']}"]
    if report.get("skipped"):
        lines.append("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(report["skipped"].items())))
    else:
        lines.append("skipped: none")
    if "encoded" in report:
        lines.append(f"encoded {report['encoded']} images, {report['from_cache']} from the cache")
    if report.get("captions_cut"):
        lines.append(f"{report['captions_cut']} captions longer than one 77-token chunk were cut")
    return "\n".join(lines)
