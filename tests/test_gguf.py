"""GGUF import (`qwen-mlx convert --gguf`): tiny GGUF files written here with gguf's own writer, their tensors
quantized by gguf (or, for the K-quants it cannot quantize, raw blocks built in numpy), then converted and run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from tokenizers import Tokenizer

import qwen_mlx
from qwen_mlx.cli.main import main
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.store.conversion import convert, convert_gguf
from qwen_mlx.store.gguf import LAYER_NAMES, open_gguf
from qwen_mlx.store.gguf_quants import EXACT_BITS, GROUP_SIZE, REQUANTIZED_BITS, pack, to_affine
from qwen_mlx.store.gguf_tokenizer import build_tokenizer
from qwen_mlx.store.ollama import resolve_ollama
from qwen_mlx.text.tokenizer import BYTE_ENCODER

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2  # K-quants need rows of 256 inputs
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Byte tokens, merged tokens, control tokens, one user-defined token, then unused slots up to the embedding's rows:
# the shape llama.cpp gives Qwen2's vocabulary.
TOKENS = [BYTE_ENCODER[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + CONTROL + ["<tool_call>"]
TOKEN_TYPES = [1] * (256 + len(MERGES)) + [3] * len(CONTROL) + [4]
VOCAB = len(TOKENS) + 3
TOKENS += [f"[PAD{i}]" for i in range(len(TOKENS), VOCAB)]
TOKEN_TYPES += [5] * (VOCAB - len(TOKEN_TYPES))
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Byte offsets of the float16 super-block scales in a block of each type built by hand (ggml-common.h).
F16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.IQ4_NL: (0,)}


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw blocks of `qtype` (rows × bytes per row): random integers and sub-block scales, sane super-block ones."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = rng.uniform(2e-4, 1e-3, (len(raw), 1)).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8)
    return raw.reshape(rows, -1)


def gguf_tensor(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, cols) weight as GGUF stores it: float, quantized by gguf, or random K-quant blocks."""
    if qtype in F16_FIELDS:
        return random_blocks(qtype, rows, cols, rng)
    values = rng.normal(0, 0.05, (rows, cols)).astype(np.float32)
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)


# The tiny model's tensors and their types: every exact type, the K-quants, float layers among quantized ones.
LAYER_TYPES = [
    {"attn_q": Q.Q5_0, "attn_k": Q.Q5_1, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1,
     "ffn_gate": Q.Q4_K, "ffn_up": Q.Q5_K, "ffn_down": Q.Q6_K},
    {"attn_q": Q.Q4_0, "attn_k": Q.F16, "attn_v": Q.Q8_0, "attn_output": Q.F32,
     "ffn_gate": Q.Q2_K, "ffn_up": Q.Q3_K, "ffn_down": Q.Q4_K},
]


def write_tiny_gguf(path: Path, tied: bool = False, architecture: str = "qwen2", vocab: int = VOCAB,
                    seed: int = 0) -> Path:
    """A two-layer Qwen2 GGUF as llama.cpp writes one (metadata keys, tensor names, token list)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, architecture)
    for add, value in ((writer.add_block_count, LAYERS), (writer.add_context_length, 4096),
                       (writer.add_embedding_length, HIDDEN), (writer.add_feed_forward_length, INTERMEDIATE),
                       (writer.add_head_count, HEADS), (writer.add_head_count_kv, KV_HEADS),
                       (writer.add_rope_freq_base, 1_000_000.0), (writer.add_layer_norm_rms_eps, 1e-6)):
        add(value)
    write_tokenizer_metadata(writer, TOKENS, TOKEN_TYPES, MERGES)
    tensors = {"token_embd.weight": (Q.Q4_0, vocab, HIDDEN), "output_norm.weight": (Q.F32, 1, HIDDEN)}
    if not tied:
        tensors["output.weight"] = (Q.Q8_0, vocab, HIDDEN)
    kv = HIDDEN // HEADS * KV_HEADS
    for i, types in enumerate(LAYER_TYPES):
        shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
                  "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTERMEDIATE, HIDDEN),
                  "ffn_up": (INTERMEDIATE, HIDDEN), "ffn_down": (HIDDEN, INTERMEDIATE)}
        tensors.update({f"blk.{i}.{name}.weight": (types[name], *shape) for name, shape in shapes.items()})
        tensors.update({f"blk.{i}.attn_{p}.bias": (Q.F32, 1, n) for p, n in (("q", HIDDEN), ("k", kv), ("v", kv))})
        tensors.update({f"blk.{i}.{n}.weight": (Q.F32, 1, HIDDEN) for n in ("attn_norm", "ffn_norm")})
    for name, (qtype, rows, cols) in tensors.items():
        data = gguf_tensor(qtype, rows, cols, rng)
        if name.endswith("norm.weight"):
            data = 1 + data
        writer.add_tensor(name, data.reshape(-1) if rows == 1 else data,
                          raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tokenizer_metadata(writer: gguf.GGUFWriter, tokens: list[str], types: list[int], merges: list[str]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf")


@pytest.fixture(scope="module")
def imported(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF converted with its quantization kept, in small shards."""
    out = tmp_path_factory.mktemp("imported") / "tiny"
    convert(tiny_gguf, out, max_shard_bytes=200_000)
    return out


