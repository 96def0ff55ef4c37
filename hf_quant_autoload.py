"""Makes transformers recognise hf_quant checkpoints without `import hf_quant`.

Installed next to the package with `hf_quant_autoload.pth`, which imports this module at interpreter start.
It only adds a finder to `sys.meta_path` (nothing heavy is imported): when `transformers.quantizers.auto` is
imported, lazy entries for "hf_quant" are put into its registries. The first hf_quant config transformers reads
imports hf_quant, which registers the real classes. Without this, transformers would warn about an unknown
quant_method and load a saved hf_quant checkpoint as a randomly initialised float model.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "transformers.quantizers.auto"
_METHOD = "hf_quant"


class _LazyHfQuantConfig:
    """Stands in for `hf_quant.HfQuantConfig` until hf_quant is imported."""

    @classmethod
    def from_dict(cls, config_dict, *args, **kwargs):
        import hf_quant  # registers the real config and quantizer, replacing these stand-ins

        return hf_quant.HfQuantConfig.from_dict(config_dict, *args, **kwargs)


def _lazy_quantizer(quantization_config, **kwargs):
    import hf_quant

    return hf_quant.HfQuantQuantizer(quantization_config, **kwargs)


def _add_lazy_entries(auto_module) -> None:
    auto_module.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(_METHOD, _LazyHfQuantConfig)
    auto_module.AUTO_QUANTIZER_MAPPING.setdefault(_METHOD, _lazy_quantizer)


_PENDING: dict[str, list] = {}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs the callbacks registered for a module right after the module is imported (hf_quant uses it too, through
    `after_import`, for registrations with optional libraries such as PEFT)."""

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


def after_import(module: str, callback) -> None:
    """Call `callback()` now if `module` is imported, else right after its import completes."""
    if module in sys.modules:
        callback()
        return
    _PENDING.setdefault(module, []).append(callback)
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def install() -> None:
    after_import(_TARGET, lambda: _add_lazy_entries(sys.modules[_TARGET]))


try:
    install()
except Exception:  # never break interpreter start-up; `import hf_quant` still registers explicitly
    pass
