"""Public names imported on first use (PEP 562), so `import trap2_hf` and `trap2 --help` do not import torch,
transformers and TRL, and each `trap2` sub-command imports only what it needs."""

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` for `package`: `exports` maps each public name to the submodule defining it (a
    name that is the submodule's own name gives the submodule)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name], package)
        value = module if exports[name].rsplit(".", 1)[-1] == name else getattr(module, name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    return __getattr__