@pytest.fixture(scope="module")
def imported_float(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "tiny-float"
    convert(tiny_gguf, out, dequantize=True)
    return out


# --- the quantization layouts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_the_one_mx_dequantize_reads(bits: int) -> None:
    q = np.random.default_rng(bits).integers(0, 2**bits, (3, 256)).astype(np.uint8)
    ones, zeros = mx.ones((3, 256 // GROUP_SIZE)), mx.zeros((3, 256 // GROUP_SIZE))
    unpacked = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=GROUP_SIZE, bits=bits)
    assert np.array_equal(np.array(unpacked), q)


def float16_rounding_bound(affine: Any) -> np.ndarray:
    """How far a weight may move when its group's scale and bias are rounded to float16 (half an ulp each,
    the scale's times the largest integer)."""
    scales = np.abs(np.array(affine.scales.astype(mx.float32)))
    biases = np.abs(np.array(affine.biases.astype(mx.float32)))
    bound = (scales * (2**affine.bits - 1) + biases) * 2.0**-11
    return np.repeat(bound, GROUP_SIZE, axis=1)


@pytest.mark.parametrize("qtype", list(EXACT_BITS), ids=lambda q: q.name)
def test_types_with_an_mlx_layout_keep_every_weight(qtype: Q) -> None:
    rows, cols = 8, 512
    raw = gguf_tensor(qtype, rows, cols, np.random.default_rng(1))
    affine = to_affine(raw, qtype, rows, cols)
    ours = mx.dequantize(affine.weight, affine.scales.astype(mx.float32), affine.biases.astype(mx.float32),
                         group_size=GROUP_SIZE, bits=affine.bits)
    reference = gguf.quants.dequantize(raw, qtype)
    error = np.abs(np.array(ours) - reference)
    assert affine.bits == EXACT_BITS[qtype]
    if qtype in (Q.Q4_K, Q.Q5_K):  # d·sc and dmin·m are products: float16 rounds them
        assert (error <= float16_rounding_bound(affine)).all()
    else:  # the scale is GGUF's own float16 d, the bias a power-of-two multiple of it (or its float16 m)
        assert error.max() == 0
    assert affine.max_error == pytest.approx(error.max())


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.IQ4_NL], ids=lambda q: q.name)
def test_types_without_an_mlx_layout_are_requantized_with_more_bits(qtype: Q) -> None:
    rows, cols = 8, 512
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(2))
    affine = to_affine(raw, qtype, rows, cols)
    ours = mx.dequantize(affine.weight, affine.scales.astype(mx.float32), affine.biases.astype(mx.float32),
                         group_size=GROUP_SIZE, bits=affine.bits)
    error = np.abs(np.array(ours) - gguf.quants.dequantize(raw, qtype))
    half_step = np.repeat(np.abs(np.array(affine.scales.astype(mx.float32))) / 2, GROUP_SIZE, axis=1)
    assert affine.bits == REQUANTIZED_BITS[qtype]
    assert (error <= half_step + float16_rounding_bound(affine)).all()
    assert affine.max_error == pytest.approx(error.max())


# --- the converted folder --------------------------------------------------------------------------------------

