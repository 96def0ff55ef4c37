"""Calibration in bounded memory: the decoder blocks' float weights are read from the checkpoint one block at a time.

When `from_pretrained` quantizes a safetensors checkpoint with a calibration-based method, the quantizer detaches the
model's list of decoder blocks before the weights load (`BlockStreamer.detach`): transformers then loads only what lies
outside the blocks (embeddings, final norm, head) and never reads a block tensor (their checkpoint keys are skipped
as expected-unexpected). After loading the blocks are put back with their parameters on the meta device
(`attach`), and the calibration loop asks for one block at a time (`load`): its tensors are read from the memory-mapped
safetensors files through transformers' own loader (`convert_and_load_state_dict_in_model`, restricted to that block's
keys), so renamings, fused-expert conversions and dtype casts are exactly those of a full load and the calibrated codes
are bit-identical. Once the loop has replaced the block's linears by packed modules, the float weights are garbage.

Peak memory: the packed model so far + one block's float weights + the calibration activations and statistics of one
block + the float modules outside the blocks. With `device_map="cuda"` (any single accelerator) each block is read on the
host, moved to that device and calibrated there; the packed model builds up on the device, which never holds more
than one float block, and the host holds one block's tensors at a time.

A device map that spreads the model (`"auto"`, `"balanced"`, `"sequential"`, or a dict over several devices and disk)
streams too. transformers sizes it with the blocks in place, by their packed sizes (`param_element_size`), and only then
are the blocks taken out (a named map is resolved after the quantizer's before-loading hook: the detach waits for it,
see `HfQuantQuantizer.validate_environment`). Each block is calibrated on the map's main device (its first
accelerator, else the CPU) and its packed form goes where the map puts that block: an accelerator, the CPU, or disk.
At the end accelerate's `dispatch_model` places the blocks with its own hooks (CPU blocks behind an accelerator and
disk blocks are offloaded with their packed buffers), as transformers' dispatch does for the rest of the model.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence

import torch
from torch import nn

from .data import GENERATED

logger = logging.getLogger(__name__)

ENV_DISABLE = "HF_QUANT_STREAM_CALIBRATION"  # "0": load the whole float model first (the former path)


def streaming_disabled_reason(model: nn.Module, config, checkpoint_files, device_map) -> str | None:
    """Why calibrating `model` must load the whole float model first; None when its blocks can stream."""
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return f"{ENV_DISABLE}=0"
    if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return "the checkpoint is not in safetensors files (streaming reads one block at a time from them)"
    if single_device(device_map) is None and not resolved_later(device_map) and not isinstance(device_map, dict):
        return f"device_map={device_map!r} is neither a device, a dict nor one of {NAMED_MAPS}"
    if config.rotation == "residual":
        return ("rotation='residual' folds the rotation into every block and checks the fold on the whole model's "
                "logits before calibrating (use rotation='hadamard' to stream)")
    if config.calibration == GENERATED:
        return "calibration='generated' runs the whole float model to write its own calibration sequences"
    from ..model import decoder_blocks

    try:
        _, blocks = decoder_blocks(model)
    except ValueError as e:
        return str(e)
    if any(True for block in blocks for _ in _non_persistent_buffers(block)):
        return "its decoder blocks hold non-persistent buffers, which transformers creates for the whole model"
    return None


def single_device(device_map) -> torch.device | None:
    """The one device a device_map puts everything on (None and "cpu": the CPU), else None."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = {_as_device(d) if d not in ("disk", "meta") else d for d in device_map.values()}
        if len(devices) != 1 or devices & {"disk", "meta"}:
            return None
        return devices.pop()
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):  # "auto", "balanced", ...: accelerate spreads the model
        return None


NAMED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolved_later(device_map) -> bool:
    """A named device_map, which transformers turns into a module -> device dict after the quantizer's
    before-loading hook (sized with the blocks in place)."""
    return isinstance(device_map, str) and device_map in NAMED_MAPS


def _as_device(value) -> torch.device | str:
    """A device_map value as a torch.device ("disk" stays a string; an int is a CUDA index, as in accelerate)."""
    if value == "disk":
        return "disk"
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def block_placement(device_map: dict, blocks_name: str, count: int) -> list:
    """Where a module -> device map puts each decoder block (its own entry or the longest prefix's). ValueError when
    the map splits a block over several entries: a block is calibrated and placed whole."""
    placement = []
    for i in range(count):
        name = f"{blocks_name}.{i}"
        inside = [k for k in device_map if k.startswith(name + ".")]
        if inside:
            raise ValueError(f"device_map places parts of {name} separately ({inside[:3]}); streamed calibration "
                             f"places each decoder block whole: give {name!r} one device")
        owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        if not owners:
            raise ValueError(f"device_map has no entry for {name} (nor for a module containing it)")
        placement.append(device_map[max(owners, key=len)])
    return placement


