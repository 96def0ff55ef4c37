"""The one block loop of calibration-based quantization of a loaded float model.

1. Calibration data (pipeline/data.py) is tokenised into `n_samples` windows of `seq_len` tokens.
2. The model runs up to its first block; that block's inputs (and the keyword arguments the model passes its
   blocks: attention mask, rotary embeddings) are kept. In hybrid-attention models (layer_types mixing sliding-
   window and full attention: Gemma 2/3, gpt-oss, ...) it runs up to its last block once instead, keeping each
   block's own arguments.
3. For each block: the processors (pipeline/processors.py, one per method: AWQ, RSQ token weighting, GPTQ, fused
   experts) declare the statistics they need; one pass of the float block over the calibration inputs collects them
   (the Hessian X^T X of each linear's inputs, linears reading the same tensor sharing one); the processors choose
   codes or change the float block; every linear is packed into a `QuantLinear` (with the processors' codes, else
   rounded data-free); a second pass through the quantized block gives the next block's inputs. Only one block's
   activations and statistics are alive at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..algorithms import data_free_scheme, quantize_weight
from ..formats import CALIBRATION_METHODS, QuantScheme
from ..model import decoder_blocks, expert_params, find_targets, is_fused_experts
from ..nn import QuantLinear, float_weight_of
from .data import calibration_token_ids
from .processors import PROCESSORS, BlockContext
from .statistics import InputCollector, nbytes

logger = logging.getLogger(__name__)

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
    streamed: bool = False  # the blocks' float weights were read one block at a time (pipeline/streaming.py)
    largest_block_bytes: int = 0  # float weights of the largest block (held at once)
    largest_tensor_bytes: int = 0  # the largest single float weight tensor of the blocks
    # fused MoE experts calibrated with GPTQ: full module name -> (tokens the router sent each expert, tokens in each
    # expert's statistics: the same, or every token with moe_calibrate_all_experts)
    expert_tokens: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        how = "streamed block by block, " if self.streamed else ""
        return (
            f"calibrated {self.quantized_modules} modules in {self.blocks} blocks ({how}largest block "
            f"{self.largest_block_bytes / 2**20:.1f} MiB of float weights, largest tensor "
            f"{self.largest_tensor_bytes / 2**20:.1f} MiB) on {self.n_samples}x{self.seq_len} tokens in "
            f"{self.seconds:.1f} s; activations+Hessians peak {self.peak_calibration_bytes / 2**20:.0f} MiB, "
            f"process peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB{self._experts_summary()}"
        )

    def _experts_summary(self) -> str:
        if not self.expert_tokens:
            return ""
        routed = [n for r, _ in self.expert_tokens.values() for n in r]
        seen = [n for _, s in self.expert_tokens.values() for n in s]
        return (f"; {len(routed)} experts in {len(self.expert_tokens)} modules: routed tokens per expert "
                f"{min(routed)}-{max(routed)} ({routed.count(0)} unrouted), statistics from {min(seen)}-{max(seen)} "
                "tokens per expert")


def check_calibration_supported(model: nn.Module, config) -> None:
    """Raise before weights load for models the block-by-block pipeline cannot calibrate."""
    if config.quantize_experts and config.rotation == "hadamard" and any(
            is_fused_experts(m) and expert_params(m) for m in model.modules()):
        raise ValueError(
            "rotation='hadamard' does not rotate fused MoE expert tensors (no online rotation inside the experts "
            "loop); set quantize_experts=False (experts stay in float) or rotation=None"
        )


class _StopForward(Exception):
    pass


def _mixed_layer_types(model: nn.Module) -> bool:
    """Whether the model gives its blocks different attention inputs (sliding-window and full-attention layers get
    different masks, Gemma 3's also different rotary embeddings)."""
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
    return len(set(layer_types)) > 1


def _capture_block_inputs(model, blocks, token_ids, batch, every_block: bool, streamer=None):
    """Per batch of sequences: (hidden states entering blocks[0], its other positional args, its keyword args); and,
    with `every_block`, per block and batch the (positional args, keyword args) the model gives that block, so that
    each block of a hybrid-attention model is calibrated with its own mask and rotary embeddings. The float model
    then runs up to its last block once (the arguments do not depend on the hidden states, and the tensors are
    shared between blocks of one layer type); otherwise it stops at the first block."""
    captured = []
    per_block = [[] for _ in blocks] if every_block else None
    last = len(blocks) - 1 if every_block else 0

    def grab(index):
        def hook(_module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                captured.append((hidden, args[1:], kwargs))
            if per_block is not None:
                per_block[index].append((args[1:], kwargs))
            if index == last:
                raise _StopForward
        return hook

    handles = [blocks[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in range(last + 1)]
    if streamer is not None and streamer.device_map is not None:
        # A spreading device map: the rest of the model runs where the map put it; each block is calibrated on the
        # streamer's device, so its inputs (hidden states, mask, rotary embeddings) are moved there first.
        from accelerate.utils import send_to_device

        def to_block_device(_module, args, kwargs):
            return send_to_device(args, streamer.device), send_to_device(kwargs, streamer.device)

        handles += [blocks[i].register_forward_pre_hook(to_block_device, with_kwargs=True, prepend=True)
                    for i in range(last + 1)]
    if streamer is not None:  # blocks before the last run once per batch: each read, run and dropped in turn
        for i in range(last):
            handles.append(blocks[i].register_forward_pre_hook(lambda m, a, i=i: streamer.load(i)))
            handles.append(blocks[i].register_forward_hook(lambda m, a, o, i=i: streamer.offload(i)))
    # (accelerate's hooks move the ids on where the map runs the embedding; all offloaded: the CPU)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    try:
        for i in range(0, token_ids.shape[0], batch):
            try:
                model(input_ids=token_ids[i : i + batch].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return captured, per_block


def _quantize_outside_blocks(model: nn.Module, name: str, scheme) -> None:
    """Quantize a module outside the decoder blocks data-free. One that the device map offloads (its weights on meta,
    read by accelerate's hook at each forward) is quantized from its offloaded weights, and the packed module takes
    over the hook: same execution device and weights map; `offload_packed_tensors` then offloads its packed buffers."""
    module = model.get_submodule(name)
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        model.set_submodule(name, _quantized_module(module, scheme, None))
        return
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module
    from accelerate.utils import align_module_device

    with align_module_device(module, torch.device("cpu")):
        quantized = _quantized_module(module, scheme, None)
    remove_hook_from_module(module)
    model.set_submodule(name, quantized)
    add_hook_to_module(quantized, hook)


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def quantize_with_calibration(
    model: nn.Module, config, modules_to_not_convert: list[str], tokenizer=None, progress: bool = True,
    streamer=None,
) -> CalibrationReport:
    """Quantize the weights of a loaded float `model` as `config` says, calibrating block by block.

    With a `streamer` (pipeline/streaming.py) the blocks' float weights are on the meta device and each block is
    read from the checkpoint just before it is calibrated; its float weights are garbage once it is packed."""
    start = time.perf_counter()
    found = find_targets(model, config, modules_to_not_convert)
    targets = {t.name: t.scheme for t in found if not t.experts}
    experts: dict[str, dict[str, QuantScheme]] = {}
    for t in found:
        if t.experts:
            experts.setdefault(t.module_name, {})[t.param] = t.scheme
    if not found:
        raise ValueError(
            f"hf_quant found no nn.Linear or Conv1D weight to quantize in {type(model).__name__} "
            f"(modules_to_not_convert={config.modules_to_not_convert}, overrides={config.overrides})"
        )
    blocks_name, blocks = decoder_blocks(model)
    prefixes = [f"{blocks_name}.{i}." for i in range(len(blocks))]
    # Streamed blocks are read, then placed as the device map says; offloaded modules outside them are quantized
    # from their offloaded weights (`_quantize_outside_blocks`).
    offloaded = [] if streamer is not None else sorted(
        {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()} & {"disk", "meta"})
    if offloaded:
        raise ValueError(
            f"quantizing after loading (method={config.method!r}, rotation={config.rotation!r}) needs every weight in "
            f"memory, but device_map offloads some to {offloaded}; load with device_map='cpu' (or a GPU), or use a "
            "data-free method, which quantizes while loading"
        )
    outside = [n for n, s in targets.items() if s.method in CALIBRATION_METHODS
               and not any(n.startswith(p) for p in prefixes)]
    if outside:
        raise ValueError(
            f"{config.method} calibrates linears inside the transformer blocks only; {outside} lie outside them. Keep "
            f"them in float (modules_to_not_convert) or quantize them data-free: overrides={{{outside[0]!r}: "
            "{'method': 'mse'}}"
        )
    processors = [p() for p in PROCESSORS]
    needs_data = config.needs_calibration
    if needs_data and tokenizer is None:
        tokenizer = _tokenizer_of(model)
    token_ids = calibration_token_ids(tokenizer, config, model) if needs_data else torch.empty(0, 0, dtype=torch.long)

    if experts and hasattr(model, "set_experts_implementation"):
        # The eager experts loop indexes one expert at a time, which packed experts support (and the hooks see).
        model.set_experts_implementation("eager")
    was_training = model.training
    model.eval()
    peak_held = 0
    done = 0
    largest_block = largest_tensor = 0
    expert_tokens: dict = {}
    try:
        for p in processors:
            p.prepare(model, config, blocks_name, blocks)
        rotations = _rotations(blocks, prefixes, targets, config)
        states, block_inputs = (_capture_block_inputs(model, blocks, token_ids, _BLOCK_BATCH, _mixed_layer_types(model),
                                                      streamer) if needs_data else ([], None))
        # Data-free modules outside the blocks need no activations.
        for name, scheme in targets.items():
            if not any(name.startswith(p) for p in prefixes):
                _quantize_outside_blocks(model, name, scheme)
                done += 1
        bar = _progress(len(blocks), progress)
        for index, (block, prefix) in enumerate(zip(blocks, prefixes)):
            if streamer is not None:
                streamer.load(index)
            floats = [p.numel() * p.element_size() for p in block.parameters() if p.is_floating_point()]
            largest_block = max(largest_block, sum(floats))
            largest_tensor = max([largest_tensor, *floats])
            if block_inputs is not None:  # this block's own mask and rotary embeddings (hybrid attention)
                states = [(h, *block_inputs[index][b]) for b, (h, _, _) in enumerate(states)]
            local = {n[len(prefix):]: s for n, s in targets.items() if n.startswith(prefix)}
            ctx = BlockContext(index, prefix, block, local, {n: block.get_submodule(n) for n in local},
                               {n[len(prefix):]: ps for n, ps in experts.items() if n.startswith(prefix)}, config,
                               rotations)
            try:
                for p in processors:
                    p.begin(ctx)
                if ctx.hessian_of or ctx.sample_of or ctx.needs_pass:
                    held = _calibration_pass(ctx, states, token_ids) + sum(p.held_bytes(ctx) for p in processors)
                    peak_held = max(peak_held, held)
            finally:
                for p in processors:
                    p.close(ctx)
            for p in processors:
                p.end(ctx)
            ctx.collector = None  # the block's statistics are no longer needed
            done += ctx.quantized
            expert_tokens.update(ctx.expert_tokens)
            for name, (routed, seen) in ctx.expert_tokens.items():
                logger.info("%s: tokens routed to each expert %s, in each expert's statistics %s", name, routed, seen)
            quantized = {n: _quantized_module(ctx.modules[n], scheme, ctx.packed.get(n), rotations.get(prefix + n))
                         for n, scheme in local.items()}
            if needs_data and index + 1 < len(blocks):  # the last block's outputs are not needed
                # The next block sees this block's quantized outputs. The float linears hold the dequantized
                # weights for this pass (the fused kernels are slower than a dense matmul at this many tokens).
                modules = ctx.modules
                originals = {n: modules[n].weight.data for n in quantized}
                for n, q in quantized.items():
                    w = q.to_float(originals[n].dtype).weight.data
                    modules[n].weight.data = w.t() if q.source_is_conv1d else w
                states = [(_block_output(block(h, *a, **kw)), a, kw) for h, a, kw in states]
                del originals
            for n, q in quantized.items():
                block.set_submodule(n, q)
                done += 1
            if streamer is not None:
                streamer.place(index)  # where the device map puts this block
            # Nothing here may keep the block's float linears alive while the next block is read.
            ctx = quantized = modules = w = None
            _return_freed_memory()
            bar.set_postfix_str(f"peak RSS {_peak_rss() / 2**30:.2f} GiB", refresh=False)
            bar.update(1)
        bar.close()
        if streamer is not None:
            streamer.dispatch()
    finally:
        model.train(was_training)
        for p in processors:
            p.restore(model)
        if streamer is not None:
            streamer.close()
    report = CalibrationReport(token_ids.shape[0], token_ids.shape[-1], len(blocks), done,
                               time.perf_counter() - start, _peak_rss(), peak_held, streamer is not None,
                               largest_block, largest_tensor, expert_tokens)
    logger.info(report.summary())
    return report


def _return_freed_memory() -> None:
    """Hand the memory freed with a block's floats, Hessians and activations back to the system. glibc keeps freed
    chunks below its mmap threshold (which grows to 32 MiB as large tensors are freed) in its heap, and a block's
    many tensors of a few MiB fragment it: without a trim resident memory grew by ~0.4 GiB over TinyLlama's 22
    blocks. Other C libraries: nothing to do (results never depend on it)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _calibration_pass(ctx: BlockContext, states, token_ids) -> int:
    """Run the float block over the calibration inputs with the statistics the processors asked for
    (`ctx.collector`); returns the bytes held at the end (inputs, outputs and statistics)."""
    stride = max(1, token_ids.numel() // _AWQ_TOKENS)
    watched = ctx.hessian_of | ctx.sample_of
    ctx.collector = InputCollector({n: ctx.modules[n] for n in watched}, ctx.hessian_of, ctx.sample_of, stride,
                                   ctx.token_weights is not None, folds=ctx.hessian_folds)
    try:
        for hidden, args, kwargs in states:
            ctx.collector.new_batch()
            ctx.block(hidden, *args, **kwargs)
            ctx.collector.end_batch(ctx.token_weights() if ctx.token_weights is not None else None)
    finally:
        ctx.collector.remove()
    return nbytes(s[0] for s in states) * 2 + ctx.collector.held_bytes()


def _tokenizer_of(model: nn.Module):
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"calibration needs the model's tokenizer, and none could be loaded from {source!r} ({e}); save one "
            "with the model"
        ) from None


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


def _rotations(blocks, prefixes, targets, config) -> dict[str, object]:
    """Full module name -> its online input rotation (rotation='hadamard'): linears inside blocks. None and
    'residual' (folded into the weights, nothing online) have none."""
    if config.rotation != "hadamard":
        return {}
    from ..algorithms.rotation import HadamardRotation

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


__all__ = ["CalibrationReport", "attach_rotations", "check_calibration_supported", "quantize_with_calibration"]