def test_import_keeps_the_file_quantization_per_layer(imported: Path) -> None:
    config = json.loads((imported / "config.json").read_text())
    block = config["quantization"]
    assert block == config["quantization_config"]
    assert (block["group_size"], block["mode"]) == (GROUP_SIZE, "affine")
    expected = {"model.embed_tokens": 4, "lm_head": 8}
    for i, types in enumerate(LAYER_TYPES):
        for name, qtype in types.items():
            if qtype not in (Q.F16, Q.F32):
                expected[f"model.layers.{i}.{LAYER_NAMES[name]}"] = EXACT_BITS.get(qtype) or REQUANTIZED_BITS[qtype]
    recorded = {layer: block[layer]["bits"] if layer in block else block["bits"] for layer in expected}
    assert recorded == expected
    shards = sorted(imported.glob("model-*.safetensors"))
    assert len(shards) > 1  # streamed into several shards
    weights = {name: array for shard in shards for name, array in mx.load(str(shard)).items()}
    assert weights["model.layers.0.mlp.down_proj.scales"].dtype == mx.float16
    assert weights["model.layers.1.self_attn.k_proj.weight"].dtype == mx.float16  # F16 stays float16
    assert weights["model.norm.weight"].dtype == mx.float32


def test_quantized_import_runs_like_its_float_import_in_qwen_mlx_and_mlx_lm(imported: Path,
                                                                            imported_float: Path) -> None:
    ids = mx.array([[1, 2, 3, 256, 257, 262, 40, 50, 60]])
    model, tokenizer = qwen_mlx.load(imported)
    reference, _ = qwen_mlx.load(imported_float)
    ours = model(ids).astype(mx.float32)
    exact = reference(ids).astype(mx.float32)
    scale = float(mx.abs(exact).max())
    # The float16 scales and the requantized Q6_K/Q2_K/Q3_K layers move the logits a little, not the argmax
    assert float(mx.abs(ours - exact).max()) < 0.05 * scale
    assert mx.array_equal(ours.argmax(-1), exact.argmax(-1))
    lm_model, lm_tokenizer = mlx_lm.load(str(imported))
    assert float(mx.abs(lm_model(ids).astype(mx.float32) - ours).max()) < 1e-3 * scale
    assert tokenizer.eos_token_ids == [TOKENS.index("<|im_end|>"), TOKENS.index("<|endoftext|>")]
    text = "the cat in a hat<|im_end|>"
    assert lm_tokenizer.encode(text) == tokenizer.encode(text, allow_special=True)


def test_float_import_matches_transformers_gguf_loader(tiny_gguf: Path, imported_float: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = [1, 2, 3, 256, 257, 262, 40, 50, 60]
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                     dtype=torch.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
        greedy = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                    eos_token_id=None)[0, len(ids):].tolist()
    model, tokenizer = qwen_mlx.load(imported_float)
    logits = np.array(model(mx.array([ids]))[0])
    assert np.abs(logits - expected).max() < 1e-4
    sequence = list(ids)
    for _ in range(8):  # greedy, whole sequence each step: the plainest loop there is
        sequence.append(int(model(mx.array([sequence]))[0, -1].argmax().item()))
    assert sequence[len(ids):] == greedy


def test_no_output_tensor_means_tied_embeddings(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    convert(path, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    model, _ = qwen_mlx.load(tmp_path / "out")
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, VOCAB)


def test_dtype_gives_a_float_folder_and_q_requantizes(tiny_gguf: Path, tmp_path: Path) -> None:
    summary = convert(tiny_gguf, tmp_path / "bf16", dtype="bfloat16")
    assert summary.quantization is None
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization" not in config
    weights = mx.load(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}

    summary = convert(tiny_gguf, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=64, q_keep="lm_head=8")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (4, 64)
    assert config["quantization"]["lm_head"]["bits"] == 8
    assert summary.source_bytes == tiny_gguf.stat().st_size
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the float stage is gone
    model, _ = mlx_lm.load(str(tmp_path / "q4"))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, VOCAB)


def test_summary_says_what_each_gguf_type_became(tiny_gguf: Path, tmp_path: Path) -> None:
    text = str(convert(tiny_gguf, tmp_path / "out"))
    assert "kept exactly: Q4_0 as 4-bit, Q4_1 as 4-bit, Q4_K as 4-bit, Q5_0 as 5-bit" in text
    for kind, bits in (("Q2_K", 4), ("Q3_K", 5), ("Q6_K", 8)):
        assert f"{kind} has no MLX layout: requantized to {bits}-bit, groups of 32 (largest change of a weight" in text


