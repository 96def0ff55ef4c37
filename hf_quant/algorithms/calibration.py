"""Calibration-based quantization of a loaded float model, one transformer block at a time.

1. Calibration data (a list of texts, a local text file, a `datasets` dataset, or by default the part of Botchan
   after the first `BOTCHAN_EVAL_TOKENS` tokens, which hf_quant's perplexity evaluation never reads) is tokenised
   into `n_samples` windows of `seq_len` tokens.
2. The model runs up to its first block; that block's inputs (and the keyword arguments the model passes its
   blocks: attention mask, rotary embeddings) are kept.
3. For each block: one pass with the float block accumulates the Hessian X^T X of every linear's inputs (linears
   reading the same tensor, e.g. q/k/v, share one); its linears are quantized (GPTQ, or the data-free method a
   module's scheme names) and replaced by `QuantLinear`; a second pass through the quantized block gives the next
   block's inputs. Only one block's activations and Hessians are alive at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module

from ..config import CALIBRATION_METHODS
from ..formats import QuantParams, QuantScheme, pack
from ..formats.scheme import PLANE_FORMATS
from ..nn import QuantLinear, float_weight_of
from . import data_free_scheme, quantize_weight
from .experts import ExpertHessians, quantize_experts_param
from .gptq import gptq_quantize
from .lowrank import quantize_weight_lowrank
from .sparse import quantize_weight_outliers
from .ternary import gptq_quantize_ternary
from .vq import gptq_quantize_vq

logger = logging.getLogger(__name__)

# hf_quant's perplexity evaluation reads at most the first 4096 tokens of Botchan (`eval.perplexity` default);
# calibration starts well after them, so calibrated results are not measured on their own calibration text.
BOTCHAN_EVAL_TOKENS = 8192
_BLOCK_BATCH = 8  # calibration sequences per forward of a block
_AWQ_TOKENS = 4096  # input rows kept per linear group for AWQ's scale search


@dataclasses.dataclass
class CalibrationReport:
    n_samples: int
    seq_len: int
    blocks: int
    quantized_modules: int
    seconds: float
    peak_rss_bytes: int  # the process's peak resident memory (includes loading the model)
    peak_calibration_bytes: int  # largest size of the held activations + Hessians (one block's worth)

    def summary(self) -> str:
        return (
            f"calibrated {self.quantized_modules} modules in {self.blocks} blocks on {self.n_samples}x{self.seq_len} "
            f"tokens in {self.seconds:.1f} s; activations+Hessians peak {self.peak_calibration_bytes / 2**20:.0f} MiB, "
            f"process peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )


# --------------------------------------------------------------------------- calibration data


def _read_dataset_text(spec: dict, min_chars: int) -> str:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "calibration_dataset needs the `datasets` package (pip install datasets), or pass "
            "calibration=<list of texts or a local text file>"
        ) from None
    ds = datasets.load_dataset(spec["path"], spec.get("name"), split=spec.get("split", "train"))
    field = spec.get("text_field", "text")
    if field not in ds.column_names:
        raise ValueError(f"calibration_dataset: {spec['path']!r} has no column {field!r} (columns: {ds.column_names}); "
                         "set calibration_dataset['text_field']")
    parts, size = [], 0
    for row in ds:
        text = row[field]
        if text:
            parts.append(text)
            size += len(text)
            if size >= min_chars:
                break
    return "\n\n".join(parts)


def calibration_text(config) -> tuple[str | None, str]:
    """(text, description) of the configured calibration source; text None means the built-in Botchan slice."""
    if config.calibration_dataset is not None:
        spec = config.calibration_dataset
        # Roughly 4 characters per token, twice over so the windows need not overlap.
        return _read_dataset_text(spec, 8 * config.n_samples * config.seq_len), f"dataset {spec['path']}"
    source = config.calibration
    if source is None or source == "botchan":
        return None, f"Botchan after its first {BOTCHAN_EVAL_TOKENS} tokens"
    if isinstance(source, str):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"calibration={source!r} is not a file; give a UTF-8 text file, a list of texts, or "
                             "'botchan'")
        return path.read_text(encoding="utf-8"), f"file {path}"
    return "\n\n".join(source), f"{len(source)} texts"


def calibration_token_ids(tokenizer, config) -> torch.Tensor:
    """[n_samples, seq_len] token ids: windows spread evenly over the tokenised calibration text (they overlap only
    when the text has fewer than n_samples * seq_len tokens)."""
    text, what = calibration_text(config)
    if text is None:
        from ..assets import botchan_text

        ids = tokenizer(botchan_text(), add_special_tokens=False, verbose=False)["input_ids"][BOTCHAN_EVAL_TOKENS:]
    else:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n, length = config.n_samples, config.seq_len
    if len(ids) < length:
        raise ValueError(f"calibration data ({what}) has {len(ids)} tokens, fewer than seq_len={length}; give more "
                         "text or lower seq_len")
    starts = torch.linspace(0, len(ids) - length, n).round().long().tolist()
    tokens = torch.tensor(ids, dtype=torch.long)
    return torch.stack([tokens[s : s + length] for s in starts])


# --------------------------------------------------------------------------- model structure


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module) of the model's transformer blocks: the ModuleList of `num_hidden_layers` blocks with linears."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n and any(
            isinstance(m, (nn.Linear, Conv1D, QuantLinear)) for m in module[0].modules()
        ):
            return name, module
    raise ValueError(f"calibration: found no list of {n} transformer blocks in {type(model).__name__}")


def calibration_targets(model: nn.Module, config, modules_to_not_convert: list[str]) -> dict[str, QuantScheme]:
    """Module name -> scheme of every linear to quantize (the modules quantize-on-load would replace)."""
    targets = {}
    for name, module in model.named_modules():
        if not name or not should_convert_module(name, modules_to_not_convert):
            continue
        if type(module) is nn.Linear or isinstance(module, Conv1D):
            scheme = config.scheme_for(name)
            if scheme is not None:
                targets[name] = scheme
    return targets


def expert_targets(model: nn.Module, config, modules_to_not_convert: list[str]) -> dict[str, dict[str, QuantScheme]]:
    """Experts module name -> {3-D parameter name: scheme} of the fused MoE experts to quantize."""
    from ..quantizer import expert_params, is_fused_experts

    if not config.quantize_experts:
        return {}
    out = {}
    for name, module in model.named_modules():
        if name and is_fused_experts(module) and should_convert_module(name, modules_to_not_convert):
            schemes = {p: config.scheme_for(f"{name}.{p}") for p in expert_params(module)}
            schemes = {p: s for p, s in schemes.items() if s is not None}
            if schemes:
                out[name] = schemes
    return out


def check_calibration_supported(model: nn.Module, config) -> None:
    """Raise before weights load for models the block-by-block pipeline cannot calibrate."""
    layer_types = getattr(model.config, "layer_types", None) or []
    if len(set(layer_types)) > 1:
        raise ValueError(
            f"calibration methods need every block to take the same attention inputs; {type(model).__name__} mixes "
            f"layer types {sorted(set(layer_types))}. Use a data-free method (method='mse')"
        )
    from ..quantizer import expert_params, is_fused_experts

    if config.quantize_experts and config.rotation == "hadamard" and any(
            is_fused_experts(m) and expert_params(m) for m in model.modules()):
        raise ValueError(
            "rotation='hadamard' does not rotate fused MoE expert tensors (no online rotation inside the experts "
            "loop); set quantize_experts=False (experts stay in float) or rotation=None"
        )


class _StopForward(Exception):
    pass


def _capture_first_block_inputs(model, block, token_ids, batch):
    """Per batch of sequences: (hidden states entering `block`, its other positional args, its keyword args)."""
    captured = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, args[1:], kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    try:
        for i in range(0, token_ids.shape[0], batch):
            try:
                model(input_ids=token_ids[i : i + batch].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- the block loop


class _InputCollector:
    """Accumulates X^T X of the inputs of a block's linears (those in `hessian_of`), and keeps a sample of the input
    rows of those in `sample_of` (every `sample_stride`-th token); linears fed the same tensor share both."""

    def __init__(self, modules: dict[str, nn.Module], hessian_of: set[str], sample_of: set[str], sample_stride: int,
                 token_weights: bool = False):
        # With token weights (RSQ), a batch's Hessian updates wait for `end_batch(weights)`: the weights come from the
        # block's attention, which runs after the q/k/v projections have been called.
        self.token_weights = token_weights
        self._pending: list[tuple[str, torch.Tensor]] = []
        self.leader: dict[str, str] = {}  # module name -> the module whose statistics it shares
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.hessian_of, self.sample_of, self.stride = hessian_of, sample_of, sample_stride
        # (data_ptr, shape, stride) of each input seen in the current batch -> (first module fed it, the tensor). The
        # tensor is held so that its memory cannot be freed and handed to a later input of the same shape (o_proj's
        # or gate_proj's after q_proj's), which would then share the wrong module's statistics.
        self._batch_inputs: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def new_batch(self) -> None:
        self._batch_inputs.clear()
        self._pending.clear()

    def end_batch(self, weights: torch.Tensor | None) -> None:
        """Accumulate the batch's deferred Hessian updates, each token's row weighted by `weights` [batch, tokens]."""
        for name, x in self._pending:
            self._accumulate(name, x, None if weights is None else weights.reshape(-1, 1).to(x))
        self._pending.clear()

    def _accumulate(self, name: str, x: torch.Tensor, weights: torch.Tensor | None) -> None:
        h = self.hessians.get(name)
        if h is None:
            h = self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.counts[name] = 0.0
        h.addmm_((x * weights if weights is not None else x).t(), x)
        self.counts[name] += x.shape[0] if weights is None else float(weights.sum())

    def _hook(self, name):
        def hook(_module, args, _output):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            first, _ = self._batch_inputs.setdefault(key, (name, x))
            leader = self.leader.setdefault(name, first)
            if leader != name:
                return
            x = x.detach().reshape(-1, x.shape[-1]).float()
            if name in self.sample_of:
                self.samples.setdefault(name, []).append(x[:: self.stride].clone())
            if name not in self.hessian_of:
                return
            if self.token_weights:
                self._pending.append((name, x))
            else:
                self._accumulate(name, x, None)

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        leader = self.leader[name]
        return self.hessians[leader] / max(self.counts[leader], 1.0)

    def sample(self, name: str) -> torch.Tensor:
        return torch.cat(self.samples[self.leader[name]])

    def held_bytes(self) -> int:
        return (_nbytes(self.hessians.values()) + _nbytes(t for ts in self.samples.values() for t in ts)
                + _nbytes(t for _, t in self._batch_inputs.values()))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _AttentionImportance:
    """RSQ-style token importance ("attention concentration"): the attention each token receives in a block, as
    probabilities averaged over heads and summed over queries, relative to its sequence's mean and clipped to
    [0.1, 10] (an attention sink would otherwise take all the weight)."""

    def __init__(self, block: nn.Module):
        self.weights: torch.Tensor | None = None
        self._handles = [m.register_forward_hook(self._hook) for m in block.modules()]

    def _hook(self, _module, _args, output):
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if isinstance(probs, torch.Tensor) and probs.dim() == 4:
            received = probs.float().mean(1).sum(1)  # [batch, heads, queries, keys] -> [batch, keys]
            self.weights = (received / received.mean(-1, keepdim=True)).clamp(0.1, 10.0)

    def take(self) -> torch.Tensor:
        if self.weights is None:
            raise ValueError("token_weighting='attention' found no attention probabilities in the block (the model's "
                             "attention does not return them); use token_weighting=None")
        weights, self.weights = self.weights, None
        return weights

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _apply_awq(block: nn.Module, names: set[str], schemes: dict[str, QuantScheme], collector) -> None:
    """Search and fold AWQ scales for every group of `block` whose linears all use method 'awq'."""
    from .awq import scaling_groups, search_scale, fold_scale

    for prev, linears in scaling_groups(block, names):
        layers = [block.get_submodule(n) for n in linears]
        scale, _ = search_scale(collector.sample(linears[0]), [float_weight_of(m) for m in layers],
                                [schemes[n] for n in linears])
        fold_scale(block.get_submodule(prev), layers, scale)


def _quantized_module(module: nn.Module, scheme: QuantScheme, packed: dict | None, rotation=None) -> QuantLinear:
    """The QuantLinear of `module`: from its canonical tensors `packed` when given, else quantized data-free (of
    W R when rotated)."""
    weight = float_weight_of(module)
    if rotation is not None:
        weight = rotation.rotate_weight(weight).to(weight.dtype)
    q = QuantLinear(weight.shape[1], weight.shape[0], module.bias is not None, scheme, device=weight.device,
                    dtype=weight.dtype)
    if packed is None:
        # Rounding without calibrated codes: the data-free search (AWQ's scaled weights are rounded this way too).
        data_free = data_free_scheme(scheme)
        packed = quantize_weight(weight, data_free)
    q.load_packed(packed)
    q.input_rotation = rotation
    q.source_is_conv1d = isinstance(module, Conv1D)
    if module.bias is not None:
        q.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    q.requires_grad_(False)
    return q


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, *, damp: float = 0.01,
                act_order: bool = True, static_groups: bool = True) -> dict[str, torch.Tensor]:
    """Canonical tensors of one weight [out, in] quantized by GPTQ against `hessian`, for every format and additive
    term: VQ vectors and trit-planes take GPTQ's error feedback through their own rounding (GPTVQ); sparse outliers
    are ranked by |w| sqrt(H_ii) (SpQR's diagonal sensitivity) and the low-rank factors are fitted to the residual
    in the metric of the (damped) Hessian itself, both around GPTQ-quantized codes."""
    importance = torch.diagonal(hessian).float().clamp_min(0)

    def quantize(w: torch.Tensor, s: QuantScheme) -> dict[str, torch.Tensor]:
        if s.outliers_per_row:
            return quantize_weight_outliers(w, s, importance=importance, quantize=quantize)
        if s.lowrank_rank:
            return quantize_weight_lowrank(w, s, quantize=quantize, input_whitening=_whitening(hessian, damp))
        if s.format == "vq":
            return gptq_quantize_vq(w, hessian, s, damp=damp, act_order=act_order)
        if s.format == "ternary":
            return gptq_quantize_ternary(w, hessian, s, damp=damp, act_order=act_order)
        return pack(s, gptq_quantize(w, hessian, s, damp=damp, act_order=act_order, static_groups=static_groups))

    return quantize(weight, scheme)


def _whitening(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower Cholesky factor C of H + damp * mean(diag H) I (H = C C^T), damped as GPTQ damps H."""
    h = hessian.double()
    diag = torch.diagonal(h)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = float(diag.clamp_min(0).mean())
    return torch.linalg.cholesky(h + max(damp * mean, 1e-12) * eye).float()


def _stackable(scheme: QuantScheme) -> bool:
    """Whether linears sharing a Hessian and this scheme can be quantized as one stacked weight: only plain scalar
    codes. Double-quantized scales (second-level blocks of 64 counted per module), per-matrix VQ codebooks and
    additive terms are per module."""
    return (scheme.format not in PLANE_FORMATS and not scheme.double_quant and not scheme.lowrank_rank
            and not scheme.outliers_per_row)


def _gptq_group(names, modules, schemes, hessian, config, rotation=None) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ of linears sharing one Hessian: name -> canonical tensors. Those with one stackable scheme are stacked
    into one weight (same Hessian, so the result is that of quantizing each alone, in one pass)."""
    kwargs = dict(damp=config.damp, act_order=config.act_order, static_groups=config.static_groups)
    out = {}
    batches: dict[QuantScheme, list[str]] = {}
    for name in names:
        batches.setdefault(schemes[name], []).append(name)
    for scheme, members in batches.items():
        runs = [members] if _stackable(scheme) else [[m] for m in members]
        for run in runs:
            weights = [float_weight_of(modules[m]).float() for m in run]
            if rotation is not None:
                weights = [rotation.rotate_weight(w) for w in weights]
            if len(run) == 1:
                out[run[0]] = gptq_weight(weights[0], hessian, scheme, **kwargs)
                continue
            params = gptq_quantize(torch.cat(weights), hessian, scheme, **kwargs)
            row = 0
            for m, w in zip(run, weights):
                sl = slice(row, row + w.shape[0])
                out[m] = pack(scheme, QuantParams(params.codes[sl], params.scale[sl],
                                                  None if params.zero is None else params.zero[sl]))
                row += w.shape[0]
    return out


@torch.no_grad()
def quantize_with_calibration(
    model: nn.Module, config, modules_to_not_convert: list[str], tokenizer=None, progress: bool = True
) -> CalibrationReport:
    """Quantize the linears of a loaded float `model` as `config` says, calibrating block by block."""
    start = time.perf_counter()
    targets = calibration_targets(model, config, modules_to_not_convert)
    experts = expert_targets(model, config, modules_to_not_convert)
    if not targets and not experts:
        raise ValueError(
            f"hf_quant found no nn.Linear or Conv1D weight to quantize in {type(model).__name__} "
            f"(modules_to_not_convert={config.modules_to_not_convert}, overrides={config.overrides})"
        )
    offloaded = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()} & {"disk", "meta"})
    if offloaded:
        raise ValueError(
            f"quantizing after loading (method={config.method!r}, rotation={config.rotation!r}) needs every weight in "
            f"memory, but device_map offloads some to {offloaded}; load with device_map='cpu' (or a GPU), or use a "
            "data-free method, which quantizes while loading"
        )
    blocks_name, blocks = decoder_blocks(model)
    prefixes = [f"{blocks_name}.{i}." for i in range(len(blocks))]
    outside = [n for n, s in targets.items() if s.method in CALIBRATION_METHODS
               and not any(n.startswith(p) for p in prefixes)]
    if outside:
        raise ValueError(
            f"{config.method} calibrates linears inside the transformer blocks only; {outside} lie outside them. Keep "
            f"them in float (modules_to_not_convert) or quantize them data-free: overrides={{{outside[0]!r}: "
            "{'method': 'mse'}}"
        )
    if config.rotation == "residual":
        from .rotation import fold_residual_rotation

        fold_residual_rotation(model, config.rotation_seed, blocks_name, blocks)
    rotations = _rotations(blocks, prefixes, targets, config)
    needs_data = config.needs_calibration
    if needs_data and tokenizer is None:
        from transformers import AutoTokenizer

        source = getattr(model, "name_or_path", None)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(
                f"calibration needs the model's tokenizer, and none could be loaded from {source!r} ({e}); save one "
                "with the model"
            ) from None
    token_ids = calibration_token_ids(tokenizer, config) if needs_data else torch.empty(0, 0, dtype=torch.long)

    if experts and hasattr(model, "set_experts_implementation"):
        # The eager experts loop indexes one expert at a time, which packed experts support (and the hooks see).
        model.set_experts_implementation("eager")
    was_training = model.training
    model.eval()
    attn_implementation = model.config._attn_implementation
    if config.token_weighting is not None:
        model.set_attn_implementation("eager")  # the only implementation that returns attention probabilities
    peak_held = 0
    done = 0
    try:
        states = _capture_first_block_inputs(model, blocks[0], token_ids, _BLOCK_BATCH) if needs_data else []
        # Data-free modules outside the blocks need no activations.
        for name, scheme in targets.items():
            if not any(name.startswith(p) for p in prefixes):
                model.set_submodule(name, _quantized_module(model.get_submodule(name), scheme, None))
                done += 1
        bar = _progress(len(blocks), progress)
        for index, (block, prefix) in enumerate(zip(blocks, prefixes)):
            local = {n[len(prefix):]: s for n, s in targets.items() if n.startswith(prefix)}
            modules = {n: block.get_submodule(n) for n in local}
            gptq = {n for n, s in local.items() if s.method == "gptq"}
            awq = {n for n, s in local.items() if s.method == "awq"}
            local_experts = {n[len(prefix):]: ps for n, ps in experts.items() if n.startswith(prefix)}
            expert_stats = {n: ExpertHessians(prefix + n, block.get_submodule(n)) for n, ps in local_experts.items()
                            if any(sc.method == "gptq" for sc in ps.values())}
            params: dict[str, dict[str, torch.Tensor]] = {}
            if gptq or awq or expert_stats:
                stride = max(1, token_ids.numel() // _AWQ_TOKENS)
                weighted = config.token_weighting is not None
                collector = _InputCollector({n: modules[n] for n in gptq | awq}, gptq, awq, stride, weighted)
                importance = _AttentionImportance(block) if weighted else None
                try:
                    for hidden, args, kwargs in states:
                        collector.new_batch()
                        block(hidden, *args, **kwargs)
                        collector.end_batch(importance.take() if importance else None)
                finally:
                    collector.remove()
                    if importance:
                        importance.remove()
                    for stats in expert_stats.values():
                        stats.remove()
                peak_held = max(peak_held, _nbytes(s[0] for s in states) * 2 + collector.held_bytes())
                if awq:
                    _apply_awq(block, awq, local, collector)
                groups: dict[str, list[str]] = {}
                for n in gptq:
                    groups.setdefault(collector.leader[n], []).append(n)
                for leader, names in groups.items():
                    rotation = rotations.get(prefix + leader)
                    hessian = collector.hessian(leader)
                    if rotation is not None:  # every member shares in_features, hence the rotation
                        hessian = rotation.rotate_hessian(hessian)
                    params.update(_gptq_group(names, modules, local, hessian, config, rotation))
                del collector
            gptq_kwargs = dict(damp=config.damp, act_order=config.act_order, static_groups=config.static_groups)
            for n, schemes in local_experts.items():  # packed in place: the pass below already sees them quantized
                module = block.get_submodule(n)
                for pname, scheme in schemes.items():
                    q = quantize_experts_param(module, pname, scheme, expert_stats.get(n), gptq_kwargs)
                    del module._parameters[pname]
                    module.add_module(pname, q)
                    done += 1
            expert_stats.clear()
            quantized = {n: _quantized_module(modules[n], scheme, params.get(n), rotations.get(prefix + n))
                         for n, scheme in local.items()}
            if needs_data and index + 1 < len(blocks):  # the last block's outputs are not needed
                # The next block sees this block's quantized outputs. The float linears hold the dequantized
                # weights for this pass (the fused kernels are slower than a dense matmul at this many tokens).
                originals = {n: modules[n].weight.data for n in quantized}
                for n, q in quantized.items():
                    w = q.to_float(originals[n].dtype).weight.data
                    modules[n].weight.data = w.t() if q.source_is_conv1d else w
                states = [(_block_output(block(h, *a, **kw)), a, kw) for h, a, kw in states]
                del originals
            for n, q in quantized.items():
                block.set_submodule(n, q)
                done += 1
            bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
        if model.config._attn_implementation != attn_implementation:
            model.set_attn_implementation(attn_implementation)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = CalibrationReport(token_ids.shape[0], token_ids.shape[-1], len(blocks), done,
                               time.perf_counter() - start, rss, peak_held)
    logger.info(report.summary())
    return report


def _rotations(blocks, prefixes, targets, config) -> dict[str, object]:
    """Full module name -> its online input rotation (rotation='hadamard'): linears inside blocks. None and
    'residual' (folded into the weights, nothing online) have none."""
    if config.rotation != "hadamard":
        return {}
    from .rotation import HadamardRotation

    out = {}
    for prefix, block in zip(prefixes, blocks):
        for name, module in block.named_modules():
            full = prefix + name
            if full in targets:
                in_features = float_weight_of(module).shape[1]
            elif isinstance(module, QuantLinear):
                in_features = module.in_features
            else:
                continue
            out[full] = HadamardRotation(in_features, config.rotation_seed)
    return out


def attach_rotations(model: nn.Module, config) -> None:
    """Pre-quantized load of a rotated checkpoint: give every QuantLinear inside the blocks its input rotation."""
    blocks_name, blocks = decoder_blocks(model)
    prefixes = [f"{blocks_name}.{i}." for i in range(len(blocks))]
    for name, rotation in _rotations(blocks, prefixes, {}, config).items():
        model.get_submodule(name).input_rotation = rotation


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="hf_quant calibration (blocks)", disable=not enabled, unit="block")


__all__ = [
    "BOTCHAN_EVAL_TOKENS",
    "CALIBRATION_METHODS",
    "CalibrationReport",
    "calibration_token_ids",
    "attach_rotations",
    "check_calibration_supported",
    "quantize_with_calibration",
]
