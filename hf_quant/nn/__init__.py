"""nn modules with packed weights and the model surgery that installs them."""

from .quantized import PackedWeight, QuantExpertWeight, QuantLinear, float_weight_of

__all__ = ["PackedWeight", "QuantExpertWeight", "QuantLinear", "float_weight_of"]
