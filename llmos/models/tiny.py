"""Tiny random models with a real tokenizer, so tests and CI run the whole stack in seconds.

The geometry is small but keeps what matters for attention: GQA (4 query heads over
2 kv heads), several layers, and for qwen2 the q/k/v biases.
"""
from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def make_tiny_model(kind: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a random `kind` ("llama" | "qwen2") model using the tokenizer in `tokenizer_dir`
    to `out_dir` and return it. The same seed gives the same weights."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, Qwen2Config
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos, bos = tok.eos_token_id, tok.bos_token_id
    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
                  pad_token_id=eos, dtype="float32")
    if kind == "llama":
        config, cls = LlamaConfig(rope_theta=10000.0, **common), LlamaForCausalLM
    elif kind == "qwen2":
        config, cls = Qwen2Config(rope_theta=10000.0, use_sliding_window=False, **common), Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}: use 'llama' or 'qwen2'")
    with torch.random.fork_rng():  # seed the default init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = cls(config).eval()
    with torch.no_grad():
        # The default init (std 0.02) makes near-uniform logits: greedy ties would make
        # token-exact comparisons flaky. Larger weights give peaked, well separated logits.
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir
