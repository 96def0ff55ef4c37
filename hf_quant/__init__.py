"""hf_quant: low-bit quantization of transformers models.

    import hf_quant
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_quant.HfQuantConfig(bits=4))
"""

from .config import FORMAT_VERSION, HfQuantConfig
from .eval.storage import count_parameters
from .export import ExportRefused, export
from .formats import QuantScheme
from .integrations import register as _register
from .integrations.hub import push_to_hub
from .model.checkpoint import save_pretrained_atomic
from .nn import QuantExpertWeight, QuantLinear
from .quantizer import HfQuantQuantizer, dequantize_model, packed_modules
from .version import __version__  # noqa: F401

_register()  # transformers, PEFT and experts registrations: hf_quant/integrations/__init__.py


def __getattr__(name: str):
    # HfQuantCache is imported on first use, so `import hf_quant` does not get slower (benchmarks/import_time.py)
    if name == "HfQuantCache":
        from .cache import HfQuantCache

        return HfQuantCache
    if name in ("load_foreign", "ImportRefused"):  # hf_quant.importers, likewise on first use
        from . import importers

        return getattr(importers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ExportRefused",
    "FORMAT_VERSION",
    "HfQuantCache",
    "HfQuantConfig",
    "HfQuantQuantizer",
    "ImportRefused",
    "QuantExpertWeight",
    "QuantLinear",
    "QuantScheme",
    "count_parameters",
    "dequantize_model",
    "export",
    "load_foreign",
    "packed_modules",
    "push_to_hub",
    "save_pretrained_atomic",
]
