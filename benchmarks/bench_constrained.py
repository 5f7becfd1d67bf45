"""The per-token cost of constrained decoding (JSON schema), against unconstrained decoding on the same model.

    python benchmarks/bench_constrained.py                       # a random Qwen2.5-0.5B-shaped 4-bit model, offline
    python benchmarks/bench_constrained.py --model mlx-community/Qwen2.5-7B-Instruct-4bit

Both modes generate exactly `--tokens` tokens (the schema asks for more records than fit, so the JSON cannot
close early), alternating over `--repeats` rounds in one process. Also
reported: the host time llguidance spends per mask, replayed on the constrained run's tokens. Because the mask
for step n is computed while the model computes step n, the decode cost it adds is far below that time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import qwen_mlx
from qwen_mlx.store.synthetic import TINY_QWEN2, write_random_model
from qwen_mlx.text.grammar import GrammarMask, json_schema_grammar

QWEN25_05B = {**TINY_QWEN2, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2}
MESSAGES = [{"role": "user", "content": "List some measurements as JSON."}]


def schema_for(tokens: int) -> dict:
    """Records of a short string and an integer: both the cheap (digits) and the costly (free text) mask states.

    Qwen splits digits one per token, so every record takes at least one token of its own: `tokens` records cannot
    fit in `tokens` tokens, and the JSON is still open when max_tokens ends both runs.
    """
    record = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
              "required": ["name", "n"], "additionalProperties": False}
    return {"type": "array", "items": record, "minItems": tokens, "maxItems": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or repo id (default: a random 0.5B-shaped 4-bit one)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per run (default 32)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            print("Building a random Qwen2.5-0.5B-shaped model and converting it to 4 bits ...", file=sys.stderr)
            (Path(tmp) / "float16").mkdir()
            write_random_model(Path(tmp) / "float16", QWEN25_05B)
            qwen_mlx.convert(Path(tmp) / "float16", Path(tmp) / "4bit", quantize=True)
            folder = Path(tmp) / "4bit"
        model, tokenizer = qwen_mlx.load(folder)
        schema = schema_for(args.tokens)
        runs: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
        tokens: list[int] = []
        qwen_mlx.generate(model, tokenizer, MESSAGES, max_tokens=4, json_schema=schema)  # warm-up, trie built
        for r in range(args.repeats):
            for mode in runs:
                extra = {"json_schema": schema} if mode == "json_schema" else {}
                result = qwen_mlx.generate(model, tokenizer, MESSAGES, max_tokens=args.tokens, temperature=1.0,
                                           seed=r, **extra)
                assert result.stats.generation_tokens == args.tokens, result.stats
                runs[mode].append(result.stats.generation_tps)
                if mode == "json_schema":
                    tokens = result.tokens
                print(f"round {r + 1} {mode}: {result.stats.generation_tps:.2f} tokens/s", file=sys.stderr)

        constraint = GrammarMask(tokenizer, model.config.vocab_size, json_schema_grammar(schema))
        mask_times = []
        for n in range(len(tokens)):
            start = time.perf_counter()
            constraint.allowed_draft(tokens[:n], [])  # the parse follows the reply so far
            constraint.mask()
            mask_times.append(time.perf_counter() - start)

    free, constrained = statistics.median(runs["unconstrained"]), statistics.median(runs["json_schema"])
    added = 1000 / constrained - 1000 / free
    print(f"\n{args.tokens} tokens per run, median of {args.repeats} runs, {Path(str(folder)).name}\n")
    print("| | decode tokens/s | ms per token |")
    print("|---|---|---|")
    print(f"| unconstrained | {free:.2f} | {1000 / free:.1f} |")
    print(f"| JSON schema | {constrained:.2f} | {1000 / constrained:.1f} |")
    print(f"\nconstrained / unconstrained speed: {constrained / free:.3f}; added per token: {added:+.2f} ms; "
          f"mask computation alone: {1000 * statistics.median(mask_times):.2f} ms per token (median)")


if __name__ == "__main__":
    main()
