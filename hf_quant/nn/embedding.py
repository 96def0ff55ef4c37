"""Quantized embeddings: `QuantEmbedding` (replaces an nn.Embedding) and `QuantTiedHead` (an output head tied to it).

The table [num_embeddings, embedding_dim] is stored like a linear weight [out, in]: one row per token, grouped along
the hidden dimension, with the scalar formats' canonical tensors (codes, scales, zero-points, double-quant blocks).
A lookup decodes only the gathered rows (`gather_rows`: the selected rows' codes and scales go through the formats'
one decoding function, `formats.scalar.dequantize_codes`), never the whole table, so the result equals
`dequantize()[ids]` exactly.

A head tied to the embedding (lm_head with `tie_word_embeddings`) is a `QuantTiedHead`: it holds no tensor of its
own and computes logits = x @ W^T from the embedding's packed tensors with the selected linear kernel, so the
checkpoint stores the table once and a reload keeps them tied.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantScheme, dequantize_codes, quantize, unpack_bits
from ..formats.format import active_terms
from ..formats.scalar import DQ_BLOCK, ScalarFormat
from .quantized import PackedWeight


def embedding_scheme_problem(scheme: QuantScheme) -> str | None:
    """Why `scheme` cannot store an embedding table (None: it can). Row lookups decode per-row codes and scales, which
    the scalar formats store; additive terms (low-rank factors, sparse outliers) are not gathered."""
    if not isinstance(scheme.codec, ScalarFormat):
        scalar = [n for n, f in _formats().items() if isinstance(f, ScalarFormat)]
        return (f"format={scheme.format!r} has no per-row scalar codes; embeddings take the formats {scalar} "
                "(e.g. {'format': 'int', 'bits': 8})")
    terms = [t.field for t in active_terms(scheme)]
    if terms:
        return f"{', '.join(f'{t}={getattr(scheme, t)}' for t in terms)} is not supported for embeddings (set it to 0)"
    return None


def _formats():
    from ..formats import FORMATS

    return FORMATS


def _gathered_params(scheme: QuantScheme, tensors: dict[str, torch.Tensor], name: str,
                     ids: torch.Tensor) -> torch.Tensor:
    """Float32 scales (or zero-points) [n, n_groups] of rows `ids`: as `formats.scalar.decode_params` decodes them
    for the whole table (double quant: each value's 8-bit code times its block's step plus offset, the blocks being
    64 consecutive values of the flattened table), for the gathered rows only."""
    stored = tensors[name]
    if not scheme.double_quant:
        return stored[ids].float()
    n_groups = stored.shape[-1]
    flat = ids[:, None] * n_groups + torch.arange(n_groups, device=ids.device)
    meta = tensors[f"{name}_dq"].float()[flat // DQ_BLOCK]  # [n, n_groups, 2]
    return stored.reshape(-1)[flat].float() * meta[..., 0] + meta[..., 1]


def gather_rows(scheme: QuantScheme, tensors: dict[str, torch.Tensor], ids: torch.Tensor, embedding_dim: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` (1-D int64) of a packed table of width `embedding_dim`, decoded: equal to
    `dequantize(scheme, tensors, embedding_dim, dtype)[ids]`, reading only the gathered rows' tensors."""
    codes = unpack_bits(tensors["qweight"][ids], scheme.bits, embedding_dim)
    scale = _gathered_params(scheme, tensors, "scales", ids)
    zero = _gathered_params(scheme, tensors, "zeros", ids) if scheme.has_zero else None
    return dequantize_codes(scheme, codes, scale, zero, embedding_dim, torch.float32).to(dtype)


def embedding_scale_of(module: nn.Embedding) -> tuple[float | None, bool]:
    """(scale, as_tensor) of a transformers scaled word embedding (`...ScaledWordEmbedding`: the lookup times
    `embed_scale`; Gemma, Bart, ...), (None, False) for a plain nn.Embedding. as_tensor: the class multiplies by a
    tensor cast to the weight's dtype (rather than by a Python float), which rounds the scale first."""
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return None, False
    if isinstance(scale, torch.Tensor):
        value = getattr(module, "scalar_embed_scale", None)  # (the buffer is on the meta device before loading)
        if value is None:
            if scale.device.type == "meta":
                raise ValueError(f"{type(module).__name__}.embed_scale is not known before its weights load")
            value = float(scale)
        return float(value), True
    return float(scale), False


