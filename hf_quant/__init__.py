"""hf_quant: low-bit quantization of transformers models.

    import hf_quant
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_quant.HfQuantConfig(bits=4))
"""

from .config import FORMAT_VERSION, HfQuantConfig
from .formats import QuantScheme
from .integrations.transformers import register as _register
from .nn import QuantExpertWeight, QuantLinear
from .quantizer import HfQuantQuantizer, dequantize_model, packed_modules

__version__ = "0.1.0"

_register()

__all__ = [
    "FORMAT_VERSION",
    "HfQuantConfig",
    "HfQuantQuantizer",
    "QuantExpertWeight",
    "QuantLinear",
    "QuantScheme",
    "dequantize_model",
    "packed_modules",
]
