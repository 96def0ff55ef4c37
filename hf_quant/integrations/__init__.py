"""Integrations with the Hugging Face ecosystem: transformers (config + quantizer, fused-experts forward), PEFT
(LoRA layers for packed modules), the Hub (cards, push).

`register()` is every side effect importing hf_quant has, in one place. Each goes through the other library's own
extension point where one exists; where none does, the comment names the upstream hook that would replace it.
"""


def register() -> None:
    """Idempotent: safe to call many times."""
    from . import moe, transformers
    from hf_quant_autoload import after_import  # (the tiny start-up module's after-import finder)

    # transformers' public registries: `register_quantization_config` / `register_quantizer` (also reached without
    # importing hf_quant by the tiny hf_quant_autoload finder) ...
    transformers.register()
    # ... and `ALL_EXPERTS_FUNCTIONS.register` for the "hf_quant_triton" experts implementation, once transformers
    # imports its experts module (with a MoE model; importing it costs ~0.8 s, which `import hf_quant` does not pay).
    after_import("transformers.integrations.moe", moe.register)
    # PEFT maps custom module types to LoRA layers per LoraConfig only (`LoraConfig._register_custom_module`); configs
    # PEFT builds itself (`PeftModel.from_pretrained`) would not know ours, so `LoraConfig.__post_init__` is wrapped
    # to register them on every config. A global custom-module registry in PEFT (the dispatchers of
    # `LoraModel._create_new_module`) would replace this wrapper. Done when PEFT is imported (now if it already is):
    # importing PEFT costs ~1.2 s, which `import hf_quant` does not pay.
    after_import("peft", _register_peft)


def _register_peft() -> None:
    import sys

    if (module := sys.modules.get(f"{__name__}.peft")) is not None and not hasattr(module, "register"):
        return  # PEFT was first imported by hf_quant.integrations.peft itself, which registers at its end
    from . import peft

    peft.register()
