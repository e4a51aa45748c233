"""Generation through the whole daemon equals Hugging Face transformers' greedy `generate`.

16 different prompts are submitted at once (so they are batched together, joining and
leaving the batch at different steps) with greedy decoding and max_tokens=64; each must
produce exactly the tokens transformers' greedy decoding produces for that prompt alone:
every token is transformers' top choice given the prompt and the tokens before it, the
answer stops at its first end-of-sequence token and nowhere else before max_tokens. A
token that is not the top choice is accepted only at a near-tie: transformers' top-2
logits there differ by less than 1e-3, and our token is the runner-up.

Transformers' logits come from one forward pass over prompt and answer, which is what
`generate` computes one token at a time (it checks what generate's tokens would be, at a
twentieth of the cost: generate reads all the weights for every token). After a near-tie
the rest of the answer is still checked, against the prefix we chose.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

import pytest
import torch

from daemon_harness import Daemon

PROMPTS = json.loads((Path(__file__).parent.parent / "benchmarks" / "prompts.json").read_text())[:16]
MAX_NEW = 64
NEAR_TIE = 1e-3


def check_against_reference(model, tokenizer, daemon: Daemon, model_name: str) -> int:
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in PROMPTS]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def ask(ids):
        with daemon.http(timeout=600) as c:
            r = c.post("/v1/completions", json={"model": model_name, "prompt": ids, "max_tokens": MAX_NEW,
                                                "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    with cf.ThreadPoolExecutor(len(prompt_ids)) as ex:
        ours = list(ex.map(ask, prompt_ids))
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    near_ties = 0
    for ids, got in zip(prompt_ids, ours):
        assert got and not eos & set(got[:-1]), f"generation went on past end-of-sequence: {got}"
        assert len(got) == MAX_NEW or got[-1] in eos, f"stopped after {len(got)} tokens without end-of-sequence"
        with torch.inference_mode():
            logits = model(torch.tensor([ids + got], device=model.device)).logits[0, len(ids) - 1:-1].float()
        for k, (row, token) in enumerate(zip(logits, got)):
            top2 = torch.topk(row, 2)
            if row[token] == top2.values[0]:
                continue
            gap = float(top2.values[0] - top2.values[1])
            assert gap < NEAR_TIE and token == int(top2.indices[1]), (
                f"token {k}: ours {token} vs reference {int(top2.indices[0])} with a top-2 gap of {gap:.2e}")
            near_ties += 1
    return near_ties


def run_case(home: Path, model_dir: Path, name: str, device: str = "cpu") -> None:
    """The reference runs on `device` too: the daemon is started with --device `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model = model.to(device).eval()
    daemon = Daemon(home, [f"{name}={model_dir}"], "--dtype", "float32", "--kv-memory", "256MiB",
                    "--max-batched-tokens", "512", "--device", device)
    try:
        daemon.wait_ready()
        check_against_reference(model, tokenizer, daemon, name)
        assert daemon.memory(name)["blocks_used"] == 0
    finally:
        daemon.stop()


def test_tiny_llama_matches_transformers_generate(tmp_path, tiny_llama_dir):
    run_case(tmp_path, tiny_llama_dir, "tiny")


@pytest.mark.slow
@pytest.mark.timeout(1500)   # 16 x 64 tokens twice (daemon and transformers) on a contended machine
def test_smollm2_matches_transformers_generate(tmp_path, smollm2_dir):
    run_case(tmp_path, smollm2_dir, "smollm2")
