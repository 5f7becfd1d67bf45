"""Run under `mlx.launch -n N --backend ring`: each rank loads its part of each model and computes what the tests
compare with one process's results; rank 0 writes them as JSON. `python parallel_run.py MODE OUT FOLDER...`."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen_mlx.engine.generate import generate
from qwen_mlx.store.load import load

# Two rows, so the sharded layers also see a batch.
PROMPT = [[1, 7, 42, 99, 5, 250, 17, 3], [4, 4, 8, 15, 16, 23, 42, 108]]
MESSAGES = [{"role": "user", "content": "the cat"}]
MAX_TOKENS = 12


def weight_bytes(model: mx.array) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def run(folder: str, mode: str) -> dict:
    model, tokenizer = load(folder, parallel=mode)
    group = mx.distributed.init()
    logits = model(mx.array(PROMPT)).astype(mx.float32)
    per_rank = mx.distributed.all_gather(mx.array([weight_bytes(model)], dtype=mx.int64), group=group)
    mx.eval(logits, per_rank)  # on every rank: a collective left unevaluated on one leaves the others waiting
    reply = generate(model, tokenizer, MESSAGES, max_tokens=MAX_TOKENS, temperature=0.0)
    return {"logits": logits.tolist(), "weight_bytes": per_rank.tolist(), "tokens": reply.tokens}


def main(mode: str, out: str, *folders: str) -> None:
    results = {folder: run(folder, mode) for folder in folders}
    if mx.distributed.init().rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
