"""Fine-tune SmolLM2-135M quantized to 4 bits with LoRA on CPU, with plain PEFT code; then save, reload and merge.

    OMP_NUM_THREADS=1 python examples/finetune_lora.py [--steps 200] [--out /tmp/smollm2-lora]

Trains on Botchan (held out: its first 1024 tokens, used for perplexity), prints the loss as it goes down, saves the
quantized base and the adapter, reloads both (PeftModel.from_pretrained) and checks the outputs match, merges the
adapter into the 4-bit codes and reports the extra error of that re-quantization, and shows that unmerging restores
the original codes bit for bit. About 15 minutes on a busy 2-core CPU (OMP_NUM_THREADS=1 is much faster there than
torch's default two threads).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.assets import botchan_text, smollm2_path
from hf_quant.eval import perplexity

HELD_OUT_TOKENS = 1024
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def training_batches(ids: torch.Tensor, seq_len: int, batch: int, steps: int, seed: int = 0):
    """Random windows of the training tokens (the text after the held-out part)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len, (batch,), generator=gen)
        yield torch.stack([ids[s : s + seq_len] for s in starts])


def packed_state(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{t}": getattr(m, t).clone() for n, m in hf_quant.packed_modules(model).items() for t in m.packed_names}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default="/tmp/smollm2-lora")
    args = ap.parse_args()
    torch.manual_seed(0)

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = botchan_text()
    ppl = lambda m: perplexity(m, tok, text, max_tokens=HELD_OUT_TOKENS)  # noqa: E731
    all_ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
    train_ids = all_ids[HELD_OUT_TOKENS:]

    # 1. Quantize while loading, and save the packed base (the adapter is later reloaded on top of it).
    # method="rtn" quantizes in about a second; the default "mse" gives the same perplexity at 4-bit g64 on this model.
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=hf_quant.HfQuantConfig(bits=4, group_size=64, method="rtn"))
    model.save_pretrained(f"{args.out}/base-int4")
    print(f"int4 g64 base: held-out perplexity {ppl(model):.3f}")

    # 2. Ordinary PEFT: nothing hf_quant-specific beyond the import and the quantization config.
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                             lora_dropout=0.05, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    codes_before = packed_state(model)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    model.train()
    start, running, log_every = time.perf_counter(), [], max(1, args.steps // 10)
    for step, batch in enumerate(training_batches(train_ids, args.seq_len, args.batch, args.steps), 1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        running.append(loss.item())
        if step % log_every == 0 or step == 1:
            print(f"step {step:4d}  loss {sum(running) / len(running):.3f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
            running = []
    model.eval()
    assert all(torch.equal(v, packed_state(model)[k]) for k, v in codes_before.items()), "base codes changed"
    print("base codes unchanged by training")
    trained_ppl = ppl(model)
    print(f"after LoRA: held-out perplexity {trained_ppl:.3f}")

    # 3. Save the adapter; reload it with PEFT on the base reloaded from the saved hf_quant checkpoint.
    model.save_pretrained(f"{args.out}/adapter")
    probe = all_ids[:64][None]
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{args.out}/base-int4"),
                                         f"{args.out}/adapter")
    with torch.no_grad():
        got = reloaded(input_ids=probe).logits
    print(f"reloaded adapter: max |logit difference| = {(got - expected).abs().max().item():.2e}")

    # 4. Merge into the 4-bit codes (re-quantized), unmerge (original codes back, bit for bit), merge and unload.
    original = packed_state(reloaded)
    reloaded.merge_adapter()
    merged_ppl = ppl(reloaded)
    with torch.no_grad():
        merged = reloaded(input_ids=probe).logits
    gap = ((merged - got).norm() / got.norm()).item()
    print(f"merged into int4: held-out perplexity {merged_ppl:.3f} (unmerged LoRA {trained_ppl:.3f}); "
          f"relative logit change from re-quantizing: {gap:.4f}")
    reloaded.unmerge_adapter()
    print("unmerge restores the original codes bit for bit:",
          all(torch.equal(v, packed_state(reloaded)[k]) for k, v in original.items()))
    final = reloaded.merge_and_unload()
    final.save_pretrained(f"{args.out}/merged-int4")
    print(f"merged model saved to {args.out}/merged-int4 ({type(final.model.layers[0].self_attn.q_proj).__name__} layers)")


if __name__ == "__main__":
    main()
