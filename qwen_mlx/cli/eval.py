"""`qwen-mlx eval`: a model's perplexity on a text and, against a reference model (say the original of a 4-bit
conversion), how far its predictions drift from the reference's: KL(reference ‖ model) per token (mean and 99th
percentile, in nats), how often both pick the same likeliest token, and the change in perplexity.

    qwen-mlx eval --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --reference Qwen/Qwen2.5-0.5B-Instruct
    qwen-mlx eval --model ./my-model --text notes.md --text code.py --context 1024 --json

Without --text it scores the text shipped with qwen-mlx (qwen_mlx/reference/eval/eval.txt, about 3,600 tokens:
English prose, Python, a Markdown table, Chinese, French and German). The tokens are cut into windows of --context
tokens and the second half of each is scored, as llama.cpp's llama-perplexity does, so its figures on the same
text and -c compare with these.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qwen_mlx.engine.evaluate import DEFAULT_CONTEXT, EvalResult, check_same_tokenizer, check_window, evaluate
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.qwen2 import Qwen2
from qwen_mlx.store.load import DEFAULT_MODEL, load, resolve_model_path
from qwen_mlx.text.tokenizer import Tokenizer


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="perplexity on a text; KL and top-1 agreement against a reference model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"model folder, local model name, alias or Hugging Face repo id (default: "
                             f"{DEFAULT_MODEL})")
    parser.add_argument("--reference", metavar="MODEL",
                        help="a model with the same tokenizer to compare against (e.g. the unquantized original)")
    parser.add_argument("--text", metavar="FILE", action="extend", nargs="+",
                        help="UTF-8 text files to score, one after another (default: the text shipped with qwen-mlx)")
    parser.add_argument("--context", type=int, metavar="N",
                        help=f"tokens per window; the second half of each is scored (default {DEFAULT_CONTEXT}, as "
                             "llama-perplexity -c 512; at most the model's context)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.set_defaults(func=run)
    return parser


def read_texts(paths: list[str] | None) -> list[str] | None:
    """The files' texts, read (and refused when empty) before a model load that may take minutes."""
    if paths is None:
        return None
    texts = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise QwenMLXError(f"{path}: not UTF-8 text (byte {e.start}); give a UTF-8 text file") from None
        if not text.strip():
            raise QwenMLXError(f"{path}: the file is empty; give a file with text to evaluate")
        texts.append(text)
    return texts


def load_reference(name: str, tokenizer: Tokenizer) -> tuple[Qwen2, Tokenizer]:
    """The reference model, its tokenizer checked against the model's before its weights are read."""
    check_same_tokenizer(Tokenizer.from_folder(resolve_model_path(name)), tokenizer)
    return load(name)


def report(result: EvalResult) -> str:
    lines = [f"perplexity: {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows of "
             f"{result.context} tokens, the second half of each scored)"]
    if result.reference_perplexity is not None:
        lines += [f"reference perplexity: {result.reference_perplexity:.4f} (change {result.perplexity_change:+.4f})",
                  f"KL(reference || model) per token: mean {result.kl_mean:.6f}, 99th percentile "
                  f"{result.kl_p99:.6f} nats",
                  f"top-1 agreement: {100 * (result.top1_agreement or 0):.2f}%"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.context is not None:
        check_window(args.context)
    texts = read_texts(args.text)
    print(f"Loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load(args.model)
    reference = None
    if args.reference is not None:
        print(f"Loading {args.reference} ...", file=sys.stderr, flush=True)
        reference = load_reference(args.reference, tokenizer)
    result = evaluate(model, tokenizer, texts, reference=reference, context=args.context, progress=True)
    print(json.dumps(result.to_dict()) if args.json else report(result))
    return 0