def test_cli_converts_a_gguf(tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--gguf", str(tiny_gguf), "-o", str(tmp_path / "out")]) == 0
    assert "Wrote" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer.json").exists()


# --- the tokenizer -----------------------------------------------------------------------------------------------

def test_tokenizer_from_qwen_vocabulary_gives_the_real_qwen_ids(qwen_tokenizer_dir: Path, tmp_path: Path) -> None:
    """A GGUF carrying Qwen2.5's vocabulary as llama.cpp writes it (added tokens looking like <|...|> are control
    tokens, the vocabulary padded to the embedding's 151,936 rows) gives the real tokenizer's ids."""
    real = Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    spec = json.loads((qwen_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    types = [1] * len(tokens)
    for added in sorted(spec["added_tokens"], key=lambda t: t["id"]):
        tokens.append(added["content"])
        looks_special = added["content"].startswith("<|") and added["content"].endswith("|>")
        types.append(3 if added["special"] or looks_special else 4)
    types += [5] * (151936 - len(tokens))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), 151936)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "qwen2")
    write_tokenizer_metadata(writer, tokens, types, merges)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = build_tokenizer(open_gguf(tmp_path / "vocab.gguf"), tmp_path / "vocab.gguf")
    text = ("<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHello, 世界! Привет, мир. こんにちは 🌍🚀 "
            "مرحبا שלום नमस्ते 안녕하세요 Ελληνικά Crème brûlée e\u0301 ﬁ ½ ٣٤٥ 𝔘𝔫𝔦 I'm DON'T 1,000.5e-3\n\n\n   \t"
            "<tool_call>{\"a\": 1}</tool_call><|fim_prefix|>def f():<|fim_suffix|><|fim_middle|><|im_end|>")
    assert ours.encode(text).ids == real.encode(text).ids
    assert ours.get_vocab_size() == real.get_vocab_size() == 151665


# --- Ollama's store ----------------------------------------------------------------------------------------------

def fake_ollama_store(root: Path, gguf_file: Path, name: str = "tiny", tag: str = "1b") -> Path:
    """A store as Ollama lays one out: the manifest names the blob that holds the GGUF."""
    digest = "0" * 63 + "1"
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(gguf_file.read_bytes())
    (root / "blobs" / f"sha256-{'2' * 64}").write_text("{{ .Prompt }}")
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1},
        {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{'2' * 64}", "size": 1},
    ]}))
    return root


def test_ollama_name_resolves_to_the_model_blob(tiny_gguf: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = fake_ollama_store(tmp_path / "models", tiny_gguf)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert resolve_ollama("ollama:tiny:1b") == store / "blobs" / f"sha256-{'0' * 63}1"
    convert_gguf("ollama:tiny:1b", tmp_path / "out")
    model, _ = qwen_mlx.load(tmp_path / "out")
    assert model(mx.array([[1, 2]])).shape == (1, 2, VOCAB)


# --- bad input: one line, nothing written ---------------------------------------------------------------------------

def corrupt(tiny_gguf: Path, path: Path, how: str) -> str:
    """Write a broken GGUF at `path` (or set up a bad Ollama name); the source to convert."""
    data = tiny_gguf.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif how == "not gguf":
        path.write_bytes(b"<html>404 Not Found</html>" * 10)
    elif how == "llama":
        write_tiny_gguf(path, architecture="llama")
    elif how == "unknown type":
        reader = gguf.GGUFReader(tiny_gguf)
        # the first tensor's type id sits in its info record just before its 8-byte data offset
        type_at = reader.tensors[0].field.offset + sum(p.nbytes for p in reader.tensors[0].field.parts[:-2])
        path.write_bytes(data[:type_at] + np.uint32(250).tobytes() + data[type_at + 4:])
    elif how == "vocabulary":
        write_tiny_gguf(path, vocab=VOCAB + 32)
    elif how == "never pulled":
        return "ollama:qwen2.5:7b"
    elif how == "escape":
        return "ollama:../../etc:passwd"
    return str(path)


@pytest.mark.parametrize("how, message", [
    ("truncated", "re-download"), ("not gguf", "not a readable GGUF file"), ("llama", "'llama' model"),
    ("unknown type", "not a readable GGUF file"), ("vocabulary", "the embedding has"),
    ("never pulled", "ollama pull qwen2.5:7b"), ("escape", "not an Ollama model name"),
])
def test_bad_gguf_is_one_line_and_writes_nothing(how: str, message: str, tiny_gguf: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    (tmp_path / "in").mkdir()
    source = corrupt(tiny_gguf, tmp_path / "in" / "model.gguf", how)
    with pytest.raises(QwenMLXError, match=message):
        convert_gguf(source, tmp_path / "out")
    assert main(["convert", "--gguf", source, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output folder, no staging left behind
