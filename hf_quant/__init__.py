"""hf_quant: low-bit quantization of transformers models.

    import hf_quant
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_quant.HfQuantConfig(bits=4))
"""

from .config import FORMAT_VERSION, HfQuantConfig
from .formats import QuantScheme
from .integrations.hub import push_to_hub
from .integrations.peft import register as _register_peft
from .integrations.transformers import register as _register
from .nn import QuantExpertWeight, QuantLinear
from .quantizer import HfQuantQuantizer, dequantize_model, packed_modules

__version__ = "0.1.0"

_register()
_register_peft()  # LoRA layers for hf_quant modules in every peft LoraConfig

__all__ = [
    "FORMAT_VERSION",
    "HfQuantConfig",
    "HfQuantQuantizer",
    "QuantExpertWeight",
    "QuantLinear",
    "QuantScheme",
    "dequantize_model",
    "packed_modules",
    "push_to_hub",
]
