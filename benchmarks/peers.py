"""Other libraries' weight-only quantization, applied on CPU to the same modules hf_quant quantizes by default
(every nn.Linear but lm_head), so their quality, size and speed compare with ours.

Each peer quantizes a loaded float model in place and returns its quantized modules for
``hf_quant.eval.model_storage(model, quantized=...)``, which counts every tensor they store (packed codes,
scales, zero-points, nested statistics, serialized quant state, tensor-subclass internals) at its real size.
Install them without letting pip replace torch: ``pip install --no-deps bitsandbytes hqq optimum-quanto torchao``
(the ``bench`` extra in pyproject.toml lists them).

    from benchmarks.peers import PEERS
    quantized = PEERS["bnb nf4 b64"].apply(model)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hf_quant.eval.storage import QuantizedModule

SKIP = ("lm_head",)  # hf_quant's default modules_to_not_convert (embeddings are not nn.Linear)


@dataclass(frozen=True)
class Peer:
    name: str
    library: str  # import name, for the version and the error when it is missing
    bits: int  # nominal code width, to group rows with ours
    quantize: Callable[[nn.Module, dict[str, nn.Linear]], None]  # in place, on the given linears

    def apply(self, model: nn.Module) -> dict[str, QuantizedModule]:
        targets = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] not in SKIP}
        shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
        self.quantize(model, targets)
        return {n: QuantizedModule(self.name, shapes[n], type(model.get_submodule(n)).__name__) for n in targets}


def library_version(library: str) -> str:
    return getattr(importlib.import_module(library), "__version__", "?")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# --------------------------------------------------------------------------- bitsandbytes


def _bnb_4bit(quant_type: str, blocksize: int = 64, nested: bool = True):
    def quantize(model, targets):
        import bitsandbytes as bnb

        for name, lin in targets.items():
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=lin.weight.dtype, compress_statistics=nested, quant_type=quant_type)
            new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type=quant_type,
                                           blocksize=blocksize, compress_statistics=nested)
            if lin.bias is not None:
                new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            _replace(model, name, new.to("cpu"))  # Params4bit quantizes on the move to a device

    return quantize


def _bnb_int8(model, targets):
    import bitsandbytes as bnb

    for name, lin in targets.items():
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  has_fp16_weights=False, threshold=0.0)
        new.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        _replace(model, name, new.to("cpu"))


# --------------------------------------------------------------------------- HQQ


def _hqq(nbits: int, group_size: int, half_meta: bool = False):
    """HQQ keeps its scale and zero-point in the compute dtype: float32 here, so g64 costs 5 bits per weight.
    `half_meta` stores them as float16 (HQQ's layout in a float16 model; 4.5 bits at g64) while the layer still
    computes in float32, so HQQ is also measured at the storage the issue quotes for it."""
    def quantize(model, targets):
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
        for name, lin in targets.items():
            layer = HQQLinear(lin, config, compute_dtype=lin.weight.dtype, device="cpu")
            if half_meta:
                layer.meta["scale"] = layer.meta["scale"].half()
                layer.meta["zero"] = layer.meta["zero"].half()
            _replace(model, name, layer)

    return quantize


# --------------------------------------------------------------------------- optimum-quanto


def _quanto(weights: str):
    def quantize(model, targets):
        import optimum.quanto as quanto

        quanto.quantize(model, weights=getattr(quanto, weights), exclude=[n for n, _ in model.named_modules()
                                                                          if n.split(".")[-1] in SKIP])
        quanto.freeze(model)

    return quantize


# --------------------------------------------------------------------------- torchao


def _torchao(make_config: Callable[[], object]):
    def quantize(model, targets):
        from torchao.quantization import quantize_

        names = set(targets)
        quantize_(model, make_config(), filter_fn=lambda module, fqn: fqn in names)

    return quantize


def _torchao_int8():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _torchao_intx(bits: int, group_size: int):
    def make():
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size))

    return make


def _torchao_int4(group_size: int):
    def make():
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group_size)

    return make


# --------------------------------------------------------------------------- the list

_ALL = [
    Peer("bnb int8", "bitsandbytes", 8, _bnb_int8),
    Peer("bnb nf4 b64", "bitsandbytes", 4, _bnb_4bit("nf4")),
    Peer("bnb fp4 b64", "bitsandbytes", 4, _bnb_4bit("fp4")),
    Peer("hqq int8 g64", "hqq", 8, _hqq(8, 64)),
    Peer("hqq int4 g64", "hqq", 4, _hqq(4, 64)),
    Peer("hqq int4 g128", "hqq", 4, _hqq(4, 128)),
    Peer("hqq int4 g64 fp16 meta", "hqq", 4, _hqq(4, 64, half_meta=True)),
    Peer("hqq int4 g128 fp16 meta", "hqq", 4, _hqq(4, 128, half_meta=True)),
    Peer("hqq int3 g64", "hqq", 3, _hqq(3, 64)),
    Peer("hqq int2 g32", "hqq", 2, _hqq(2, 32)),
    Peer("quanto qint8", "optimum.quanto", 8, _quanto("qint8")),
    Peer("quanto qint4 g128", "optimum.quanto", 4, _quanto("qint4")),
    Peer("quanto qint2 g128", "optimum.quanto", 2, _quanto("qint2")),
    Peer("torchao int8", "torchao", 8, _torchao(_torchao_int8)),
    Peer("torchao int4 g128", "torchao", 4, _torchao(_torchao_int4(128))),
    Peer("torchao intx4 g64", "torchao", 4, _torchao(_torchao_intx(4, 64))),
    Peer("torchao intx3 g64", "torchao", 3, _torchao(_torchao_intx(3, 64))),
    Peer("torchao intx2 g32", "torchao", 2, _torchao(_torchao_intx(2, 32))),
]
PEERS = {p.name: p for p in _ALL}
