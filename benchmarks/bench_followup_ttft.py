"""Time to first token of a follow-up chat turn: with prompt-prefix reuse it follows the new message's length,
not the history's; without it, the whole conversation is read again.

    python benchmarks/bench_followup_ttft.py                   # a small random Qwen2 with Qwen's tokenizer, offline
    python benchmarks/bench_followup_ttft.py --model Qwen/Qwen2.5-0.5B-Instruct --history 256 1024 4096

For each history length and new-message length, a first turn puts the history and an 8-token reply into a
PromptCache; the follow-up prompt (history + reply + new message) is then timed twice: continuing that cache,
where only the new tokens are prefilled (the new message and the reply's last token, which generation never runs
through the model), and from an empty cache, where all of them are. Medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from qwen_mlx.store.synthetic import TINY_QWEN2, write_random_model

# Qwen2.5's vocabulary and tokenizer; a few small layers, so that reading 1,024 tokens takes a visible second on
# a CPU while a 16-token message takes a few milliseconds.
SMALL_QWEN2: dict[str, Any] = {**TINY_QWEN2, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4}
REPLY_TOKENS = 8


def build_random_model(folder: Path) -> Path:
    """A random-weight Qwen2 (float16) with Qwen2.5's real tokenizer, written by qwen-mlx itself, offline."""
    print("Building a small random Qwen2 ...", file=sys.stderr)
    return write_random_model(folder, SMALL_QWEN2)


def token_ids(n: int, start: int, vocab_size: int) -> list[int]:
    """n ordinary token ids, spread over the vocabulary (below the special tokens)."""
    return [(start + i * 7919) % min(vocab_size, 150000) for i in range(n)]


def first_token(model: Any, tokenizer: Any, prompt: list[int], prompt_cache: Any) -> tuple[float, int]:
    """Seconds to the first reply token, and how many prompt tokens were prefilled for it."""
    from qwen_mlx.engine.generate import stream_generate

    for chunk in stream_generate(model, tokenizer, prompt, max_tokens=1, temperature=0, prompt_cache=prompt_cache):
        if chunk.stats is not None:
            return chunk.stats.time_to_first_token, chunk.stats.prefilled_tokens
    raise AssertionError("stream_generate ended without statistics")


def follow_up(model: Any, tokenizer: Any, history_len: int, new_len: int) -> tuple[float, int, float, int]:
    """(TTFT, tokens prefilled) of one follow-up turn, with prefix reuse and without."""
    from qwen_mlx.engine.generate import generate
    from qwen_mlx.model.cache import PromptCache

    history = token_ids(history_len, 1, tokenizer.vocab_size)
    prompt_cache = PromptCache.new(model)
    reply = generate(model, tokenizer, history, max_tokens=REPLY_TOKENS, temperature=0, prompt_cache=prompt_cache)
    conversation = history + reply.tokens + token_ids(new_len, 2, tokenizer.vocab_size)
    reused = first_token(model, tokenizer, conversation, prompt_cache)
    fresh = first_token(model, tokenizer, conversation, PromptCache.new(model))
    return *reused, *fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or repo id (default: a small random Qwen2)")
    parser.add_argument("--history", type=int, nargs="+", default=[64, 256, 1024],
                        help="conversation lengths before the follow-up, in tokens (default 64 256 1024)")
    parser.add_argument("--new", type=int, nargs="+", default=[16, 128],
                        help="new-message lengths, in tokens (default 16 128)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import qwen_mlx

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else build_random_model(Path(tmp))
        model, tokenizer = qwen_mlx.load(folder)
    tokenizer.eos_token_ids = []  # every first turn gives its full reply
    follow_up(model, tokenizer, 64, 16)  # warm-up

    print(f"\nTime to first token of a follow-up turn (history + {REPLY_TOKENS}-token reply + new message), "
          f"median of {args.repeats}\n")
    print(f"| {'history':>7} | {'new message':>11} | {'with reuse: prefilled':>21} | {'TTFT (ms)':>9} | "
          f"{'without: prefilled':>18} | {'TTFT (ms)':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 9}|{'-' * 13}|{'-' * 23}|{'-' * 11}|{'-' * 20}|{'-' * 11}|{'-' * 10}|")
    for new_len in args.new:
        for history_len in args.history:
            runs = [follow_up(model, tokenizer, history_len, new_len) for _ in range(args.repeats)]
            reused_ttft = statistics.median(r[0] for r in runs) * 1000
            fresh_ttft = statistics.median(r[2] for r in runs) * 1000
            print(f"| {history_len:7} | {new_len:11} | {runs[0][1]:21} | {reused_ttft:9.1f} | {runs[0][3]:18} | "
                  f"{fresh_ttft:9.1f} | {fresh_ttft / reused_ttft:7.1f}× |", flush=True)


if __name__ == "__main__":
    main()
