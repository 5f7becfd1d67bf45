"""Models as users manage them: `pull` / `list` / `run` / `rm` against a fake hub on 127.0.0.1 (tests/fake_hub.py)
and the real Hugging Face cache layout it leaves; aliases wherever a model is named; and `rm` never reaching
outside the cache or $QWEN_MLX_HOME/models."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_hub import COMMIT, FakeHub, serve_hub

import qwen_mlx
from qwen_mlx.cli import main as cli
from qwen_mlx.store import catalog
from qwen_mlx.store.names import ALIASES, aliases_of, repo_for_alias

REPO = "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
ALIAS = "qwen2.5:0.5b"


@pytest.fixture(scope="module")
def source(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("hub-tiny", max_position_embeddings=512)


@pytest.fixture
def hub(source: Path) -> Iterator[tuple[FakeHub, str]]:
    fake = FakeHub({REPO: source})
    server, url = serve_hub(fake)
    yield fake, url
    server.shutdown()


@pytest.fixture
def homes(tmp_path: Path) -> dict[str, str]:
    """An empty Hugging Face cache and $QWEN_MLX_HOME, each with a file of the user's beside it."""
    for name in ("hf", "home"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "users-file.txt").write_text("keep me")
    return {"HF_HOME": str(tmp_path / "hf"), "QWEN_MLX_HOME": str(tmp_path / "home"),
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def qwen_mlx_cli(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=180, env={**os.environ, **env})


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def listed(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
           ) -> list[dict[str, object]]:
    """`qwen-mlx list --json` in this process (the cache and home of `env`): a subprocess each time costs seconds."""
    monkeypatch.setenv("QWEN_MLX_HOME", env["QWEN_MLX_HOME"])
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(Path(env["HF_HOME"]) / "hub"))
    capsys.readouterr()
    assert cli.main(["list", "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# --- names ---


def test_the_alias_table() -> None:
    for name in ("qwen2.5", "qwen2.5:latest", "qwen2.5:7b", "QWEN2.5:7B"):
        assert repo_for_alias(name) == "mlx-community/Qwen2.5-7B-Instruct-4bit"
    for size in ("0.5", "1.5", "3", "7", "14", "32", "72"):
        assert ALIASES[f"qwen2.5:{size}b"] == f"mlx-community/Qwen2.5-{size}B-Instruct-4bit"
        assert ALIASES[f"qwen2.5:{size}b-8bit"] == f"mlx-community/Qwen2.5-{size}B-Instruct-8bit"
        assert ALIASES[f"qwen2.5:{size}b-bf16"] == f"mlx-community/Qwen2.5-{size}B-Instruct-bf16"
    assert ALIASES["qwen2.5-coder"] == ALIASES["qwen2.5-coder:7b"] == "mlx-community/Qwen2.5-Coder-7B-Instruct-4bit"
    assert ALIASES["qwen2.5-coder:32b-8bit"] == "mlx-community/Qwen2.5-Coder-32B-Instruct-8bit"
    assert "qwen2.5-coder:3b" not in ALIASES  # not seen on the hub: not guessed
    assert aliases_of(REPO) == [ALIAS]
    assert aliases_of("mlx-community/Qwen2.5-7B-Instruct-4bit") == ["qwen2.5", "qwen2.5:7b", "qwen2.5:latest"]


def test_an_unknown_alias_is_one_line_with_the_close_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--model", "qwen2.5:8b", "--prompt", "hi"]) == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and error.startswith("qwen-mlx: error: 'qwen2.5:8b'") and "qwen2.5:7b" in error


def test_offline_a_model_not_yet_pulled_says_to_pull_it(homes: dict[str, str]) -> None:
    result = qwen_mlx_cli(["run", "qwen2.5:3b", "hi"], {**homes, "HF_HUB_OFFLINE": "1"})
    line = one_line_error(result)
    assert "qwen-mlx pull qwen2.5:3b" in line and "HF_HUB_OFFLINE" in line


# --- pull, list, run, rm ---


def test_pull_list_run_rm_through_the_hugging_face_cache(hub: tuple[FakeHub, str], homes: dict[str, str],
                                                        source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    fake, url = hub
    env = {**homes, "HF_ENDPOINT": url}

    def models() -> list[dict[str, object]]:
        return listed(env, monkeypatch, capsys)

    weights = "model.safetensors"
    # The connection drops 12 MB into the weights and stays down: one line, and the files that did arrive stay.
    fake.cut_file, fake.cut_at, fake.refuse_ranges = weights, 12_000_000, True
    line = one_line_error(qwen_mlx_cli(["pull", ALIAS], env))
    assert REPO in line and f"qwen-mlx pull {ALIAS}" in line
    # Back up: the pull resumes the dropped file with a ranged request and fetches nothing it already has.
    fake.refuse_ranges = False
    fake.requests.clear()
    pulled = qwen_mlx_cli(["pull", ALIAS], env)
    assert pulled.returncode == 0, pulled.stderr
    gets = [(path.rsplit("/", 1)[-1], byte_range) for method, path, byte_range in fake.requests
            if method == "GET" and "/resolve/" in path]
    assert gets[0] == (weights, None) and gets[-1][0] == weights and gets[-1][1].startswith("bytes=")
    assert {name for name, _ in gets} == {weights}
    snapshot = Path(homes["HF_HOME"]) / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    for file in source.iterdir():
        assert hashlib.sha256((snapshot / file.name).read_bytes()).digest() == \
            hashlib.sha256(file.read_bytes()).digest(), file.name

    [row] = models()
    assert row["name"] == REPO and row["aliases"] == [ALIAS] and row["where"] == "huggingface-cache"
    assert row["bits"] == "fp16" and row["context_length"] == 512 and row["last_used"] is None
    assert row["size"] == sum(f.stat().st_size for f in source.iterdir())
    table = qwen_mlx_cli(["list"], env).stdout.splitlines()
    assert table[0].split() == ["NAME", "ALIAS", "SIZE", "BITS", "CONTEXT", "LAST", "USED"]
    assert table[1].split()[:2] == [REPO, ALIAS] and table[1].rstrip().endswith("never")

    # run: offline now, by alias; the reply is the library's own for that folder.
    ran = qwen_mlx_cli(["run", ALIAS, "Say hi", "--max-tokens", "5", "--temp", "0"], {**env, "HF_HUB_OFFLINE": "1"})
    assert ran.returncode == 0, ran.stderr
    model, tokenizer = qwen_mlx.load(source)
    expected = qwen_mlx.generate(model, tokenizer, [{"role": "user", "content": "Say hi"}], max_tokens=5,
                                 temperature=0).text
    assert ran.stdout.strip() == expected.strip()
    assert models()[0]["last_used"] is not None
    # Without a prompt, run is the chat: the same first reply, then /exit.
    chatted = qwen_mlx_cli(["run", ALIAS, "--max-tokens", "5", "--temp", "0"], {**env, "HF_HUB_OFFLINE": "1"},
                           stdin="Say hi\n/exit\n")
    assert chatted.returncode == 0, chatted.stderr
    assert "Chat with the model" in chatted.stderr and expected.strip() in chatted.stdout

    # rm asks; "n" keeps it.
    kept = qwen_mlx_cli(["rm", ALIAS], env, stdin="n\n")
    assert kept.returncode == 1 and "Remove " + REPO in kept.stderr and len(models()) == 1
    removed = qwen_mlx_cli(["rm", "-y", ALIAS], env)
    assert removed.returncode == 0, removed.stderr
    assert models() == [] and not snapshot.exists()
    for name in ("hf", "home"):
        assert (tmp_path / name / "users-file.txt").read_text() == "keep me"
    assert "no such local model" in one_line_error(qwen_mlx_cli(["rm", "-y", ALIAS], env))


def test_pull_of_a_repo_the_hub_does_not_have_is_one_line(hub: tuple[FakeHub, str], homes: dict[str, str]) -> None:
    line = one_line_error(qwen_mlx_cli(["pull", "someone/not-there"], {**homes, "HF_ENDPOINT": hub[1]}))
    assert "someone/not-there" in line and "no such model" in line


def test_models_under_qwen_mlx_home_are_listed_run_by_name_and_removed_only_there(
        source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    models = home / "models"
    models.mkdir(parents=True)
    (models / "mine").mkdir()
    for file in source.iterdir():
        (models / "mine" / file.name).write_bytes(file.read_bytes())
    elsewhere = tmp_path / "users-own-models" / "linked"
    elsewhere.mkdir(parents=True)
    for file in source.iterdir():
        (elsewhere / file.name).symlink_to(file)
    (models / "linked").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.setenv("QWEN_MLX_HOME", str(home))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "no-cache"))

    assert [m.name for m in catalog.local_models()] == ["linked", "mine"]
    model, _ = qwen_mlx.load("mine")  # by name, as `list` shows it
    assert model.config.context_length == 512
    assert cli.main(["rm", "-y", "linked", "mine"]) == 0
    capsys.readouterr()
    assert catalog.local_models() == []
    # The link went; the folder it pointed to, the user's, is whole.
    assert not (models / "linked").exists() and sorted(p.name for p in elsewhere.iterdir()) == \
        sorted(p.name for p in source.iterdir())
    assert all(f.exists() for f in source.iterdir())


def copy_model(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def test_a_folder_named_like_an_alias_is_that_name_for_every_command(
        source: Path, tiny_model_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One resolution order everywhere (the README's models section): a folder under $QWEN_MLX_HOME/models named
    `qwen2.5:0.5b` is what run, serve and rm take for that name, not the cached repo the alias stands for; the repo
    is still there by its id."""
    from qwen_mlx.engine.setup import EngineSettings, model_source
    from qwen_mlx.store.load import resolve_model_path

    mine = copy_model(tiny_model_dir("home-tiny", max_position_embeddings=256), tmp_path / "home" / "models" / ALIAS)
    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = copy_model(source, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("QWEN_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))

    assert resolve_model_path(ALIAS) == mine  # run, load()
    assert catalog.find_local(ALIAS).folder == mine  # a server's requests, rm
    served = model_source(EngineSettings(model=ALIAS))  # serve --model
    assert served.folder == mine and REPO not in served.aliases
    assert catalog.find_local(REPO).folder == snapshot
    assert cli.main(["rm", "-y", ALIAS]) == 0
    capsys.readouterr()
    assert [m.name for m in catalog.local_models()] == [REPO]
    assert resolve_model_path(ALIAS) == snapshot  # with the folder gone, the alias is the repo's again


def test_list_spells_out_what_a_terminal_would_act_on(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A folder name or config value with escape sequences (retitle the window, clear the screen, recolour) or a
    line break is shown, never acted on."""
    name = "evil\x1b]0;pwned\x07\x1b[31mred\nline"
    folder = tmp_path / "home" / "models" / name
    folder.mkdir(parents=True)
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "\x1b[2J"}))
    monkeypatch.setenv("QWEN_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "no-cache"))
    capsys.readouterr()
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07")
    header, row = out.splitlines()
    assert row.startswith("evil\\x1b]0;pwned\\x07\\x1b[31mred\\nline  ") and "\\x1b[2J" in row


def test_rm_spells_out_what_a_terminal_would_act_on(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """rm's question, its answers and its errors show a name's escape sequences and line breaks as list does."""
    name = "evil\x1b]0;pwned\x07\x1b[31mred\nline"
    shown = "evil\\x1b]0;pwned\\x07\\x1b[31mred\\nline"
    copy_model(source, tmp_path / "home" / "models" / name)
    monkeypatch.setenv("QWEN_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    capsys.readouterr()
    assert cli.main(["rm", name]) == 1  # asked, and kept
    assert cli.main(["rm", "-y", name]) == 0
    assert cli.main(["rm", "-y", name]) == 2  # no longer there
    err = capsys.readouterr().err
    assert not any(c in err for c in "\x1b\x07")
    # "Remove …? [y/N] kept …" (the answer is not echoed), "removed …", "… no such local model"
    assert [line.count(shown) for line in err.splitlines()] == [2, 1, 1]
