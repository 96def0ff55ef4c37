"""Export to the checkpoint formats engines serve: compressed-tensors (vLLM, SGLang, transformers) and GPTQ.

    from hf_quant.export import export
    report = export("my-hf_quant-checkpoint", to="compressed-tensors", out="exported")
    print(report.summary())

Exact or refused: every exported weight decodes, in the target library's own decoding, to hf_quant's dequantized
weight (bit for bit in float32, or its float16 rounding where the target decodes in float16; see each target's
module doc), or the export is refused naming each module, the reason and the fix (`ExportRefused`). With
`requantize=True`, weights the target cannot hold only for rounding reasons are re-fitted to codes it holds and
the added error reported per module. The format objects own the mapping (`Format.export_tensors`); the targets own
their layouts (compressed_tensors.py, gptq.py, packing.py); exporter.py walks the model and writes the folder.
"""

from ..formats.scalar import ExportedWeight, ExportRefused
from .exporter import TARGETS, ExportRefusedModules, ExportReport, export

__all__ = ["ExportRefused", "ExportRefusedModules", "ExportReport", "ExportedWeight", "TARGETS", "export"]
