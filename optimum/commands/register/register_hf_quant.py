"""Registers `optimum-cli hf-quant ...` (optimum discovers the modules of the `optimum.commands.register`
namespace package; this file ships in the hf-quant wheel, the command lives in hf_quant.integrations.optimum_cli)."""

from hf_quant.integrations.optimum_cli import HfQuantCommand

REGISTER_COMMANDS = [HfQuantCommand]