def _non_persistent_buffers(module: nn.Module):
    for name, m in module.named_modules():
        for b in m._non_persistent_buffers_set:
            if m._buffers.get(b) is not None:
                yield f"{name}.{b}"


class BlockStreamer:
    """The decoder blocks of a model being loaded, and the checkpoint they are read from one at a time."""

    def __init__(self, blocks_name: str, blocks: nn.ModuleList, checkpoint_files: Sequence[str], dtype):
        self.blocks_name = blocks_name
        self.blocks = blocks
        self.checkpoint_files = [str(f) for f in checkpoint_files]
        self.dtype = dtype
        self.model: nn.Module | None = None
        self._pattern = rf"^{re.escape(blocks_name)}\.\d+\."
        self._keys: list[dict[str, str]] = []  # per block: checkpoint key -> its safetensors file
        self._mapping = None
        self._dtype_plan = None
        self.loaded_bytes: list[int] = []  # float bytes read per block (report)
        self.device = torch.device("cpu")  # where each block is calibrated: the device the rest of the model is on
        self.device_map: dict | None = None  # a spreading map: the blocks are placed by it once packed (`place`)
        self.placement: list = []  # per block, the device_map value it gets

    # --- before and after transformers loads the rest ----------------------------------------------------------

    @classmethod
    def detach(cls, model: nn.Module, checkpoint_files, dtype, device_map=None) -> "BlockStreamer":
        """Take the decoder blocks out of `model` (on the meta device, before weights load) so that transformers
        neither reads nor initializes their weights; their checkpoint keys are ignored as unexpected. A `device_map`
        dict over several devices (or disk) says where each packed block goes."""
        from ..model import decoder_blocks

        blocks_name, blocks = decoder_blocks(model)
        streamer = cls(blocks_name, blocks, checkpoint_files, dtype)
        if isinstance(device_map, dict) and single_device(device_map) is None:
            streamer.placement = block_placement(device_map, blocks_name, len(blocks))
            streamer.device_map = dict(device_map)
        # Empty stand-ins keep the blocks' names, which a device map resolved with the blocks in place refers to.
        model.set_submodule(blocks_name, nn.ModuleList(nn.Module() for _ in blocks))
        ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignored | {streamer._pattern}
        return streamer

    def attach(self, model: nn.Module) -> None:
        """Put the blocks back (their weights still on meta) and index the checkpoint's tensors by block."""
        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        ignored = set(model._keys_to_ignore_on_load_unexpected or ())
        ignored.discard(self._pattern)
        model._keys_to_ignore_on_load_unexpected = ignored
        model.set_submodule(self.blocks_name, self.blocks)
        self.blocks.train(model.training)
        self.model = model
        if self.device_map is not None:  # the map's first accelerator, else the CPU
            devices = [_as_device(v) for v in self.device_map.values()]
            self.device = next((d for d in devices if d != "disk" and d.type != "cpu"), torch.device("cpu"))
        else:
            self.device = next((t.device for t in model.parameters() if t.device.type != "meta"), torch.device("cpu"))
        self._mapping = get_model_conversion_mapping(model)
        self._dtype_plan = model._get_dtype_plan(self.dtype)
        renamings = [t for t in self._mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in self._mapping if isinstance(t, WeightConverter)]
        meta_state = model.state_dict()
        block_of = re.compile(rf"^{re.escape(self.blocks_name)}\.(\d+)\.")
        self._keys = [{} for _ in self.blocks]
        for path in self.checkpoint_files:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = list(f.keys())
            for key in keys:
                renamed, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
                if renamed not in meta_state and key in meta_state:
                    renamed, _ = rename_source_key(key, [], [], model.base_model_prefix, meta_state)
                match = block_of.match(renamed)
                if match and int(match[1]) < len(self.blocks):
                    self._keys[int(match[1])][key] = path
        # What save_pretrained reverts: the transforms a full load would have used (every key was renamed above).
        model._weight_conversions = [t for t in self._mapping if t.was_used()]

    # --- during calibration ------------------------------------------------------------------------------------

    @torch.no_grad()
    def load(self, index: int) -> None:
        """Read block `index`'s float tensors from the checkpoint into the model (transformers' loader, restricted
        to that block's keys: the same renamings, conversions and dtype casts as a full load)."""
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        model = self.model
        # The files are mapped for this block only: once its tensors are copied out, the mapping goes, and with it
        # the checkpoint pages this process touched (they would otherwise count in its resident memory).
        files = {path: safe_open(path, framework="pt", device="cpu") for path in set(self._keys[index].values())}
        slices = {key: files[path].get_slice(key) for key, path in self._keys[index].items()}
        conversions = getattr(model, "_weight_conversions", None)
        load_config = LoadStateDictConfig(dtype=self.dtype, dtype_plan=self._dtype_plan, weight_mapping=self._mapping)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' per-call "Loading weights" bar, once per block
        try:
            # (a block may be read more than once: the capture pass of hybrid-attention models runs it first)
            info, _ = convert_and_load_state_dict_in_model(model, slices, load_config)
        finally:
            del slices
            files.clear()
            if bars:
                hf_logging.enable_progress_bar()
            model._weight_conversions = conversions
        prefix = f"{self.blocks_name}.{index}."
        block = self.blocks[index]
        # A tensor read in its stored dtype is a view of the file mapping: the block's float modules that stay float
        # (norms, unquantized linears) would keep the whole mapped file alive, and its touched pages resident.
        # On a GPU the block is calibrated where the rest of the model is (the host then holds one tensor at a time).
        for module in block.modules():
            for tensors in (module._parameters, module._buffers):
                for name, t in tensors.items():
                    if t is None or t.device.type != "cpu":
                        continue
                    if self.device.type != "cpu":
                        t.data = t.data.to(self.device)
                    elif not t.untyped_storage().resizable():
                        t.data = t.data.clone()
        if info.mismatched_keys:
            raise ValueError(f"hf_quant: the checkpoint's tensors for {sorted(k for k, *_ in info.mismatched_keys)[:5]} "
                             "do not have the model's shapes; check that config.json matches the weights")
        if info.conversion_errors:
            raise ValueError(f"hf_quant: converting the checkpoint's tensors of block {index} failed: "
                             f"{dict(list(info.conversion_errors.items())[:3])}")
        missing = [prefix + n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.device.type == "meta"]
        if missing:
            raise ValueError(
                f"hf_quant: the checkpoint has no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}, so "
                f"block {index} cannot be calibrated from it; check the checkpoint, or set {ENV_DISABLE}=0 to load "
                "the whole float model first (missing weights are then initialized by transformers)"
            )
        self.loaded_bytes.append(sum(t.numel() * t.element_size() for t in block.parameters() if t.is_floating_point()))

    def offload(self, index: int) -> None:
        """Drop block `index`'s float parameters back to the meta device (they are read again by `load`)."""
        for module in self.blocks[index].modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                            requires_grad=p.requires_grad)

    def place(self, index: int) -> None:
        """Move packed block `index` towards where the device map puts it: its accelerator, else the CPU (disk
        blocks are written out by `dispatch` at the end)."""
        if self.device_map is None:
            return
        target = _as_device(self.placement[index])
        self.blocks[index].to(target if target != "disk" else torch.device("cpu"))

    def dispatch(self) -> None:
        """Put accelerate's hooks on the packed blocks as the device map says (transformers dispatched the rest of
        the model before calibration, while the blocks were out): blocks on another accelerator get input-moving
        hooks, CPU blocks behind an accelerator and disk blocks are offloaded, their packed buffers included."""
        if self.device_map is None:
            return
        from accelerate import dispatch_model

        from ..model.offload import offload_folder_of

        block_map = {str(i): value for i, value in enumerate(self.placement)}
        folder = None
        if "disk" in self.placement:
            folder = os.path.join(offload_folder_of(self.model), f"{self.blocks_name}.packed")
            shutil.rmtree(folder, ignore_errors=True)  # accelerate reuses a folder that has an index.json
            logger.info("hf_quant: packed blocks the device map puts on disk are written to %s", folder)
        main = self.device if self.device.type != "cpu" else "cpu"
        dispatch_model(self.blocks, device_map=block_map, main_device=main, offload_dir=folder, offload_buffers=True,
                       force_hooks=True)

    def close(self) -> None:
        self._keys = []
        self.model = None


__all__ = ["BlockStreamer", "ENV_DISABLE", "NAMED_MAPS", "block_placement", "resolved_later", "single_device",
           "streaming_disabled_reason"]
