"""Import paths from before the package showed its three jobs (``seg/model``, ``seg/train``, ``seg/serve``).

``import seg.task``, ``seg.models.Segmentor`` in a YAML file and ``python -m seg.convert`` keep working: each old
name is the new module itself (one class object, so pickles and ``isinstance`` agree), with a ``FutureWarning``
naming the new path. Lightning checkpoints pickle ``seg.inference.InferenceConfig``; ``seg.model.inference``
allows that name in ``weights_only`` loads.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

MOVED: dict[str, str] = {
    "seg.models": "seg.model.segmentor",
    "seg.hub": "seg.model.hub",
    "seg.checkpoint": "seg.model.checkpoint",
    "seg.convert": "seg.model.convert",
    "seg.legacy": "seg.model.legacy",
    "seg.weights": "seg.model.weights",
    "seg.pretrained": "seg.train.pretrained",
    "seg.published": "seg.model.published",
    "seg.inference": "seg.model.inference",
    "seg.backbones": "seg.model.backbones",
    "seg.heads": "seg.model.heads",
    "seg.layers": "seg.model.layers",
    "seg.task": "seg.train.task",
    "seg.callbacks": "seg.train.callbacks",
    "seg.schedules": "seg.train.schedules",
    "seg.weight_decay": "seg.train.weight_decay",
    "seg.checkpoint_io": "seg.train.checkpoint_io",
    "seg.metrics": "seg.train.metrics",
    "seg.reports": "seg.train.reports",
    "seg.cli": "seg.train.cli",
    "seg.config_checks": "seg.model.config_checks",
    "seg.predictor": "seg.serve.predictor",
    "seg.app": "seg.serve.app",
    "seg.app_guards": "seg.serve.app_guards",
    "seg.export": "seg.serve.export",
    "seg.safety": "seg.data.safety",
    "seg.limits": "seg.serve.limits",
    "seg.writers": "seg.serve.writers",
}


def new_name(old: str) -> str | None:
    """The module an old dotted name now lives at (submodules of moved packages included), or None."""
    for prefix, target in MOVED.items():
        if old == prefix or old.startswith(prefix + "."):
            return target + old[len(prefix):]
    return None


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}: import it from there (the old path will be removed)", FutureWarning,
                  stacklevel=3)


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module at its new one."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name, self.new)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # the import system set the old name's spec on the shared module

    def get_code(self, fullname: str) -> CodeType | None:
        """``python -m <old name>``: runs the new module's code as ``__main__``."""
        _warn(fullname, self.new)
        spec = importlib.util.find_spec(self.new)
        return spec.loader.get_code(self.new)  # type: ignore[union-attr]


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname)
        found = None if new is None else importlib.util.find_spec(new)
        if found is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new),
                                               is_package=found.submodule_search_locations is not None)


def install() -> None:
    """Put the finder first, so ``seg.layers.x`` is never found as a second copy under the old package's name."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
