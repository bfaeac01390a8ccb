"""Hugging Face reference for Swarm's Llama implementation (run where torch + transformers exist).

    python3 bench/hf_reference.py make-fixture OUT_DIR TOKENIZER_JSON TEXT_FILE
        Builds a tiny random LlamaForCausalLM (GQA, llama3 rope scaling, non-trivial norm
        weights), saves it with save_pretrained (safetensors), copies the tokenizer and text, and
        writes expected.json: transformers' mean next-token cross-entropy over consecutive
        non-overlapping windows of SEQ_LEN tokens (float64). `swarm eval` must reproduce it.

    python3 bench/hf_reference.py eval MODEL_DIR TEXT_FILE SEQ_LEN
        Loads a model directory (for example one of Swarm's checkpoints) with transformers and
        prints the same metric as `swarm eval --json`.
"""
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

SEQ_LEN = 24


def mean_ce(model, ids, seq_len):
    n = len(ids) // seq_len
    x = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    with torch.no_grad():
        logits = model(x).logits.double()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    return {"tokens": len(ids), "windows": n, "predicted_tokens": n * (seq_len - 1), "mean_cross_entropy": ce.item()}


def encode(tokenizer_json, text_file):
    tok = Tokenizer.from_file(str(tokenizer_json))
    return tok.encode(Path(text_file).read_text(), add_special_tokens=False).ids


def make_fixture(out, tokenizer_json, text_file):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, hidden_act="silu",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(tokenizer_json, out / "tokenizer.json")
    shutil.copy(text_file, out / "text.txt")
    ids = encode(out / "tokenizer.json", out / "text.txt")
    result = mean_ce(model.double(), ids, SEQ_LEN)
    result["seq_len"] = SEQ_LEN
    import transformers
    result["transformers"] = transformers.__version__
    result["torch"] = torch.__version__
    (out / "expected.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def eval_dir(model_dir, text_file, seq_len):
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64)
    ids = encode(Path(model_dir) / "tokenizer.json", text_file)
    r = mean_ce(model, ids, int(seq_len))
    r["model"] = str(model_dir)
    print(json.dumps(r))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"make-fixture": make_fixture, "eval": eval_dir}[cmd](*args)
