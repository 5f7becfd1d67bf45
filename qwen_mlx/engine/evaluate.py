"""A model's perplexity on a text and, against a reference model, how far its next-token distributions drift from
the reference's: the library side of `qwen-mlx eval`.

Windows are llama.cpp's (llama-perplexity), so figures compare with its own on the same text and context: the
tokens are cut into consecutive, non-overlapping windows of `context` tokens (a tail shorter than a window is left
out), each read from an empty cache, and only each window's second half is scored, the logits at positions
context/2 .. context-2 predicting the tokens after them. Every scored token thus has at least half a window before
it: the figure is how well the model reads with context, not how well it guesses a window's first words with none.
A stride of one token would give each token the full window, at context/2 times the cost. With a reference model,
KL(reference ‖ model), top-1 agreement and both perplexities cover the same tokens, as llama-perplexity
--kl-divergence computes them (the mean KL, its 99th percentile, "same top p").

Memory stays bounded whatever the text's length: a window's hidden states are kept (positions x hidden size), but
logits (positions x vocabulary, 151,936 wide for Qwen2.5) exist for `POSITIONS_PER_CHUNK` positions at a time,
each chunk reduced to per-token scalars (the next token's log-probability, the KL, whether the top tokens agree)
before the next is computed. Log-softmax and KL are float32, whatever dtype the model computes in.

Nothing here is random: the same model, text and context give the same figures on every run.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.text.tokenizer import Tokenizer

DEFAULT_CONTEXT = 512  # llama-perplexity's published figures (wikitext-2) are at -c 512
MIN_CONTEXT = 3  # a window of 2 has no second half to score: position 1 predicts a token outside it
POSITIONS_PER_CHUNK = 64  # 64 positions x 151,936 tokens: 39 MB of float32 logits per model at a time
# Shipped with the package, written for it (see its README): used when no text is given.
EVAL_TEXT = Path(__file__).resolve().parents[1] / "reference" / "eval" / "eval.txt"


@dataclass(frozen=True)
class EvalResult:
    """What `evaluate` measured over `tokens` scored tokens (`windows` windows of `context`); the reference's
    figures are None without a reference. KL is in nats, KL(reference ‖ model) per token."""

    perplexity: float
    tokens: int
    context: int
    windows: int
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None  # the fraction of tokens where both models' likeliest next token is one

    @property
    def perplexity_change(self) -> float | None:
        """The model's perplexity less the reference's (llama.cpp's PPL(Q) - PPL(base))."""
        return None if self.reference_perplexity is None else self.perplexity - self.reference_perplexity

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity_change": self.perplexity_change}


def evaluate(model: nn.Module, tokenizer: Tokenizer, texts: str | Sequence[str] | None = None,
             reference: tuple[nn.Module, Tokenizer] | None = None, context: int | None = None,
             progress: bool = False) -> EvalResult:
    """Perplexity of `model` on `texts` (default: the text shipped with qwen-mlx) in windows of `context` tokens
    (default 512, or less where a model's context is shorter); with `reference` (what `qwen_mlx.load` returns for
    a model with the same tokenizer), also KL(reference ‖ model), top-1 agreement and the reference's perplexity
    over the same tokens. `progress` draws a progress bar on stderr.

    >>> result = evaluate(*load("mlx-community/Qwen2.5-0.5B-Instruct-4bit"),
    ...                   reference=load("Qwen/Qwen2.5-0.5B-Instruct"))
    """
    reference_model = reference_of(reference, tokenizer)
    models = [model] if reference_model is None else [model, reference_model]
    context = window_length(context, models)
    tokens = text_tokens(tokenizer, texts)
    windows = len(tokens) // context
    if windows == 0:
        raise QwenMLXError(f"the text is {len(tokens)} tokens, fewer than one window of context (--context) "
                           f"{context}; give more text or a smaller context", "context")
    scores: defaultdict[str, list[np.ndarray]] = defaultdict(list)
    nll, scored = 0.0, 0  # running sums for the bar's perplexity so far, as llama-perplexity prints it per chunk
    with tqdm(total=windows, desc="evaluating", unit="window", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for w in range(windows):
            window = score_window(model, reference_model, mx.array(tokens[w * context : (w + 1) * context]))
            for name, values in window.items():
                scores[name].append(values)
            nll, scored = nll - window["logprob"].sum(dtype=np.float64), scored + window["logprob"].size
            bar.set_postfix(ppl=f"{math.exp(nll / scored):.4f}")
            bar.update()
    return summarize(scores, context, windows)


def reference_of(reference: Any, tokenizer: Tokenizer) -> nn.Module | None:
    """The reference's model, once its tokenizer is checked against the model's."""
    if reference is None:
        return None
    if not (isinstance(reference, (tuple, list)) and len(reference) == 2 and isinstance(reference[1], Tokenizer)):
        raise QwenMLXError("reference must be (model, tokenizer), as qwen_mlx.load(path) returns them", "reference")
    check_same_tokenizer(reference[1], tokenizer)
    return reference[0]


def check_same_tokenizer(reference: Tokenizer, tokenizer: Tokenizer) -> None:
    """KL and top-1 agreement compare the two models' predictions token id by token id: the ids must mean the same."""
    if reference.fingerprint != tokenizer.fingerprint:
        raise QwenMLXError("the reference model (--reference) has another tokenizer than the model (another "
                           "vocabulary or added tokens), so their predictions cannot be compared token by token; "
                           "compare models of one family (e.g. a 4-bit Qwen2.5-7B-Instruct with Qwen2.5-7B-Instruct)",
                           "reference")


def window_length(context: int | None, models: list[nn.Module]) -> int:
    """The tokens per window: `context` checked against every model's context, or the default that fits them."""
    limit = min(m.config.context_length for m in models)
    if context is None:
        return min(DEFAULT_CONTEXT, limit)
    check_window(context)
    if context > limit:
        raise QwenMLXError(f"context (--context) {context} is longer than the model's context ({limit} positions); "
                           f"evaluate with at most {limit}", "context")
    return context


def check_window(context: object) -> None:
    if isinstance(context, bool) or not isinstance(context, int) or context < MIN_CONTEXT:
        raise QwenMLXError(f"context (--context) {context!r} must be an integer of at least {MIN_CONTEXT}: each "
                           f"window's second half is scored (e.g. 512)", "context")


def text_tokens(tokenizer: Tokenizer, texts: str | Sequence[str] | None) -> list[int]:
    """The texts' token ids, one after another. Each text is encoded on its own, so no token spans two texts; one
    text is encoded as llama.cpp encodes its file (no BOS: Qwen adds none), special-token markup as plain text."""
    if texts is None:
        texts = [EVAL_TEXT.read_text(encoding="utf-8")]
    elif isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not texts:
        raise QwenMLXError("texts must be a string or a non-empty list of strings", "texts")
    tokens: list[int] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise QwenMLXError(f"texts[{i}] must be a string, not {type(text).__name__}", "texts")
        if not text.strip():
            raise QwenMLXError(f"texts[{i}] is empty: there is nothing to evaluate", "texts")
        tokens += tokenizer.encode(text)
    return tokens


def score_window(model: nn.Module, reference: nn.Module | None, ids: mx.array) -> dict[str, np.ndarray]:
    """The per-token scores of `ids`' second half (see `chunk_scores`), computed a chunk of positions at a time."""
    first = ids.size // 2
    targets = np.array(ids[first + 1 :])
    readers = [(m, scored_hidden(m, ids, first)) for m in (model, reference) if m is not None]
    chunks = []
    for start in range(0, targets.size, POSITIONS_PER_CHUNK):
        part = slice(start, start + POSITIONS_PER_CHUNK)
        logits = [m.logits(hidden[part]) for m, hidden in readers]  # the model's, then the reference's
        chunks.append(chunk_scores(logits[0], logits[1] if reference is not None else None, targets[part]))
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}


def scored_hidden(model: nn.Module, ids: mx.array, first: int) -> mx.array:
    """The final hidden states at positions first .. len-2 of a window read from an empty cache (the last position
    predicts a token outside the window), computed once for all of its chunks."""
    hidden = model.model(ids[None])[0, first:-1]
    mx.eval(hidden)
    return hidden


def chunk_scores(logits: mx.array, reference_logits: mx.array | None, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: the log-probability of the next token; with the reference's logits, also its log-probability,
    KL(reference ‖ model) and whether the two likeliest tokens are one.

    In numpy, float32: on MLX's CPU build, exp over 64 x 151,936 logits takes 4x numpy's time, and a chunk is
    mostly exps."""
    logprobs = log_softmax(np.array(logits.astype(mx.float32)))
    scores = {"logprob": next_token(logprobs, targets)}
    if reference_logits is None:
        return scores
    reference_logprobs = log_softmax(np.array(reference_logits.astype(mx.float32)))
    scores["reference_logprob"] = next_token(reference_logprobs, targets)
    # Checkpoints of one family may pad the vocabulary differently (Qwen2.5-7B: 152,064 rows, 0.5B: 151,936) past
    # the tokenizer's 151,665 ids. Compare the rows both have, each distribution renormalized over them: the rows
    # past the tokenizer are never a text's token, and their probability is next to nothing.
    shared = min(logprobs.shape[-1], reference_logprobs.shape[-1])
    if logprobs.shape[-1] > shared:
        logprobs = log_softmax(logprobs[:, :shared])
    if reference_logprobs.shape[-1] > shared:
        reference_logprobs = log_softmax(reference_logprobs[:, :shared])
    scores["kl"] = (np.exp(reference_logprobs) * (reference_logprobs - logprobs)).sum(axis=-1)
    scores["agree"] = reference_logprobs.argmax(axis=-1) == logprobs.argmax(axis=-1)
    return scores


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in the input's dtype (float32 here), into a new array."""
    x = x - x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def next_token(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]


def perplexity(logprobs: list[np.ndarray]) -> float:
    """exp of the mean negative log-likelihood, summed in float64."""
    return float(np.exp(-np.concatenate(logprobs).astype(np.float64).mean()))


def summarize(scores: dict[str, list[np.ndarray]], context: int, windows: int) -> EvalResult:
    tokens = sum(len(a) for a in scores["logprob"])
    result = EvalResult(perplexity(scores["logprob"]), tokens, context, windows)
    if "kl" not in scores:
        return result
    kl = np.concatenate(scores["kl"]).astype(np.float64)
    return EvalResult(result.perplexity, tokens, context, windows,
                      reference_perplexity=perplexity(scores["reference_logprob"]), kl_mean=float(kl.mean()),
                      kl_p99=float(np.percentile(kl, 99)),
                      top1_agreement=float(np.concatenate(scores["agree"]).mean()))
