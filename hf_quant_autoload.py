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


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _add_lazy_entries(module)

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if _TARGET in sys.modules:  # transformers already imported (e.g. this module imported late)
        _add_lazy_entries(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


try:
    install()
except Exception:  # never break interpreter start-up; `import hf_quant` still registers explicitly
    pass
