"""Quantization-aware LoRA initialisation on SmolLM2-135M at 2 and 3 bits: held-out perplexity before any training
and after a short fine-tune, for PEFT's default init (B = 0: exactly the quantized model), the residual SVD init
(codes untouched) and LoftQ alternation (codes re-chosen), all with `hf_quant.integrations.peft`.

    python benchmarks/lora_init.py [--bits 2 3] [--steps 40] [--batch 4] [--rank 16] [--method rtn] [--held-out-tokens 1024]

Held out: Botchan's first --held-out-tokens tokens (perplexity, window 512); training: random 64-token windows of the rest,
the same batches for every row. "layer error" is the mean over LoRA layers of ||W - (Q + scaling B A)|| / ||W||.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.assets import botchan_text, smollm2_path
from hf_quant.eval import perplexity
from hf_quant.integrations.peft import init_lora_from_residual, lora_layer_errors

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INITS = {"zero (PEFT default)": None, "residual SVD": 0, "LoftQ, 2 iterations": 2}


def fine_tune(model, ids: torch.Tensor, steps: int, batch: int, seq_len: int = 64, lr: float = 1e-3) -> float:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-5:]) / len(losses[-5:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--method", default="rtn", help="quantizer of the base and of the LoftQ iterations")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--held-out-tokens", type=int, default=1024)
    args = ap.parse_args()
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = botchan_text()
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"])[args.held_out_tokens:]
    ppl = lambda m: perplexity(m, tok, text, max_tokens=args.held_out_tokens)  # noqa: E731
    print(f"base: g{args.group_size} {args.method}; LoRA r={args.rank} alpha={2 * args.rank} on {', '.join(TARGETS)}; fine-tune: {args.steps} AdamW steps "
          f"(lr 1e-3) of {args.batch} x 64 tokens; perplexity on the held-out first {args.held_out_tokens} tokens")
    print("| bits | init | layer error | perplexity before training | after fine-tune | final train loss | init time (s) |")
    print("|---|---|---|---|---|---|---|")
    for bits in args.bits:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32,
            quantization_config=hf_quant.HfQuantConfig(bits=bits, group_size=args.group_size, method=args.method, lm_head="float"))
        codes = {name: m.packed_tensors() for name, m in hf_quant.packed_modules(model).items()}
        for name, iterations in INITS.items():
            for module_name, m in hf_quant.packed_modules(model).items():  # LoftQ re-chooses codes: start afresh
                m.load_packed(codes[module_name])
            torch.manual_seed(0)
            peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
            start = time.perf_counter()
            if iterations is not None:
                init_lora_from_residual(peft_model, path, iterations=iterations)
            seconds = time.perf_counter() - start
            errors = list(lora_layer_errors(peft_model, path).values())
            before = ppl(peft_model)
            loss = fine_tune(peft_model, ids, args.steps, args.batch)
            after = ppl(peft_model)
            print(f"| {bits} | {name} | {sum(errors) / len(errors):.4f} | {before:.2f} | {after:.2f} | {loss:.3f} | "
                  f"{seconds:.1f} |", flush=True)
            model = peft_model.unload()
        del model


if __name__ == "__main__":
    main()
