"""Calibration-based quantization: the one block loop (loop.py) that runs every decoder block on calibration data
and hands it to one processor per method (processors.py), the calibration data (data.py) and the statistics
collected during a block's pass (statistics.py). The big-model pipeline streams this same loop block by block."""

from .data import BOTCHAN_EVAL_TOKENS, GENERATED, calibration_text, calibration_token_ids, generated_token_ids
from .loop import CalibrationReport, attach_rotations, check_calibration_supported, quantize_with_calibration
from .processors import PROCESSORS, BlockContext, BlockProcessor

__all__ = [
    "BOTCHAN_EVAL_TOKENS",
    "GENERATED",
    "PROCESSORS",
    "BlockContext",
    "BlockProcessor",
    "CalibrationReport",
    "attach_rotations",
    "calibration_text",
    "calibration_token_ids",
    "check_calibration_supported",
    "generated_token_ids",
    "quantize_with_calibration",
]
