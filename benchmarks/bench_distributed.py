"""One model in one process against the same model split over two (`mlx.launch -n 2 --backend ring`, tensor and
pipeline parallel), for qwen-mlx and mlx-lm (`mlx_lm.utils.sharded_load`) side by side in one run: prefill and
decode tokens/s, and each rank's weights and peak memory.

    python benchmarks/bench_distributed.py                 # a random Qwen2.5-0.5B-shaped 4-bit model
    python benchmarks/bench_distributed.py --shape qwen2.5-7b --dtype bfloat16     # on two Macs: see below

On one machine both ranks share its cores and memory, and the ring runs over 127.0.0.1: what this measures is the
cost of the split (the collectives each layer or stage adds, the ranks' lockstep) and the memory each rank holds,
not the gain of a second machine. One process gets every core (one CPU stream per core); each of the two ranks gets
one stream (QWEN_MLX_CPU_STREAMS=1), so the machine's cores are used the same way in every layout.

Across two Macs, run the workers yourself with a hostfile (`mlx.distributed_config`) and compare:
`mlx.launch --hostfile hosts.json -- python benchmarks/bench_distributed.py --worker qwen-mlx tensor FOLDER PLAN OUT`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_mlx_lm import default_dtype, speeds, timed_tokens  # noqa: E402

DEFAULT_JSON = HERE / "results" / "distributed.json"
LAUNCH = [str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", "2", "--"]
LAYOUTS = ("one process", "tensor", "pipeline")
SIDES = ("qwen-mlx", "mlx-lm")


# --- the workers: every rank runs the same generations; rank 0 writes the results ---------------------------------

Tokens = Callable[[list[int], int], Iterator[int]]  # (prompt ids, n) -> the n generated ids as they come


def load_side(side: str, layout: str, folder: str) -> tuple[Any, Tokens, Callable[[], None]]:
    """The model of `side` (split as `layout` says), a `tokens(prompt, n)` generator over it, and a `sync()` that
    waits for all of its work."""
    import mlx.core as mx

    if side == "qwen-mlx":
        import qwen_mlx

        model, tokenizer = qwen_mlx.load(folder, parallel=None if layout == "one process" else layout)
        tokenizer.eos_token_ids = []  # both sides generate exactly what they are asked for

        def tokens(prompt: list[int], n: int) -> Iterator[int]:
            for chunk in qwen_mlx.stream_generate(model, tokenizer, prompt, max_tokens=n, temperature=0,
                                                  repetition_penalty=1.0):
                if chunk.token is not None:
                    yield chunk.token

        sync = mx.synchronize
    else:
        import mlx_lm
        from mlx_lm.generate import generation_stream
        from mlx_lm.utils import sharded_load

        if layout == "one process":
            model, tokenizer = mlx_lm.load(folder)
        else:
            group = mx.distributed.init()
            model, tokenizer = sharded_load(folder, **{f"{layout}_group": group})
        tokenizer._eos_token_ids = set()

        def tokens(prompt: list[int], n: int) -> Iterator[int]:
            for response in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=n):
                yield response.token

        def sync() -> None:
            # generate_step queues one step beyond the last token it hands out, collectives included: let it
            # finish before the next collective, or the ranks' messages interleave.
            mx.synchronize(generation_stream)
            mx.synchronize()

    return model, tokens, sync


def worker(side: str, layout: str, folder: str, plan_path: str, out: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    plan = json.loads(Path(plan_path).read_text())
    model, tokens, sync = load_side(side, layout, folder)
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    timed_tokens(tokens(plan["warmup"], 2))
    sync()
    rounds = []
    peak = 0
    for _ in range(plan["rounds"]):
        mx.clear_cache()
        mx.reset_peak_memory()
        start, stamps = timed_tokens(tokens(plan["prompt"], plan["decode_tokens"]))
        sync()
        peak = max(peak, mx.get_peak_memory())
        rounds.append(speeds(len(plan["prompt"]), start, stamps))
    per_rank = [[weights, peak]]
    if layout != "one process":
        gathered = mx.distributed.all_gather(mx.array([[weights, peak]], dtype=mx.int64))
        per_rank = gathered.tolist()  # evaluated on every rank: a collective one rank skips leaves the other waiting
    if layout == "one process" or mx.distributed.init().rank() == 0:
        result = {key: statistics.median(r[key] for r in rounds) for key in ("prefill_tps", "decode_tps")}
        result["ranks"] = [{"weights_gb": w / 1e9, "peak_gb": p / 1e9} for w, p in per_rank]
        Path(out).write_text(json.dumps(result))


# --- the parent: build, run each layout and side, report -----------------------------------------------------------

def run(side: str, layout: str, folder: Path, plan: Path, out: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", side, layout, str(folder), str(plan), str(out)]
    env = {**os.environ}
    if layout != "one process":
        command = [*LAUNCH, *command]
        env["QWEN_MLX_CPU_STREAMS"] = "1"
    print(f"{side}, {layout} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, check=False)
    # mlx.launch exits 0 even when a rank failed: the missing result file is what says so.
    if done.returncode or not out.exists():
        raise SystemExit(f"the {side} worker ({layout}) failed; its errors are above")
    return json.loads(out.read_text())


def report(results: dict[str, dict[str, dict[str, Any]]], header: str) -> str:
    sides = [s for s in SIDES if s in results]
    lines = [header, "",
             "| layout | " + " | ".join(f"{s} prefill tok/s | {s} decode tok/s" for s in sides)
             + (" | ratio prefill / decode" if len(sides) == 2 else "")
             + " | qwen-mlx vs one process | qwen-mlx weights / peak per rank (GB) |",
             "|---" * (1 + 2 * len(sides) + (3 if len(sides) == 2 else 2)) + "|"]
    alone = results["qwen-mlx"]["one process"]
    for layout in LAYOUTS:
        row = [layout]
        for side in sides:
            r = results[side][layout]
            row += [f"{r['prefill_tps']:.2f}", f"{r['decode_tps']:.2f}"]
        ours = results["qwen-mlx"][layout]
        if len(sides) == 2:
            theirs = results["mlx-lm"][layout]
            row.append(f"{ours['prefill_tps'] / theirs['prefill_tps']:.2f} / "
                       f"{ours['decode_tps'] / theirs['decode_tps']:.2f}")
        row.append(f"{ours['prefill_tps'] / alone['prefill_tps']:.2f} / {ours['decode_tps'] / alone['decode_tps']:.2f}")
        row.append(", ".join(f"{r['weights_gb']:.3f} / {r['peak_gb']:.3f}" for r in ours["ranks"]))
        lines.append("| " + " | ".join(row) + " |")
    if len(sides) == 2:
        lines += ["", "mlx-lm weights / peak per rank (GB): " + "; ".join(
            f"{layout}: " + ", ".join(f"{r['weights_gb']:.3f} / {r['peak_gb']:.3f}"
                                      for r in results["mlx-lm"][layout]["ranks"]) for layout in LAYOUTS)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b", help="a real Qwen2.5 shape, random weights")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", help="the scales' dtype (default float32 on the CPU, bfloat16 on Metal)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="generations per worker; medians reported")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--worker", nargs=5, metavar=("SIDE", "LAYOUT", "FOLDER", "PLAN", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import mlx.core as mx

    from qwen_mlx.engine.benchmark import random_prompt
    from qwen_mlx.store.synthetic import random_shape, write_random_quantized_model

    started = time.perf_counter()
    dtype = args.dtype or default_dtype()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = random_shape(args.shape)
        folder = write_random_quantized_model(tmp / "model", config, args.bits, args.group_size, dtype)
        plan = tmp / "plan.json"
        plan.write_text(json.dumps({
            "warmup": random_prompt(16, config["vocab_size"], seed=1),
            "prompt": random_prompt(args.prompt_tokens, config["vocab_size"]),
            "decode_tokens": args.decode_tokens, "rounds": args.rounds,
        }))
        sides = SIDES[:1] if args.skip_mlx_lm else SIDES
        results = {side: {layout: run(side, layout, folder, plan, tmp / f"{side}-{i}.json")
                          for i, layout in enumerate(LAYOUTS)} for side in sides}
    header = (f"{args.shape}, {args.bits}-bit g{args.group_size}, {dtype} scales; {args.prompt_tokens}-token prompt, "
              f"{args.decode_tokens} tokens, median of {args.rounds}; {mx.default_device()}, {os.cpu_count()} cores; "
              f"two ranks on one machine over the ring backend; {(time.perf_counter() - started) / 60:.1f} min")
    table = report(results, header)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"header": header, "results": results}, indent=2))


if __name__ == "__main__":
    main()
