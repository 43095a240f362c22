"""Import this repository as a ComfyUI custom-node package (as ComfyUI itself does)."""

import importlib.util
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK = "soft_tokens_pack"


def load_pack():
    """The pack as a package; ComfyUI must already be imported (comfy_env.import_comfy)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(REPO_ROOT, "__init__.py"),
                                                  submodule_search_locations=[REPO_ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def submodule(name):
    load_pack()
    return importlib.import_module(f"{PACK}.{name}")
