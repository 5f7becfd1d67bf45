"""Speculative decoding against plain decoding, side by side in one process, on a random-weight Qwen2.5-0.5B-shaped
4-bit model: forward passes per generated token (the speed-up where a pass over a few tokens costs about one, as on
Apple silicon), tokens/s here, acceptance, and what verifying k tokens costs against one decode step here.

    python benchmarks/bench_speculative.py                 # about 6 minutes on a 2-core Linux machine
    python benchmarks/bench_speculative.py --quick         # 24 tokens a case, fewer verification sizes

    # On a Mac: the real pair (the 0.5B drafts for the 7B)
    python benchmarks/bench_speculative.py --model mlx-community/Qwen2.5-7B-Instruct-4bit \\
        --draft mlx-community/Qwen2.5-0.5B-Instruct-4bit

Cases, each greedy and checked to give the plain reply token for token:
- prediction, exact: the plain reply itself as OpenAI's Predicted Outputs (the mechanism's ceiling);
- prediction, half wrong: every other run of 8 tokens replaced;
- prompt lookup: the prompt quotes the reply's start and the reply goes on as the model would (random weights fall
  into loops, which the lookup finds in the context);
- draft model: a small random model (2 layers, hidden 64) with the same tokenizer: its guesses are worthless, so
  this measures what speculation costs when it cannot win (it should back off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

import qwen_mlx
from qwen_mlx.model.cache import PromptCache
from qwen_mlx.store.synthetic import random_shape, tiny_config, write_random_quantized_model

HERE = Path(__file__).resolve().parent
MESSAGES = [{"role": "user", "content": "Rewrite this paragraph about the river and the old mill, keeping its words."}]


def build(tmp: Path, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    dtype = "float32" if mx.default_device().type == mx.DeviceType.cpu else "bfloat16"
    if args.model:
        target = qwen_mlx.load(args.model)
    else:
        print("Building a random Qwen2.5-0.5B-shaped 4-bit model ...", file=sys.stderr, flush=True)
        target = qwen_mlx.load(write_random_quantized_model(tmp / "target", random_shape("qwen2.5-0.5b"), 4, 64,
                                                           dtype))
    if args.draft:
        draft = qwen_mlx.load_draft(args.draft, target[1])
    else:
        shape = tiny_config(vocab_size=151936, max_position_embeddings=32768)
        draft = qwen_mlx.load_draft(write_random_quantized_model(tmp / "draft", shape, 4, 32, dtype), target[1])
    return target[0], target[1], draft


def run(model: Any, tokenizer: Any, prompt: Any, tokens: int, **kwargs: Any) -> dict[str, Any]:
    start = time.perf_counter()
    result = qwen_mlx.generate(model, tokenizer, prompt, max_tokens=tokens, temperature=0, repetition_penalty=1.0,
                               prompt_cache=PromptCache.new(model), **kwargs)
    elapsed = time.perf_counter() - start
    s = result.stats
    return {"tokens": result.tokens, "generation_tps": s.generation_tps, "seconds": elapsed,
            "passes_per_token": s.decode_passes / s.generation_tokens, "drafted": s.draft_tokens,
            "accepted": s.accepted_draft_tokens}


def verification_cost(model: Any, sizes: list[int], repeats: int) -> dict[int, float]:
    """Seconds of one forward pass over k new tokens after a 128-token context, relative to k = 1."""
    cache = PromptCache.new(model)
    cache.prefill(model, list(range(1000, 1128)))
    times: dict[int, list[float]] = {k: [] for k in sizes}
    for _ in range(repeats):
        for k in sizes:
            start = time.perf_counter()
            mx.eval(model(mx.array([list(range(2000, 2000 + k))]), cache=cache.caches))
            times[k].append(time.perf_counter() - start)
            cache.trim(k)
    one = statistics.median(times[1])
    return {k: statistics.median(t) / one for k, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or repo id (default: a random 0.5B-shaped 4-bit one)")
    parser.add_argument("--draft", help="a draft model (default: a tiny random one)")
    parser.add_argument("--tokens", type=int, help="tokens generated per case (default 64)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "speculative.json")
    args = parser.parse_args()
    tokens = args.tokens or (24 if args.quick else 64)
    sizes = [1, 2, 4, 8] if args.quick else [1, 2, 3, 4, 5, 8, 16]

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, draft = build(Path(tmp), args)
        tokenizer.eos_token_ids = []  # every case generates exactly `tokens`
        run(model, tokenizer, MESSAGES, 4)  # warm-up
        prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=True)
        plain = run(model, tokenizer, prompt, tokens)
        reply = plain["tokens"]
        half_wrong = [t if (i // 8) % 2 == 0 else (t + 7 + i) % 150000 for i, t in enumerate(reply)]
        quoted = prompt + reply[: tokens // 2]  # the greedy continuation of this is the rest of the reply
        cases = {
            "prediction, exact (4 drafts)": (prompt, {"prediction": reply, "num_draft_tokens": 4}),
            "prediction, exact (3 drafts)": (prompt, {"prediction": reply, "num_draft_tokens": 3}),
            "prediction, half wrong": (prompt, {"prediction": half_wrong}),
            "prompt lookup (4)": (quoted, {"prompt_lookup": 4}),
            "draft model, random (3 drafts)": (prompt, {"draft_model": draft, "num_draft_tokens": 3}),
        }
        lookup_plain = run(model, tokenizer, quoted, tokens)
        results = {}
        for name, (case_prompt, kwargs) in cases.items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            result = run(model, tokenizer, case_prompt, tokens, **kwargs)
            baseline = lookup_plain if case_prompt is quoted else plain
            assert result["tokens"] == baseline["tokens"], f"{name}: the reply differs from plain decoding"
            result["speed_ratio"] = baseline["seconds"] / result["seconds"]
            results[name] = result
        costs = verification_cost(model, sizes, repeats=2 if args.quick else 3)

    lines = [f"{tokens} tokens a case, greedy; every case gave the plain reply token for token", "",
             "| case | passes / token | drafts accepted | tokens/s | wall-clock vs plain |",
             "|---|---|---|---|---|",
             f"| plain decoding | 1.00 | - | {plain['generation_tps']:.2f} | 1.00 |"]
    for name, r in results.items():
        rate = f"{r['accepted']}/{r['drafted']} ({100 * r['accepted'] / r['drafted']:.0f}%)" if r["drafted"] else "0"
        lines.append(f"| {name} | {r['passes_per_token']:.2f} | {rate} | {r['generation_tps']:.2f} | "
                     f"{r['speed_ratio']:.2f} |")
    lines += ["", "A forward pass over k new tokens (after 128 of context), in single decode steps:", "",
              "| k | " + " | ".join(str(k) for k in costs) + " |", "|---|" + "---|" * len(costs),
              "| cost | " + " | ".join(f"{c:.2f}" for c in costs.values()) + " |"]
    device = f"{mx.default_device()}, mlx {mx.__version__}"
    print(f"\n{args.model or 'random qwen2.5-0.5b, 4-bit'} + {args.draft or 'random tiny draft'}; {device}; "
          f"{(time.perf_counter() - began) / 60:.1f} min\n")
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": device, "tokens": tokens, "plain": plain, "cases": results,
                                     "verification_cost": costs, "table": lines}, indent=2) + "\n")


if __name__ == "__main__":
    main()
