"""qwen-mlx against mlx-lm on one random-weight model of a real Qwen2.5 shape: prefill and decode speed, peak
memory, and the time to first token of a multi-turn chat.

    python benchmarks/vs_mlx_lm.py --quick       # about 7 minutes on a 2-core Linux machine (MLX's CPU build)
    python benchmarks/vs_mlx_lm.py               # the full run: about 25 minutes there
    python benchmarks/vs_mlx_lm.py --shape qwen2.5-7b --dtype bfloat16     # on a Mac

The model (default Qwen2.5-0.5B's shape, 4 bits, group 64) is built once, offline, with `qwen-mlx bench`'s random
writer, and the same folder is loaded by both. Each round runs one qwen-mlx worker and then one mlx-lm worker, each
a fresh process: loading, a short warm-up, then every measurement of the round. Separate processes are the only way
to make each side's peak memory its own: in one process MLX's peak counter, its buffer cache and the other model's
weights would all be shared. The table reports medians over the rounds and the ratio qwen-mlx / mlx-lm (above 1 is
faster for speeds; below 1 is leaner or quicker for memory and times to first token).

- prefill tokens/s: prompt tokens over the time to the first generated token, for each of --prompt-lengths;
- decode tokens/s: tokens after the first over the time they took, --decode-tokens after the shortest prompt;
- peak memory: the highest MLX peak of the round's generations (after the warm-up), weights included;
- multi-turn: a scripted chat (fixed user and assistant texts, each turn adding about 50 tokens), the time to the
  first token of each turn: qwen-mlx with one PromptCache across turns (it prefills what is new), mlx-lm's
  `stream_generate` given the whole conversation each turn, and given only what extends its prompt cache (trimmed
  back to the common prefix, as mlx_lm.server does). Measured in the first round only: the gaps are far beyond
  run-to-run noise and the uncached turns are the slowest part of the run.

Both sides decode greedily, see the same token ids (our tokenizer's), and are timed by the same code here, token by
token, rather than by their own statistics.

On MLX's CPU build the default stores the scales in float32 (--dtype): mlx-lm then runs on the same float32 kernels
as qwen-mlx, which the comparison needs, since in float16 or bfloat16 mlx-lm takes 14 or 3 s per token at this
shape (hours for this plan) while qwen-mlx computes in float32 whatever the checkpoint's dtype. On Metal the default
is bfloat16, as Qwen2.5 is released.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "vs_mlx_lm.json"

SYSTEM = "You are a helpful assistant for a small bakery. Answer briefly."
# (user message, scripted assistant reply): with the chat template each turn adds 45-53 tokens.
CONVERSATION = [
    ("We want to sell sourdough on weekdays. How many loaves should we bake on a Monday?",
     "Start with about forty, since Monday is the quietest day. Count what is left at closing and adjust."),
    ("Our oven holds twelve loaves and a bake takes forty minutes. How long do forty loaves take?",
     "Four bakes, so two hours and forty minutes, plus a few minutes of loading between them."),
    ("If we start at five in the morning, can we open at eight?",
     "Yes: open at eight with three batches on the shelves and bring out the last one at twenty past."),
    ("What should we do with the loaves left at the end of the day?",
     "Sell them at half price the next morning, make croutons, and give the rest to a food bank."),
    ("Please summarize the plan in three short points for the staff notice board.", None),
]
SIDES = ("qwen-mlx", "mlx-lm")
PEAKS: list[int] = []  # a worker's MLX peak memory after each generation


# --- the workers: one process per side and round -----------------------------------------------------------------

def timed_tokens(tokens: Iterator[int]) -> tuple[float, list[float]]:
    """Start time and the arrival time of each token of the `tokens` iterator."""
    start = time.perf_counter()
    stamps = []
    for _ in tokens:
        stamps.append(time.perf_counter())
    return start, stamps


def speeds(prompt_len: int, start: float, stamps: list[float]) -> dict[str, float]:
    first = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"ttft": first, "prefill_tps": prompt_len / first, "decode_tps": decode, "tokens": len(stamps)}


def ours_worker(folder: str, plan: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx

    import qwen_mlx
    from qwen_mlx.model.cache import PromptCache

    model, tokenizer = qwen_mlx.load(folder)
    weights = mx.get_active_memory()
    tokenizer.eos_token_ids = []  # both sides generate exactly what they are asked for
    greedy = {"temperature": 0, "repetition_penalty": 1.0}

    def tokens(prompt: list[int], n: int, prompt_cache: Any = None) -> Iterator[int]:
        for chunk in qwen_mlx.stream_generate(model, tokenizer, prompt, max_tokens=n, prompt_cache=prompt_cache,
                                              **greedy):
            if chunk.token is not None:
                yield chunk.token
        # stream_generate restarts MLX's peak counter at each call: keep each call's peak.
        PEAKS.append(mx.get_peak_memory())

    def conversation() -> list[float]:
        prompt_cache = PromptCache.new(model)
        ttfts = []
        for ids in plan["turns"]:
            start, stamps = timed_tokens(tokens(ids, 1, prompt_cache))
            ttfts.append(stamps[0] - start)
        return ttfts

    return measure(plan, weights, tokens, {"reuse": conversation} if plan["turns"] else {}, mx.synchronize)


def mlx_lm_worker(folder: str, plan: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generation_stream
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    model, tokenizer = mlx_lm.load(folder)
    weights = mx.get_active_memory()
    tokenizer._eos_token_ids = set()

    def tokens(prompt: list[int], n: int, prompt_cache: Any = None) -> Iterator[int]:
        for response in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=n, prompt_cache=prompt_cache):
            yield response.token
        PEAKS.append(mx.get_peak_memory())

    def sync() -> None:
        # generate_step queues one step beyond the last token it hands out; let it finish outside the timings.
        mx.synchronize(generation_stream)
        mx.synchronize()

    def without_cache() -> list[float]:
        ttfts = []
        for ids in plan["turns"]:
            start, stamps = timed_tokens(tokens(ids, 1))
            ttfts.append(stamps[0] - start)
            sync()
        return ttfts

    def with_cache() -> list[float]:
        cache, cached, ttfts = make_prompt_cache(model), [], []
        for ids in plan["turns"]:
            start = time.perf_counter()
            # What mlx_lm.server does: keep the longest common prefix, trim the rest, feed only what is new (at
            # least one token, whose logits give the first reply token).
            common = min(common_prefix(cached, ids), len(ids) - 1)
            trim_prompt_cache(cache, len(cached) - common)
            _, stamps = timed_tokens(tokens(ids[common:], 1, cache))
            ttfts.append(stamps[0] - start)
            sync()
            cached = ids + [-1]  # generate_step has also run the reply token through the model
        return ttfts

    conversations = {"no_cache": without_cache, "cache": with_cache} if plan["turns"] else {}
    return measure(plan, weights, tokens, conversations, sync)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def measure(
    plan: dict[str, Any],
    weights: int,
    tokens: Callable[..., Iterator[int]],
    conversations: dict[str, Callable[[], list[float]]],
    sync: Callable[[], None],
) -> dict[str, Any]:
    """The measurements of one round, with either side's `tokens(prompt, n, cache)` generator."""
    import mlx.core as mx

    timed_tokens(tokens(plan["warmup"], 2))
    sync()
    mx.clear_cache()
    mx.reset_peak_memory()
    first_timed = len(PEAKS)
    result: dict[str, Any] = {"weights_gb": weights / 1e9, "prompts": {}}
    for i, ids in enumerate(plan["prompts"]):
        n = plan["decode_tokens"] if i == 0 else 1
        start, stamps = timed_tokens(tokens(ids, n))
        sync()
        result["prompts"][str(len(ids))] = speeds(len(ids), start, stamps)
        if stamps and len(stamps) != n:
            raise AssertionError(f"generated {len(stamps)} tokens instead of {n}")
    result["turns"] = {name: run() for name, run in conversations.items()}
    result["peak_gb"] = max(PEAKS[first_timed:]) / 1e9
    return result


