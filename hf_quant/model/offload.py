"""Disk offload of packed tensors with no extra flag.

Packed tensors are buffers (so that a float cast of the model, `model.half()`, never touches their codes and scales).
accelerate's offloading hooks keep a module's buffers in RAM unless `from_pretrained(..., offload_buffers=True)`:
with `device_map` putting quantized blocks on "disk", their packed weights would stay resident. After dispatch,
`offload_packed_tensors` makes every disk-offloading hook that covers a packed module offload its buffers as well: the
buffers missing from the hook's weights map (tensors made while quantizing on load) are written to the offload
folder in safetensors (as transformers writes offloaded parameters), and the module's copies go to the meta device;
accelerate then reads them for each forward and drops them after it, as it does for parameters.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref

from torch import nn

from ..nn import PackedWeight

logger = logging.getLogger(__name__)


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def offload_packed_tensors(model: nn.Module) -> int:
    """Offload the packed buffers of every module that accelerate offloads to disk; returns how many tensors were
    moved off RAM."""
    from accelerate.hooks import AlignDevicesHook
    from accelerate.utils import named_module_tensors, set_module_tensor_to_device
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset
    from transformers.integrations.accelerate import offload_weight

    moved = 0
    for module in model.modules():
        for hook in _hooks(module):
            if not isinstance(hook, AlignDevicesHook) or not hook.offload or hook.offload_buffers:
                continue
            covered = module.modules() if hook.place_submodules else [module]
            if not any(isinstance(m, PackedWeight) for m in covered):
                continue
            weights_map = hook.weights_map
            loader = weights_map.dataset if isinstance(weights_map, PrefixedDataset) else weights_map
            prefix = weights_map.prefix if isinstance(weights_map, PrefixedDataset) else ""
            if not isinstance(loader, OffloadedWeightsLoader):
                continue  # offloaded to a state dict in RAM (cpu offload): nothing to gain
            buffers = dict(module.named_buffers(recurse=hook.place_submodules))
            names = [n for n, _ in named_module_tensors(module, include_buffers=True, recurse=hook.place_submodules,
                                                         remove_non_persistent=True) if n in buffers]
            for name in names:
                key = prefix + name
                if key not in loader.state_dict and key not in loader.index:
                    folder = loader.save_folder or _temporary_folder(model)
                    offload_weight(buffers[name].detach().cpu().contiguous(), key, folder, loader.index)
                    loader.all_keys.append(key)
                set_module_tensor_to_device(module, name, "meta")
                moved += 1
            hook.offload_buffers = True
    return moved


def offload_folder_of(model: nn.Module) -> str:
    """The folder from_pretrained offloads `model` to (its `offload_folder`, as accelerate's hooks hold it), else a
    temporary one removed with the model."""
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    for module in model.modules():
        for hook in _hooks(module):
            weights_map = getattr(hook, "weights_map", None)
            loader = weights_map.dataset if isinstance(weights_map, PrefixedDataset) else weights_map
            if isinstance(loader, OffloadedWeightsLoader) and loader.save_folder:
                return loader.save_folder
    return _temporary_folder(model)


def _temporary_folder(model: nn.Module) -> str:
    """A folder for offloaded packed tensors when from_pretrained was given no offload_folder (a pre-quantized
    checkpoint's tensors are read in place; only tensors made while loading need one): removed with the model."""
    folder = getattr(model, "_hf_quant_offload_folder", None)
    if folder is None:
        folder = tempfile.mkdtemp(prefix="hf_quant_offload_")
        weakref.finalize(model, shutil.rmtree, folder, True)
        model._hf_quant_offload_folder = folder
        logger.info("hf_quant: packed tensors offloaded to disk are written to %s (removed with the model)", folder)
    return folder


__all__ = ["offload_folder_of", "offload_packed_tensors"]
