"""`optimum-cli hf-quant quantize|inspect|push|...`: the `hf-quant` subcommands under optimum's CLI, built by the
same `hf_quant.cli.add_commands` and run by the same `hf_quant.cli.run`."""

from __future__ import annotations

import argparse

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from . import cli


class _Invocation:
    """What optimum calls: `args.func(args).run()`. The subcommand's own handler is kept in `hf_quant_func`."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def run(self) -> None:
        self.args.func = self.args.hf_quant_func
        status = cli.run(self.args)
        if status:
            raise SystemExit(status)


class HfQuantCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="hf-quant", help="hf_quant low-bit quantization: quantize, inspect, push to the Hub")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="command", required=True)
        cli.add_commands(sub)
        # A subcommand's defaults override the parent's, and optimum sets the parent's `func` to build the object it
        # runs: hand optimum an _Invocation instead, keeping the hf-quant handler under another name.
        for subparser in sub.choices.values():
            subparser.set_defaults(hf_quant_func=subparser.get_default("func"), func=_Invocation)
