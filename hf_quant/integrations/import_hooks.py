"""Run a callback once a module has been imported, without importing it: registrations with optional, heavy
libraries (PEFT takes ~1.2 s to import) happen only when the user imports them."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable

_PENDING: dict[str, list[Callable]] = {}


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PENDING:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_call(module):
            exec_module(module)
            for callback in _PENDING.pop(name, []):
                callback()

        spec.loader.exec_module = exec_then_call
        return spec


def after_import(module: str, callback: Callable[[], None]) -> None:
    """Call `callback` now if top-level `module` is imported, else right after its import completes."""
    if module in sys.modules:
        callback()
        return
    _PENDING.setdefault(module, []).append(callback)
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
