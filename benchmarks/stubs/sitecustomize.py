"""Empty stand-ins for packages a machine cannot install, for benchmark runs only.

Put this folder on ``PYTHONPATH`` and list top-level package names in ``LLM_INST_STUB_MODULES``
(comma-separated): importing any of them (or their submodules) then gives an empty module
whose every attribute is a placeholder class. The GPU machine cannot carry the packages that
``sae_lens`` imports for logging and dataset loading (wandb, datasets, pandas, pyarrow: over
the 64 MB a run may take); ``benchmarks/sae_train.py`` feeds SAELens's trainer tensors
directly and never calls them.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import types

_NAMES = {n.strip() for n in os.environ.get("LLM_INST_STUB_MODULES", "").split(",") if n.strip()}


class _Placeholder:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Placeholder()

    def __getattr__(self, name):
        return _Placeholder()


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        cls = type(name, (_Placeholder,), {"__module__": self.__name__})
        setattr(self, name, cls)
        return cls


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in _NAMES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


if _NAMES:
    sys.meta_path.insert(0, _Finder())
