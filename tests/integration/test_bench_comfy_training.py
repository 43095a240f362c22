"""Smoke test: bench/comfy_training.py --quick runs end to end on real ComfyUI (tiny UNet, 8x8 latents)."""

import os
import re
import subprocess
import sys

import pytest


def test_quick_run(comfy):
    script = os.path.join(comfy.REPO_ROOT, "bench", "comfy_training.py")
    env = dict(os.environ, COMFYUI_PATH=comfy.find_comfyui())
    res = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    rows = [line.split() for line in out.splitlines() if re.match(r"(comfy|diffusers) +\d+ +\d+ ", line)]
    assert len(rows) == 8, out  # 2 backends x B in (4, 16) x chunk in (0, 16)
    losses = {}
    for row in rows:
        assert row[-1] != "-", out  # every step ran
        losses.setdefault((row[1], row[3]), []).append(float(row[-1]))
    for pair in losses.values():  # both backends ran the same step on the same weights
        assert pair[0] == pytest.approx(pair[1], rel=1e-4), out
    assert "peak memory growth B=4 -> B=16" in out and "comfy / diffusers seconds per step" in out
    assert "crashed" not in out and "failed" not in out
