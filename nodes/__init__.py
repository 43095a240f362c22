"""Everything that imports ComfyUI: MODEL patching and the node classes."""

from comfy_api.latest import ComfyExtension, io

from .loader_nodes import ApplySoftTokens, LoadSoftTokens
from .paths import register_folder
from .refine_nodes import NODES as REFINE_NODES
from .train_nodes import NODES as TRAIN_NODES

NODES = [LoadSoftTokens, ApplySoftTokens, *TRAIN_NODES, *REFINE_NODES]


class SoftTokensExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> SoftTokensExtension:
    register_folder()
    return SoftTokensExtension()
