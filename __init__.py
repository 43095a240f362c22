"""ComfyUI entry point of the soft-token pack (V3 nodes; see nodes/).

Imports are deferred so that importing this package outside ComfyUI (e.g. by a test runner)
has no side effects.
"""


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as entrypoint

    return await entrypoint()
