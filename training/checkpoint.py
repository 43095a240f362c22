"""Training run files: where they go, atomic writes, and the resumable checkpoint.

A run writing ``<dir>/<name>.safetensors`` keeps everything beside it, in the same folder:
- ``<name>.safetensors``: the token file (final, or partial after a cancel or NaN stop);
- ``<name>.best.safetensors``: the tokens with the best validation alignment score;
- ``<name>.ckpt.pt``: the checkpoint (tokens, EMA tokens, optimizer, scheduler, step, RNG
  state, data position, config, loss history), enough to resume bit-identically;
- ``<name>.history.json``: loss and validation history.

Every file is written to a temporary file in the same folder and renamed into place, so a
crash never leaves a half-written file under the real name. Checkpoints hold only tensors and
plain Python values and are read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

CKPT_FORMAT = "soft-tokens-checkpoint"
CKPT_VERSION = 1


@dataclass(frozen=True)
class RunFiles:
    """The files of one training run, all in ``out``'s folder."""
    out: Path
    best: Path
    ckpt: Path
    history: Path

    @classmethod
    def of(cls, out) -> "RunFiles":
        out = Path(out)
        if out.suffix != ".safetensors":
            raise ValueError(f"the output token file must end in .safetensors, got {out.name!r}")
        stem = out.with_suffix("")
        return cls(out, stem.with_name(stem.name + ".best.safetensors"), stem.with_name(stem.name + ".ckpt.pt"),
                   stem.with_name(stem.name + ".history.json"))

    def all(self) -> tuple:
        return (self.out, self.best, self.ckpt, self.history)

    def check_new(self, overwrite: bool = False) -> None:
        """Raise FileExistsError if a fresh run would replace existing files (unless overwrite)."""
        if self.out.parent.exists() and not self.out.parent.is_dir():
            raise ValueError(f"{self.out.parent} is not a folder")
        taken = [str(p) for p in self.all() if p.exists()]
        if taken and not overwrite:
            raise FileExistsError(f"{', '.join(taken)} already exist(s); choose another output name, "
                                  "resume that run with --resume, or pass --overwrite")


def output_path(folder, name: str, suffix: str = ".safetensors") -> Path:
    """``folder/name`` (suffix added if missing), refusing names that would leave ``folder``.

    For user-typed names (e.g. a ComfyUI text field): absolute paths, ``..`` and anything that
    resolves outside ``folder`` raise ValueError. Sub-folders inside ``folder`` are allowed.
    """
    name = str(name).strip()
    if not name:
        raise ValueError("the output name is empty")
    if os.path.isabs(name) or Path(name).drive:
        raise ValueError(f"output name {name!r} must be relative to {folder}")
    if not name.endswith(suffix):
        name += suffix
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if path == root or root not in path.parents:
        raise ValueError(f"output name {name!r} leaves the output folder {root}")
    return path


def safe_subfolder(root, rel) -> Path:
    """The existing folder ``rel`` inside ``root`` (e.g. picked from a dropdown), resolved.

    Raises ValueError for an empty or absolute ``rel``, any ``..`` component, a path that ends
    up outside ``root`` once symlinks are followed, and a path that is not an existing folder.
    """
    rel = str(rel).strip()
    if not rel:
        raise ValueError(f"no folder chosen; pick a folder inside {root}")
    if os.path.isabs(rel) or Path(rel).drive or rel.startswith(("/", "\\")):
        raise ValueError(f"folder {rel!r} must be relative to {root}, not an absolute path")
    # Both separators: a\..\b is refused on POSIX too (the folder may be used on Windows).
    if ".." in rel.replace("\\", "/").split("/"):
        raise ValueError(f"folder {rel!r} must not contain '..'; pick a folder inside {root}")
    real_root = Path(os.path.realpath(root))
    path = Path(os.path.realpath(real_root / rel))
    if path == real_root:
        raise ValueError(f"folder {rel!r} is {root} itself; pick a folder inside it")
    if real_root not in path.parents:
        raise ValueError(f"folder {rel!r} leads to {path}, outside {root} (through a symbolic link); "
                         f"pick a folder inside {root}")
    if not path.exists():
        raise ValueError(f"folder {rel!r} does not exist in {root}")
    if not path.is_dir():
        raise ValueError(f"{rel!r} in {root} is a file, not a folder")
    return path


def numbered_run(folder, name: str) -> Path:
    """The .safetensors path of a new run ``name`` in ``folder`` (checked by ``output_path``).

    If any file of that run already exists (token file, .best, .ckpt.pt, .history.json), the
    first ``name_001``, ``name_002``, ... whose four files are all free is used instead.
    """
    path = output_path(folder, name)
    candidate, i = path, 0
    while any(p.exists() for p in RunFiles.of(candidate).all()):
        i += 1
        candidate = path.with_name(f"{path.stem}_{i:03d}{path.suffix}")
    return candidate


@contextlib.contextmanager
def signals_held(drop: bool = False):
    """Let a save finish before SIGINT or SIGTERM act (on the main thread; elsewhere a no-op).

    A signal that arrives during the block acts when it ends; with ``drop`` it is discarded,
    for the final save of a run that is ending anyway. (torchrun sends SIGTERM to the other
    ranks when one fails, which can land while rank 0 is already saving because of that failure.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    # handlers installed outside Python (getsignal() is None) cannot be restored, so they stay
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught and not drop:
            signal.raise_signal(caught[0])


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; use the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj, path) -> Path:
    """torch.save ``obj`` to ``path`` atomically."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def write_json(obj, path) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return atomic_write_bytes(path, json.dumps(obj, indent=1, default=str).encode("utf-8"))


def save_checkpoint(state: dict, path) -> Path:
    """Write a training checkpoint (a dict of tensors and plain values) atomically."""
    return atomic_torch_save({"format": CKPT_FORMAT, "version": CKPT_VERSION, **state}, path)


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (weights_only, CPU), or raise ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable training checkpoint ({e})") from e
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a soft-token training checkpoint")
    if state.get("version") != CKPT_VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')!r}; this version reads {CKPT_VERSION}")
    return state
