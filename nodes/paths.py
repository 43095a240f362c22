"""The ``soft_tokens`` model folder: registration and the dropdown's entries."""

from __future__ import annotations

import os

import folder_paths

from ..training.formats import is_official_folder

FOLDER = "soft_tokens"
EXTENSIONS = {".safetensors"}


def register_folder() -> None:
    """Add models/soft_tokens, keeping any paths the user set in extra_model_paths.yaml."""
    default = token_folder()
    os.makedirs(default, exist_ok=True)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))


def token_folder() -> str:
    """models/soft_tokens: where trainers and Save Soft Tokens write."""
    return os.path.join(folder_paths.models_dir, FOLDER)


def _walk():
    """(path relative to its soft_tokens folder, dirpath, filenames) of every visible folder in them."""
    for root in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            yield os.path.relpath(dirpath, root), dirpath, [f for f in filenames if not f.startswith(".")]


def _entry(rel: str, name: str = "") -> str:
    return os.path.normpath(os.path.join(rel, name)).replace(os.sep, "/")


def list_checkpoints() -> list[str]:
    """Training checkpoints (*.ckpt.pt) in the soft_tokens folders, for resuming."""
    return sorted({_entry(rel, f) for rel, _, files in _walk() for f in files if f.endswith(".ckpt.pt")})


def list_token_files() -> list[str]:
    """Dropdown entries: .safetensors token files, and official folders as one entry each."""
    found = set()
    for rel, dirpath, files in _walk():
        if rel != "." and is_official_folder(dirpath):
            found.add(_entry(rel) + "/")
        found.update(_entry(rel, f) for f in files if os.path.splitext(f)[1].lower() in EXTENSIONS)
    return sorted(found)


def resolve_token_file(entry: str) -> str:
    """Full path of a dropdown entry; the entry may not point outside the registered folders.

    Symlinks placed inside the folders by the user are followed, as for any model folder.
    """
    rel = os.path.normpath(entry)
    if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
        raise ValueError(f"soft token entry {entry!r} points outside the soft_tokens folders")
    for root in folder_paths.get_folder_paths(FOLDER):
        path = os.path.join(os.path.abspath(root), rel)
        if os.path.exists(path):
            return path
    raise ValueError(f"soft token file {entry!r} was not found in {folder_paths.get_folder_paths(FOLDER)}. "
                     "Put .safetensors token files or official token folders into models/soft_tokens "
                     "and refresh.")
