"""nn modules with packed weights and the model surgery that installs them."""

from .embedding import QuantEmbedding, QuantTiedHead, gather_rows
from .quantized import PackedWeight, QuantExpertWeight, QuantLinear, float_weight_of

__all__ = ["PackedWeight", "QuantEmbedding", "QuantExpertWeight", "QuantLinear", "QuantTiedHead", "float_weight_of",
           "gather_rows"]
