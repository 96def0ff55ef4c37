"""Import of other libraries' quantized checkpoints: GPTQ (AutoGPTQ/GPTQModel v1 and v2), AWQ (AutoAWQ GEMM) and
compressed-tensors (pack-quantized int), mapped onto hf_quant's packed modules without dequantizing.

    from hf_quant import load_foreign
    model = load_foreign("TheBloke/Llama-2-7B-GPTQ-folder", dtype=torch.float16)

Exact or refused: every imported weight dequantizes (hf_quant's float32 decoding) to the foreign reader's own
decoding, bit for bit in float32 (readers that decode in float16 get its float16 rounding), or the import is
refused naming the file, module or tensor, the reason and the fix (`ImportRefused`; `ImportRefusedModules` collects
every refused module of a checkpoint). Each source module (gptq.py, awq.py, compressed_tensors.py) documents its
layout and what it refuses; loader.py reads the folder and builds the model.
"""

from .common import ImportRefused, ImportRefusedModules
from .loader import SOURCES, load_foreign

__all__ = ["ImportRefused", "ImportRefusedModules", "SOURCES", "load_foreign"]