class QuantEmbedding(PackedWeight):
    """An embedding table [num_embeddings, embedding_dim] stored packed; forward(ids) decodes the gathered rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme, padding_idx: int | None = None,
                 embed_scale: float | None = None, scale_as_tensor: bool = False, device=None,
                 dtype: torch.dtype | None = None):
        problem = embedding_scheme_problem(scheme)
        if problem is not None:
            raise ValueError(f"QuantEmbedding: {problem}")
        super().__init__(scheme, (num_embeddings, embedding_dim), device=device)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        self.scale_as_tensor = scale_as_tensor
        self.compute_dtype = dtype or torch.float32
        self.float_class: type = nn.Embedding  # what `to_float` builds (a scaled subclass keeps its class)
        self.float_attributes: dict = {}  # that class's plain attributes (sizes, padding_idx, scalar_embed_scale ...)

    @classmethod
    def check_supported(cls, name: str, module: nn.Module, scheme: QuantScheme) -> None:
        """Raise ValueError naming the module and the fix when `module` cannot become a QuantEmbedding."""
        fix = f"keep it in float with overrides={{{name!r}: None}} (or quantize_embeddings=False)"
        problem = embedding_scheme_problem(scheme)
        if problem is None and not isinstance(module, nn.Embedding):
            problem = f"it is a {type(module).__name__}, not an nn.Embedding"
        if problem is None and getattr(module, "max_norm", None) is not None:
            problem = "max_norm renormalizes rows of the float table at lookup"
        if problem is None and type(module).forward is not nn.Embedding.forward and not hasattr(module, "embed_scale"):
            problem = (f"{type(module).__name__} overrides nn.Embedding.forward (only plain lookups and "
                       "transformers' scaled word embeddings, lookup * embed_scale, are quantized)")
        if problem is None:
            try:
                embedding_scale_of(module)
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            raise ValueError(f"cannot quantize the embedding {name!r}: {problem}. Fix: give it a supported scheme "
                             f"(overrides={{{name!r}: {{...}}}}), or {fix}")

    @classmethod
    def like(cls, module: nn.Embedding, scheme: QuantScheme, device=None, dtype=None) -> "QuantEmbedding":
        """An empty QuantEmbedding standing for `module` (its sizes, padding index, scale and float class)."""
        scale, as_tensor = embedding_scale_of(module)
        q = cls(module.num_embeddings, module.embedding_dim, scheme, module.padding_idx, scale, as_tensor,
                device=device, dtype=dtype)
        q.float_class = type(module)
        q.float_attributes = {k: v for k, v in vars(module).items()
                              if not k.startswith("_") and k != "training" and isinstance(v, (int, float, bool, str,
                                                                                             type(None)))}
        return q

    @classmethod
    def from_float(cls, module: nn.Embedding, scheme: QuantScheme, name: str = "embedding") -> "QuantEmbedding":
        """Quantize an nn.Embedding (data-free, with `scheme`'s format)."""
        cls.check_supported(name, module, scheme)
        weight = module.weight.detach()
        q = cls.like(module, scheme, device=weight.device, dtype=weight.dtype)
        q.load_packed(quantize(weight, scheme))
        return q

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # (packed tensors only follow device moves)
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.dtype.is_floating_point:  # `model.half()` / `.to(dtype)`: lookups return the new dtype
            self.compute_dtype = probe.dtype
        return self

    def gathered_rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `ids` (any shape) of the table, decoded: [*ids.shape, embedding_dim]."""
        flat = ids.reshape(-1).to(device=self._buffers["qweight"].device, dtype=torch.long)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings}) in the embedding lookup")
        rows = gather_rows(self.scheme, self.packed_tensors(), flat, self.embedding_dim, dtype or self.compute_dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.gathered_rows(input_ids).to(input_ids.device)
        if self.embed_scale is not None:
            # as the float class does: times a float32 tensor cast to the table's dtype, or a Python float
            scale = torch.tensor(self.embed_scale).to(out.dtype) if self.scale_as_tensor else self.embed_scale
            out = out * scale
        return out

    def to_float(self, dtype: torch.dtype) -> nn.Embedding:
        """The float embedding of the table's class (nn.Embedding, or the scaled subclass it replaced)."""
        layer = self.float_class.__new__(self.float_class)
        nn.Module.__init__(layer)
        vars(layer).update(self.float_attributes)
        layer.weight = nn.Parameter(self.dequantize_weight(dtype), requires_grad=False)
        if self.scale_as_tensor:
            layer.register_buffer("embed_scale", torch.tensor(self.embed_scale, device=layer.weight.device),
                                  persistent=False)
        elif self.embed_scale is not None:
            layer.embed_scale = self.embed_scale
        return layer

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        scale = f", embed_scale={self.embed_scale:g}" if self.embed_scale is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}{scale}, {self._scheme_repr()}"


class QuantTiedHead(nn.Module):
    """An output head y = x W^T (+ b) whose W is a QuantEmbedding's table: the packed tensors are the embedding's
    (not registered here, so state dicts and checkpoints hold them once), the product runs on the selected kernel."""

    def __init__(self, embedding: QuantEmbedding, embedding_name: str, bias: nn.Parameter | None = None):
        super().__init__()
        self.__dict__["_tied"] = (embedding,)  # a plain attribute: not a submodule, so its buffers are not repeated
        self.tied_to = embedding_name
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings
        self.bias = bias

    @property
    def embedding(self) -> QuantEmbedding:
        return self.__dict__["_tied"][0]

    @property
    def scheme(self) -> QuantScheme:
        return self.embedding.scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        device = emb._buffers["qweight"].device
        y = emb.packed_linear(x.reshape(-1, self.in_features).to(device))
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.device)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def to_float(self, weight: nn.Parameter) -> nn.Linear:
        """The float head sharing `weight` (the dequantized embedding's parameter), tied again."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight = weight
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().to(weight.dtype), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tied to {self.tied_to} ({self.embedding._scheme_repr()})")


__all__ = ["QuantEmbedding", "QuantTiedHead", "embedding_scheme_problem", "gather_rows"]
