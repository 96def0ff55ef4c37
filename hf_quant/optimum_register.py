"""Registers `optimum-cli hf-quant ...`. optimum imports every module of the `optimum.commands.register` namespace
package; the wheel installs this file there as `register_hf_quant.py` (pyproject force-include). The command
itself lives in hf_quant.optimum_cli."""

from hf_quant.optimum_cli import HfQuantCommand

REGISTER_COMMANDS = [HfQuantCommand]
