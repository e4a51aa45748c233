"""What bf16 and int4 weights cost in quality, against fp32, on the same model.

    python benchmarks/quantized_quality.py [--tokens 64] [--prompts 32]

1. Agreement: fp32 greedy continuations of the held-out prompts (shared/bench/prompts.json
   as chats), then each mode teacher-forced on those sequences: the share of positions where
   its argmax is fp32's token (every generated position counts, not only up to the first
   divergence).
2. Perplexity on a fixed text (benchmarks/data/tale_of_two_cities.txt, public domain) for
   each mode, and its difference from fp32.
int4 is the model driver's `--dtype int4` (llmos/drivers/model/quant.py): 4-bit linears,
the rest bf16. Whole-sequence teacher forcing takes int4's dense copy of the 4-bit weights;
"stepwise" feeds the same sequences one token a step with a KV cache, which is how decode
runs, through the int4 kernel (its scales and zeros are bf16).
3. With --runner, the same teacher-forced agreement through llmos' own ModelRunner: the lean
   loop, the paged pool, the native decode kernel and layer ops, one packed prefill of all
   prompts and then decode steps of every sequence together ("batch 32") or of one sequence
   at a time ("batch 1": int4 then runs its 4-bit kernel, not the dense copy). fp32 there is a
   check of the method: it should agree with transformers' fp32 on (nearly) every token.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))   # conftest_model.MiniKernel, for --runner
from llmos.drivers.model.threads import configure_cpu_env  # noqa: E402

configure_cpu_env()
import torch  # noqa: E402

from llmos.drivers.model.quant import quantize_linears  # noqa: E402
from llmos.models.registry import prepare_model_dir  # noqa: E402
from llmos.paths import Paths  # noqa: E402


def load(model_dir: Path, mode: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if mode != "bfloat16" else
                                                 torch.bfloat16, local_files_only=True).eval()
    if mode in ("int4", "int8"):
        quantize_linears(model, int8_dense=mode == "int8")
        model.to(torch.bfloat16)
    return model


@torch.inference_mode()
def argmax_agreement(model, seqs: list[list[int]], starts: list[int]) -> tuple[int, int]:
    same = total = 0
    for ids, start in zip(seqs, starts):
        logits = model(torch.tensor([ids])).logits[0]
        pred = logits[start - 1:-1].argmax(-1).tolist()
        same += sum(p == t for p, t in zip(pred, ids[start:]))
        total += len(ids) - start
    return same, total


@torch.inference_mode()
def stepwise_agreement(model, seqs: list[list[int]], starts: list[int]) -> tuple[int, int]:
    """The same, one token a step with a KV cache: how decode runs (int4: its 4-bit kernel)."""
    same = total = 0
    for ids, start in zip(seqs, starts):
        out = model(torch.tensor([ids[:start]]), use_cache=True)
        for pos in range(start, len(ids)):
            same += int(out.logits[0, -1].argmax().item() == ids[pos])
            total += 1
            out = model(torch.tensor([[ids[pos]]]), past_key_values=out.past_key_values, use_cache=True)
    return same, total


def runner_agreement(model_dir: Path, mode: str, seqs: list[list[int]], starts: list[int],
                     together: bool) -> tuple[int, int]:
    """Teacher-forced agreement through ModelRunner: each step's sampled token is compared with
    fp32's, then replaced by it, so every position is scored on fp32's own context."""
    import tempfile

    from conftest_model import MiniKernel

    from llmos.drivers.model.runner import ModelRunner

    runner = ModelRunner(model_dir, dtype=mode)
    same = total = 0
    groups = [list(range(len(seqs)))] if together else [[i] for i in range(len(seqs))]
    with tempfile.TemporaryDirectory() as pool_dir:
        k = MiniKernel(runner, Path(pool_dir), num_blocks=4096, block_size=16)
        for group in groups:
            live = {i: k.add(seqs[i][:starts[i]], len(seqs[i]) - starts[i]) for i in group}
            while batch := [i for i, s in live.items() if not s.done]:
                k.step([live[i] for i in batch])             # one new token for each of them
                for i in batch:
                    s = live[i]
                    want = seqs[i][starts[i] + len(s.out) - 1]
                    same += s.out[-1] == want
                    s.tokens[-1] = s.out[-1] = want            # go on from fp32's token
            total += sum(len(seqs[i]) - starts[i] for i in group)
    return same, total


@torch.inference_mode()
def perplexity(model, ids: list[int]) -> float:
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(nll.item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--runner", action="store_true", help="also measure through llmos' ModelRunner")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    model_dir = prepare_model_dir(args.model, Paths.from_env().models_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = json.loads((HERE / "prompts.json").read_text())[: args.prompts]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       return_dict=False) for t in texts]
    fixed = tok((HERE / "data" / "tale_of_two_cities.txt").read_text())["input_ids"]
    ref = load(model_dir, "float32")
    seqs = []
    with torch.inference_mode():
        for p in prompts:   # one at a time: no padding in the reference
            out = ref.generate(torch.tensor([p]), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                               do_sample=False, pad_token_id=tok.eos_token_id)
            seqs.append(out[0].tolist())
    starts = [len(p) for p in prompts]
    base_ppl = perplexity(ref, fixed)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    print(f"{args.model}, {len(prompts)} prompts x {args.tokens} fp32 greedy tokens, fixed text of {len(fixed)} "
          f"tokens; {cpu}")
    print(f"{'mode':>9} {'agree with fp32':>16} {'stepwise':>9} {'perplexity':>11} {'vs fp32':>8}")
    print(f"{'float32':>9} {'(reference)':>16} {'':>9} {base_ppl:>11.3f} {'':>8}")
    for mode in ("bfloat16", "int4", "int8"):
        model = load(model_dir, mode)
        same, total = argmax_agreement(model, seqs, starts)
        step_same, step_total = stepwise_agreement(model, seqs, starts)
        ppl = perplexity(model, fixed)
        print(f"{mode:>9} {same / total:>15.1%} {step_same / step_total:>9.1%} {ppl:>11.3f} "
              f"{ppl / base_ppl - 1:>+8.1%}", flush=True)
        del model
    if args.runner:
        print(f"{'mode':>9} {'through ModelRunner, batch 32':>30} {'batch 1':>9}")
        for mode in ("float32", "bfloat16", "int4", "int8"):
            together = runner_agreement(model_dir, mode, seqs, starts, together=True)
            alone = runner_agreement(model_dir, mode, seqs, starts, together=False)
            print(f"{mode:>9} {together[0] / together[1]:>30.1%} {alone[0] / alone[1]:>9.1%}", flush=True)


if __name__ == "__main__":
    main()
