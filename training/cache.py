"""Latent and text-conditioning cache: encode each image and caption once, reuse them every epoch.

Entries are .safetensors files (or an in-memory dict when ``root`` is None):
- ``<root>/latents-<id>/<ab>/<key>.safetensors`` holds ``mean`` (and ``std`` when the encoder samples)
  of one image's scaled latent. <id> hashes the image encoder's identity; the key hashes that
  identity, the transform and size, and the image's resolved path, byte size and mtime.
- ``<root>/text-<id>/<ab>/<key>.safetensors`` holds one caption's Cond rows. The key hashes the text
  encoder's identity (weights, dtype, T5 length, SDXL size) and the caption text.

So files of different models or settings never collide, and a changed image or caption gets a new
key and is encoded again (the old file is left behind, unused). Latent moments rather than one
sample are stored, so training still draws a fresh latent sample per access like the official code.
Unreadable or corrupt cache files count as misses and are rewritten. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch

from .datasets import TRANSFORM, Batch, CaptionDataset
from .encoders import Encoders


def _sha(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class EncodeCache:
    """Cached ``encoders`` outputs for dataset entries and captions (see module docstring).

    ``root`` None keeps everything in memory. ``latents`` / ``text`` False turn caching of that
    side off (encoded on every access), e.g. ``text=False`` for SD3, whose T5 conditioning is
    about 5 MB per caption in fp16. ``stats`` counts hits and misses.
    """

    def __init__(self, encoders: Encoders, root=None, latents: bool = True, text: bool = True):
        self.encoders = encoders
        self.root = Path(root).expanduser() if root is not None else None
        self.cache_latents, self.cache_text = latents, text
        self.memory = {}
        self.stats = Counter()
        self._lat_id, self._txt_id = encoders.image_identity(), encoders.text_identity()
        if self.root is not None:
            self.latent_dir = self.root / f"latents-{_sha(self._lat_id)[:16]}"
            self.text_dir = self.root / f"text-{_sha(self._txt_id)[:16]}"
            for d, ident in ((self.latent_dir, self._lat_id), (self.text_dir, self._txt_id)):
                d.mkdir(parents=True, exist_ok=True)
                (d / "identity.txt").write_text(ident + "\n", encoding="utf-8")

    # --- keys and storage ---
    def latent_key(self, dataset: CaptionDataset, index: int) -> str | None:
        """Cache key of entry ``index``'s latent (None if its file cannot be stat'ed)."""
        path = Path(dataset.entries[index].image)
        try:
            st = path.stat()
        except OSError:
            return None
        return _sha("latent", self._lat_id, TRANSFORM, dataset.size, dataset.exif_transpose,
                    str(path.resolve()), st.st_size, st.st_mtime_ns)

    def text_key(self, caption: str) -> str:
        return _sha("text", self._txt_id, caption)

    def _file(self, kind: str, key: str) -> Path:
        return (self.latent_dir if kind == "latent" else self.text_dir) / key[:2] / f"{key}.safetensors"

    def _get(self, kind: str, key: str):
        if self.root is None:
            return self.memory.get((kind, key))
        f = self._file(kind, key)
        if not f.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(f)
        except Exception:  # corrupt or half-written by a killed process: re-encode
            self.stats["corrupt"] += 1
            return None

    def _put(self, kind: str, key: str, tensors: dict, note: str):
        tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
        if self.root is None:
            self.memory[(kind, key)] = tensors
            return
        from safetensors.torch import save_file

        f = self._file(kind, key)
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"kind": kind, "source": note[:1000]})
            os.replace(tmp, f)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # --- latents ---
    def moments(self, dataset: CaptionDataset, batch: Batch) -> tuple:
        """(mean (B,...), std (B,...) or None, batch) for a batch's images.

        Cache hits are read; misses are loaded (unreadable images are replaced as in
        ``CaptionDataset.load_entry``, and ``batch`` is updated to match), encoded and stored.
        """
        entries, rows, missing = list(batch.entries), [None] * len(batch.entries), []
        for pos, idx in enumerate(entries):
            key = self.latent_key(dataset, idx) if self.cache_latents else None
            hit = self._get("latent", key) if key else None
            self.stats["latent_hit" if hit else "latent_miss"] += 1
            if hit:
                rows[pos] = hit
            else:
                missing.append(pos)
        if missing:
            loaded = [dataset.load_entry(entries[pos]) for pos in missing]
            for pos, (idx, _) in zip(missing, loaded):
                entries[pos] = idx
            for pos, row in zip(missing, self._encode(dataset, [i for i, _ in loaded], [p for _, p in loaded])):
                rows[pos] = row
        mean = torch.stack([r["mean"] for r in rows])
        std = torch.stack([r["std"] for r in rows]) if all("std" in r for r in rows) else None
        return mean, std, dataset.rebatch(batch, entries)

    def _encode(self, dataset, indices, pixels) -> list:
        """Encode and (when caching) store the latents of the given entries; returns their rows."""
        mean, std = self.encoders.image_moments(torch.stack(pixels))
        rows = []
        for k, idx in enumerate(indices):
            row = {"mean": mean[k]} if std is None else {"mean": mean[k], "std": std[k]}
            key = self.latent_key(dataset, idx) if self.cache_latents else None
            if key:
                self._put("latent", key, row, str(dataset.entries[idx].image))
            rows.append({k2: v.detach().cpu() for k2, v in row.items()})
        return rows

    # --- text ---
    def text(self, captions) -> dict:
        """Cond (N, ...) for a list of captions, from the cache where possible."""
        captions = list(captions)
        rows = {}
        if self.cache_text:
            for c in dict.fromkeys(captions):
                hit = self._get("text", self.text_key(c))
                if hit:
                    rows[c] = hit
        todo = [c for c in dict.fromkeys(captions) if c not in rows]
        self.stats["text_hit"] += len(captions) - sum(c in todo for c in captions)
        self.stats["text_miss"] += sum(c in todo for c in captions)
        if todo:
            cond = self.encoders.encode_text(todo)
            for k, c in enumerate(todo):
                row = {name: v[k] for name, v in cond.items()}
                if self.cache_text:
                    self._put("text", self.text_key(c), row, c)
                rows[c] = {name: v.detach().cpu() for name, v in row.items()}
        names = rows[captions[0]].keys()
        return {name: torch.stack([rows[c][name] for c in captions]) for name in names}

    def _uncached_captions(self, dataset) -> list:
        """Distinct captions the sampler can pick (all in "random" mode, the first in "first") not cached yet."""
        if not self.cache_text:
            return []
        caps = dict.fromkeys(c for i in dataset.valid() for c in
                             (dataset.entries[i].captions if dataset.caption_mode == "random"
                              else dataset.entries[i].captions[:1]))
        return [c for c in caps if self._get("text", self.text_key(c)) is None]

    def first_caption_pairs(self, dataset: CaptionDataset, limit: int) -> tuple:
        """(latent means, Cond) of the first ``limit`` usable images with their first captions
        (validation and scoring pairs; unreadable images are replaced as in ``moments``)."""
        idx = tuple(dataset.valid()[:limit])
        batch = Batch(0, 0, idx, (0,) * len(idx), tuple(dataset.caption(i, 0) for i in idx))
        mean, _, batch = self.moments(dataset, batch)
        return mean, self.text(batch.captions)

    # --- what the trainer calls ---
    def batch(self, dataset: CaptionDataset, batch: Batch, generator: torch.Generator | None = None,
              device=None) -> tuple:
        """(x0 latents, Cond, batch) for one training batch; x0 is sampled from the cached moments.

        ``batch`` is returned updated when an unreadable image had to be replaced. Tensors are
        moved to ``device`` when given (else they stay on the CPU).
        """
        mean, std, batch = self.moments(dataset, batch)
        x0 = self.encoders.latents_from_moments(mean, std, generator=generator)
        cond = self.text(batch.captions)
        if device is not None:
            x0 = x0.to(device)
            cond = {k: v.to(device) for k, v in cond.items()}
        return x0, cond, batch

    def prepare(self, dataset: CaptionDataset, batch_size: int = 8, captions: bool = True,
                progress=None) -> dict:
        """Encode every uncached image (and caption) of ``dataset`` now, before training.

        Every uncached image is fully decoded here, so unreadable ones are found and marked bad
        (counted in ``dataset.report()``) before the first step. ``progress(done, total)`` is
        called after each chunk. Returns ``dict(stats, dataset=dataset.report())``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        todo_img = []
        if self.cache_latents:
            for idx in dataset.valid():
                key = self.latent_key(dataset, idx)
                if key is None or self._get("latent", key) is None:
                    todo_img.append(idx)
        todo_txt = self._uncached_captions(dataset) if captions else []
        total, done = len(todo_img) + len(todo_txt), 0
        for s in range(0, len(todo_img), batch_size):
            chunk = todo_img[s:s + batch_size]
            loaded = [(i, dataset.pixels(i)) for i in chunk]
            good = [(i, p) for i, p in loaded if p is not None]
            if good:
                self._encode(dataset, [i for i, _ in good], [p for _, p in good])
            self.stats["latent_miss"] += len(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
        if todo_txt and dataset.bad:
            todo_txt = self._uncached_captions(dataset)  # drop captions of images found unreadable
            total = done + len(todo_txt)
        for s in range(0, len(todo_txt), batch_size):
            chunk = todo_txt[s:s + batch_size]
            self.text(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
        return {**self.stats, "dataset": dataset.report()}
