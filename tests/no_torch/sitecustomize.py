"""Put this folder first on PYTHONPATH and the process cannot import torch (nor numpy, safetensors,
transformers): how the tests prove the gateway serves soft prompts without them, as in its image."""

import sys
from importlib.abc import MetaPathFinder

BLOCKED = frozenset({"torch", "numpy", "safetensors", "transformers"})


class _Blocker(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is blocked: this process must run without it")
        return None


sys.meta_path.insert(0, _Blocker())
