"""Packaging rules: training/ imports without ComfyUI; requirements never pin torch."""

import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_training_imports_without_comfyui():
    code = ("import sys, training, training.cli, training.formats, training.diffusers_hooks, training.backend;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes')];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_torch_is_never_a_requirement():
    reqs = open(os.path.join(ROOT, "requirements.txt")).read().splitlines()
    names = [r.split("#")[0].strip().split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in reqs]
    assert "torch" not in names
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert not [d for d in project["project"]["dependencies"] if d.lower().startswith("torch")]
    assert "comfy" in project["tool"]
