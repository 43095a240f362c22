"""Fixtures for integration tests against real upstream ComfyUI (tests/comfy_env.py).

The whole directory is skipped (one summary line) when ComfyUI cannot be found.
ComfyUI is imported in CPU mode as soon as it is found, before any test module or the
pack itself can import comfy/comfy_api (comfy.model_management picks its device on import).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import comfy_env  # noqa: E402

SKIP_REASON = "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout to run integration tests"

if comfy_env.find_comfyui() is None:
    # A module-level pytest.skip() here would crash when this conftest is an "initial" conftest
    # (pytest tests/integration/...); instead every test module becomes one skipped collector,
    # reported together as a single "SKIPPED [n] .../conftest.py: ComfyUI not found..." line.
    class _SkippedModule(pytest.Module):
        def collect(self):
            pytest.skip(SKIP_REASON)

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedModule.from_parent(parent, path=module_path)
else:
    assert comfy_env.import_comfy(), "ComfyUI import failed"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower integration test (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _torch_threads():
    """Run single-threaded (override: COMFY_ENV_THREADS). Tiny models gain nothing from threads, and
    on a busy 2-core box 2 OpenMP threads made every op ~20x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("COMFY_ENV_THREADS", "1")))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def comfy():
    """The comfy_env module (ComfyUI already imported in CPU mode)."""
    return comfy_env


@pytest.fixture
def sd15(comfy):
    """Fresh tiny SD1.5 ModelPatcher (context 768, seed 0)."""
    return comfy.tiny_sd15(seed=0)


@pytest.fixture
def sd3(comfy):
    """Fresh tiny SD3 ModelPatcher (depth 2 -> hidden 128, 2 joint blocks, seed 0)."""
    return comfy.tiny_sd3(seed=0)


@pytest.fixture
def comfy_server_factory():
    """Call with start_server kwargs (packs=..., extra_custom_nodes_dirs=...); all servers stop at teardown."""
    servers = []

    def start(**kwargs):
        server = comfy_env.start_server(**kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        comfy_env.stop_server(server)


@pytest.fixture(scope="module")
def comfy_server():
    """A ComfyUI server with core nodes only, shared by a test module."""
    server = comfy_env.start_server()
    yield server
    comfy_env.stop_server(server)
