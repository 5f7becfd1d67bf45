"""`qwen_mlx.evaluate` and `qwen-mlx eval`: perplexity as transformers computes it over llama.cpp's windows (the
second half of each), KL(reference ‖ model) and top-1 agreement as numpy computes them from transformers' logits,
the shipped evaluation text, and the one-line errors."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hf_models import TINY_VOCAB, load_hf, save_tiny_qwen2
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer

import qwen_mlx
from qwen_mlx.cli import main as cli
from qwen_mlx.engine import evaluate as evaluation
from qwen_mlx.engine.evaluate import EVAL_TEXT, EvalResult, evaluate
from qwen_mlx.errors import QwenMLXError

# Two texts (each encoded on its own, then one after another), long enough for several windows of CONTEXT.
TEXTS = [EVAL_TEXT.read_text(encoding="utf-8")[:900], "二十四节气是中国古代用来指导农业生产的一套历法。" * 6]
# 79 scored positions a window: more than one chunk of evaluate's POSITIONS_PER_CHUNK (64).
CONTEXT = 160


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("base"), tie_word_embeddings=False)


@pytest.fixture(scope="module")
def noisy_head(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base model with noise added to its lm_head: the same network, other next-token distributions."""
    folder = tmp_path_factory.mktemp("noisy")
    for file in base.iterdir():
        shutil.copy(file, folder / file.name)
    weights = load_file(str(base / "model.safetensors"))
    head = weights["lm_head.weight"]
    weights["lm_head.weight"] = head + np.random.default_rng(0).normal(0.0, 0.1, head.shape).astype(head.dtype)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model of the same tokenizer with 16 more (unused) rows in its vocabulary, as Qwen2.5-7B has more than
    the 0.5B."""
    return save_tiny_qwen2(tmp_path_factory.mktemp("padded"), seed=1, vocab_size=TINY_VOCAB + 16,
                           tie_word_embeddings=False)


def windows_of(folder: Path, texts: list[str], context: int) -> list[list[int]]:
    """llama.cpp's windows, computed here from the tokenizer's own file: consecutive, `context` tokens each."""
    tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tokens = [t for text in texts for t in tokenizer.encode(text).ids]
    return [tokens[i : i + context] for i in range(0, len(tokens) - context + 1, context)]


def scored_logprobs(folder: Path, windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' log-softmax (float64) at each window's scored positions (context/2 .. context-2), and the
    tokens they predict."""
    import torch

    model = load_hf(folder)
    logprobs, targets = [], []
    for ids in windows:
        first = len(ids) // 2
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, first:-1].double()
        logprobs.append(torch.log_softmax(logits, dim=-1).numpy())
        targets += ids[first + 1 :]
    return np.concatenate(logprobs), np.array(targets)


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def test_perplexity_is_transformers_over_the_second_half_of_each_window(base: Path) -> None:
    windows = windows_of(base, TEXTS, CONTEXT)
    logprobs, targets = scored_logprobs(base, windows)
    expected = np.exp(-logprobs[np.arange(len(targets)), targets].mean())

    result = evaluate(*qwen_mlx.load(base), TEXTS, context=CONTEXT)
    assert (result.windows, result.tokens, result.context) == (len(windows), len(targets), CONTEXT)
    assert result.tokens == len(windows) * (CONTEXT - CONTEXT // 2 - 1)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.reference_perplexity is result.kl_mean is result.top1_agreement is None


@pytest.mark.parametrize("other", ["noisy_head", "padded"])
def test_kl_and_top1_agreement_are_numpys_from_transformers_logits(base: Path, other: str,
                                                                    request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(other)
    windows = windows_of(base, TEXTS, CONTEXT)
    reference, targets = scored_logprobs(base, windows)
    mine, _ = scored_logprobs(folder, windows)
    rows = np.arange(len(targets))
    # KL(reference ‖ model) per token over the rows both vocabularies have, each renormalized over them.
    shared = min(reference.shape[1], mine.shape[1])
    p, q = log_softmax(reference[:, :shared]), log_softmax(mine[:, :shared])
    kl = (np.exp(p) * (p - q)).sum(-1)
    agree = (p.argmax(-1) == q.argmax(-1)).mean()

    result = evaluate(*qwen_mlx.load(folder), TEXTS, reference=qwen_mlx.load(base), context=CONTEXT)
    assert result.kl_mean == pytest.approx(kl.mean(), rel=1e-4)
    assert result.kl_p99 == pytest.approx(np.percentile(kl, 99), rel=1e-4)
    assert 0 < result.kl_mean < result.kl_p99
    assert result.top1_agreement == pytest.approx(agree, abs=1 / len(targets))
    if other == "noisy_head":  # the same network: most top tokens survive the noise, not all
        assert 0 < result.top1_agreement < 1
    assert result.perplexity == pytest.approx(np.exp(-mine[rows, targets].mean()), rel=1e-5)
    assert result.reference_perplexity == pytest.approx(np.exp(-reference[rows, targets].mean()), rel=1e-5)
    assert result.perplexity_change == pytest.approx(result.perplexity - result.reference_perplexity)


def test_a_model_against_itself_has_no_kl_and_agrees_everywhere(tiny_model_dir: Callable[..., Path]) -> None:
    """Qwen2.5's own tokenizer and 151,665-token vocabulary: each window's logits come in several chunks."""
    model, tokenizer = qwen_mlx.load(tiny_model_dir("tiny-eval"))
    result = evaluate(model, tokenizer, TEXTS, reference=(model, tokenizer), context=140)
    assert result.tokens == result.windows * 69 > 64
    assert (result.kl_mean, result.kl_p99, result.top1_agreement) == (0.0, 0.0, 1.0)
    assert result.reference_perplexity == result.perplexity


def test_chunks_of_positions_change_nothing(noisy_head: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, reference = qwen_mlx.load(noisy_head), qwen_mlx.load(base)
    whole = evaluate(*model, TEXTS, reference=reference, context=CONTEXT)
    monkeypatch.setattr(evaluation, "POSITIONS_PER_CHUNK", 7)
    # Equal but for the matmul's summation order, which BLAS picks by the number of rows.
    assert evaluate(*model, TEXTS, reference=reference, context=CONTEXT).to_dict() == pytest.approx(whole.to_dict(),
                                                                                                   rel=1e-6)


def test_without_a_text_the_shipped_one_is_scored(base: Path) -> None:
    model, tokenizer = qwen_mlx.load(base)
    tokens = len(tokenizer.encode(EVAL_TEXT.read_text(encoding="utf-8")))
    result = evaluate(model, tokenizer, context=1024)
    assert result.windows == tokens // 1024 and result.tokens == result.windows * 511
    assert evaluate(model, tokenizer).context == 512  # the default, llama-perplexity's published -c


def test_the_shipped_text_holds_each_kind_and_says_where_it_comes_from(qwen_tokenizer_dir: Path) -> None:
    text = EVAL_TEXT.read_text(encoding="utf-8")
    assert "```python" in text and "def " in text  # code
    assert re.search(r"^\|-+\|", text, re.MULTILINE)  # a Markdown table
    assert len(re.findall(r"[\u4e00-\u9fff]", text)) > 500  # Chinese
    assert "é" in text and "ß" in text  # French, German
    tokens = len(qwen_mlx.Tokenizer.from_folder(qwen_tokenizer_dir).encode(text))
    assert 7 * 512 <= tokens < 5000  # seven full windows of the default context; minutes on a CPU for a 0.5B
    readme = (EVAL_TEXT.parent / "README.md").read_text(encoding="utf-8")
    assert "written for this project" in readme and "Apache-2.0" in readme
    assert '"eval/*.txt"' in (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()


def test_eval_json_prints_the_figures_of_evaluate(noisy_head: Path, base: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for file, text in zip(files, TEXTS, strict=True):
        file.write_text(text, encoding="utf-8")
    code = cli.main(["eval", "--model", str(noisy_head), "--reference", str(base), "--text", *map(str, files),
                     "--context", str(CONTEXT), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    figures = json.loads(out)
    assert {"perplexity", "reference_perplexity", "kl_mean", "kl_p99", "top1_agreement", "tokens"} <= set(figures)
    expected = evaluate(*qwen_mlx.load(noisy_head), TEXTS, reference=qwen_mlx.load(base), context=CONTEXT)
    assert figures == expected.to_dict()


def test_eval_prints_a_report_without_a_reference(base: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    assert cli.main(["eval", "--model", str(base), "--text", str(tmp_path / "a.txt"), "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"perplexity: [\d.]+ over \d+ tokens \(\d+ windows of 64 tokens, .*\)\n", out)


def one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qwen-mlx: error: ")
    return last


@pytest.mark.parametrize(("args", "phrase"), [
    (["--text", "{tmp}/missing.txt"], "missing.txt: No such file"),
    (["--text", "{tmp}/empty.txt"], "empty.txt: the file is empty"),
    (["--text", "{tmp}/latin1.txt"], "latin1.txt: not UTF-8 text"),
    (["--text", "{tmp}/short.txt"], "fewer than one window of context (--context) 512"),
    (["--context", "1"], "context (--context) 1 must be an integer of at least 3"),
    (["--context", "2"], "context (--context) 2 must be an integer of at least 3"),
    (["--context", "4096"], "context (--context) 4096 is longer than the model's context (2048 positions)"),
    (["--reference", "{other_tokenizer}"], "the reference model (--reference) has another tokenizer"),
], ids=["missing file", "empty file", "not UTF-8", "shorter than a window", "context 1", "context 2",
        "context past the model's", "another tokenizer"])
def test_eval_mistakes_are_one_line_and_exit_2(base: Path, tiny_model_dir: Callable[..., Path], tmp_path: Path,
                                                args: list[str], phrase: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "short.txt").write_text("Only a few words.")
    values = {"tmp": tmp_path, "other_tokenizer": tiny_model_dir("tiny-eval")}
    code = cli.main(["eval", "--model", str(base), *(a.format(**values) for a in args)])
    assert phrase in one_line_error(capsys, code)


@pytest.mark.parametrize(("kwargs", "phrase"), [
    ({"texts": []}, "texts must be a string or a non-empty list"),
    ({"texts": ["fine", 3]}, r"texts\[1\] must be a string, not int"),
    ({"texts": ["fine", ""]}, r"texts\[1\] is empty"),
    ({"reference": "Qwen/Qwen2.5-0.5B"}, r"reference must be \(model, tokenizer\)"),
    ({"context": 2.5}, "context .* 2.5 must be an integer"),
])
def test_bad_arguments_from_python_are_one_line(base: Path, kwargs: dict[str, object], phrase: str) -> None:
    with pytest.raises(QwenMLXError, match=phrase) as error:
        evaluate(*qwen_mlx.load(base), **kwargs)
    assert "\n" not in str(error.value)


def test_evaluate_is_the_packages_api() -> None:
    assert qwen_mlx.evaluate is evaluate and qwen_mlx.EvalResult is EvalResult