# --- the parent: build, alternate, report ------------------------------------------------------------------------

def run_worker(side: str, folder: Path, plan_path: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--worker", side, str(folder), str(plan_path)],
                         stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"the {side} worker failed (exit {out.returncode}); its errors are above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_dtype() -> str:
    import mlx.core as mx

    return "float32" if mx.default_device().type == mx.DeviceType.cpu else "bfloat16"


def build_plan(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from qwen_mlx.engine.benchmark import random_prompt
    from qwen_mlx.model.config import ModelConfig
    from qwen_mlx.text.tokenizer import Tokenizer

    vocab = ModelConfig.from_file(folder / "config.json").vocab_size
    tokenizer = Tokenizer.from_folder(folder)
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    turns = []
    for user, reply in CONVERSATION[: args.turns]:
        messages.append({"role": "user", "content": user})
        turns.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        messages.append({"role": "assistant", "content": reply or ""})
    longest = random_prompt(max(args.prompt_lengths), vocab)
    return {
        "warmup": random_prompt(16, vocab, seed=1),
        # Prefixes of one random prompt, so the lengths differ only in length.
        "prompts": [longest[:n] for n in sorted(args.prompt_lengths)],
        "decode_tokens": args.decode_tokens,
        "turns": turns,
    }


def other_load() -> Any:
    """A probe of the CPU time other processes take (Linux), so a run on a busy machine says so."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


def median_result(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    first = rounds[0]
    med: dict[str, Any] = {
        "weights_gb": statistics.median(r["weights_gb"] for r in rounds),
        "peak_gb": statistics.median(r["peak_gb"] for r in rounds),
        "prompts": {
            n: {k: statistics.median(r["prompts"][n][k] for r in rounds) for k in first["prompts"][n]}
            for n in first["prompts"]
        },
        "turns": first["turns"],
    }
    return med


def report(args: argparse.Namespace, plan: dict[str, Any], meds: dict[str, dict[str, Any]], rounds: int) -> list[str]:
    ours, theirs = meds["qwen-mlx"], meds["mlx-lm"]
    rows: list[tuple[str, float, float]] = []
    lengths = list(ours["prompts"])
    for n in lengths:
        rows.append((f"prefill tokens/s, {n}-token prompt", ours["prompts"][n]["prefill_tps"],
                     theirs["prompts"][n]["prefill_tps"]))
    rows.append((f"decode tokens/s, {plan['decode_tokens']} tokens after {lengths[0]}",
                 ours["prompts"][lengths[0]]["decode_tps"], theirs["prompts"][lengths[0]]["decode_tps"]))
    rows.append(("peak memory (GB)", ours["peak_gb"], theirs["peak_gb"]))
    rows.append(("weights in memory (GB)", ours["weights_gb"], theirs["weights_gb"]))
    lines = [f"| {'median of ' + str(rounds) + ' rounds':42} | {'qwen-mlx':>9} | {'mlx-lm':>9} | {'ratio':>6} |",
             f"|{'-' * 44}|{'-' * 11}|{'-' * 11}|{'-' * 8}|"]
    for label, a, b in rows:
        lines.append(f"| {label:42} | {a:9.3f} | {b:9.3f} | {a / b:6.2f} |")
    if plan["turns"]:
        reuse, none, cached = ours["turns"]["reuse"], theirs["turns"]["no_cache"], theirs["turns"]["cache"]
        lines += ["", "Multi-turn chat, time to first token (s) of each turn (first round):", "",
                  f"| {'turn':>4} | {'prompt tokens':>13} | {'qwen-mlx, prefix reuse':>22} | "
                  f"{'mlx-lm, no cache':>16} | {'mlx-lm, prompt cache':>20} | {'ours / no cache':>15} | "
                  f"{'ours / cache':>12} |",
                  f"|{'-' * 6}|{'-' * 15}|{'-' * 24}|{'-' * 18}|{'-' * 22}|{'-' * 17}|{'-' * 14}|"]
        for i, ids in enumerate(plan["turns"]):
            lines.append(f"| {i + 1:4} | {len(ids):13} | {reuse[i]:22.3f} | {none[i]:16.3f} | {cached[i]:20.3f} | "
                         f"{reuse[i] / none[i]:15.2f} | {reuse[i] / cached[i]:12.2f} |")
        a, b, c = sum(reuse), sum(none), sum(cached)
        lines.append(f"| {'all':>4} | {sum(len(t) for t in plan['turns']):13} | {a:22.3f} | {b:16.3f} | {c:20.3f} | "
                     f"{a / b:15.2f} | {a / c:12.2f} |")
    return lines


def ratios(meds: dict[str, dict[str, Any]], plan: dict[str, Any]) -> dict[str, float]:
    ours, theirs = meds["qwen-mlx"], meds["mlx-lm"]
    out = {f"prefill_{n}": ours["prompts"][n]["prefill_tps"] / theirs["prompts"][n]["prefill_tps"]
           for n in ours["prompts"]}
    first = next(iter(ours["prompts"]))
    out["decode"] = ours["prompts"][first]["decode_tps"] / theirs["prompts"][first]["decode_tps"]
    out["peak_memory"] = ours["peak_gb"] / theirs["peak_gb"]
    out["weights_memory"] = ours["weights_gb"] / theirs["weights_gb"]
    if plan["turns"]:
        reuse = sum(ours["turns"]["reuse"])
        out["multi_turn_ttft_vs_no_cache"] = reuse / sum(theirs["turns"]["no_cache"])
        out["multi_turn_ttft_vs_cache"] = reuse / sum(theirs["turns"]["cache"])
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    from qwen_mlx.files import replaced_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one prompt length (128), 32 decoded tokens, a 3-turn chat: --prompt-lengths etc. "
                             "still override it")
    parser.add_argument("--shape", default="qwen2.5-0.5b",
                        help="qwen2.5-0.5b (default), -1.5b, -3b, -7b, or a config.json for another Qwen2 shape")
    parser.add_argument("--model", help="an existing MLX model folder instead of a random one")
    parser.add_argument("--q-bits", type=int, default=4)
    parser.add_argument("--q-group-size", type=int, default=64)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="the scales' and norms' dtype (default: float32 on MLX's CPU build, else bfloat16)")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", help="prefill prompts (default 128 512)")
    parser.add_argument("--decode-tokens", type=int, help="tokens decoded after the shortest prompt (default 128)")
    parser.add_argument("--turns", type=int, help=f"chat turns, 0 to {len(CONVERSATION)} (default 5)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, each side once per round (default 2)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results ({DEFAULT_JSON})")
    args = parser.parse_args(argv)
    quick = {"prompt_lengths": [128], "decode_tokens": 32, "turns": 3}
    full = {"prompt_lengths": [128, 512], "decode_tokens": 128, "turns": len(CONVERSATION)}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 <= args.turns <= len(CONVERSATION):
        parser.error(f"--turns must be between 0 and {len(CONVERSATION)}")
    if args.decode_tokens < 2 or min(args.prompt_lengths) < 1 or args.repeats < 1:
        parser.error("--decode-tokens must be at least 2, --prompt-lengths and --repeats at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import mlx.core as mx
    import mlx_lm

    from qwen_mlx.store.synthetic import random_shape, write_random_quantized_model

    args.dtype = args.dtype or default_dtype()
    began, load_before = time.perf_counter(), other_load()
    with tempfile.TemporaryDirectory(prefix="vs-mlx-lm-") as tmp:
        if args.model:
            folder = Path(args.model)
            args.dtype = json.loads((folder / "config.json").read_text()).get("torch_dtype", "?")
        else:
            print(f"Building a random {args.shape} model, {args.q_bits} bits, group {args.q_group_size}, "
                  f"{args.dtype} ...", file=sys.stderr, flush=True)
            folder = write_random_quantized_model(Path(tmp) / "model", random_shape(args.shape), args.q_bits,
                                                  args.q_group_size, args.dtype)
        plan = build_plan(folder, args)
        # The chat is measured in the first round only.
        plans = [Path(tmp) / "plan-first.json", Path(tmp) / "plan-rest.json"]
        plans[0].write_text(json.dumps(plan))
        plans[1].write_text(json.dumps({**plan, "turns": []}))
        rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for r in range(args.repeats):
            for side in SIDES:
                print(f"round {r + 1}/{args.repeats}: {side} ...", file=sys.stderr, flush=True)
                rounds[side].append(run_worker(side, folder, plans[min(r, 1)]))
    meds = {side: median_result(rounds[side]) for side in SIDES}
    elapsed = time.perf_counter() - began
    lines = report(args, plan, meds, args.repeats)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = f"{mx.default_device()}, {cores} cores, {platform.system()} {platform.machine()}"
    header = (f"{args.model or args.shape}, {args.q_bits}-bit g{args.q_group_size}, {args.dtype} scales; "
              f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}; {device}; {elapsed / 60:.1f} min")
    print(f"\n{header}\n")
    print("\n".join(lines))
    busy = None
    load_after = other_load()
    if load_before and load_after:
        busy = ((load_after[0] - load_before[0]) - (load_after[1] - load_before[1])) / elapsed
        if busy > 0.1:
            print(f"\nOther processes used {busy:.2f} cores on average during the run: the figures are skewed.")
    write_json(args.json, {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "device": device,
                        "python": platform.python_version(), "other_processes_cores": busy},
        "elapsed_s": elapsed,
        "prompt_tokens_per_turn": [len(t) for t in plan["turns"]],
        "medians": meds,
        "ratios": ratios(meds, plan),
        "rounds": rounds,
        "table": [header, "", *lines],
    })
    print(f"\nWrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker = {"qwen-mlx": ours_worker, "mlx-lm": mlx_lm_worker}[sys.argv[2]]
        print(json.dumps(worker(sys.argv[3], json.loads(Path(sys.argv[4]).read_text()))))
    else:
        main()
