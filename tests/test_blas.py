"""qwen_mlx/blas.py: on Linux, importing qwen_mlx puts OpenBLAS under MLX's float matmuls, MLX really calls it, and
its results agree with MLX's bundled reference BLAS within float32 rounding, matmul by matmul and for a model's
logits. Each BLAS runs in a fresh process: which one MLX binds is fixed when mlx.core is first imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qwen_mlx.blas import ENV, INSTALL_HINT, REFERENCE

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX uses Accelerate on macOS")

# Decode, prefill and attention shapes of Qwen2.5-0.5B, plus odd sizes that no kernel tiles evenly.
SHAPES = ((64, 896, 4864), (1, 896, 4864), (64, 4864, 896), (512, 896, 128), (33, 129, 257))

# Run in a fresh interpreter: matmuls and a tiny model's logits, then what blas.py reports, as JSON on stdout.
# Its last step computes the first shape again through OpenBLAS's own cblas_sgemm (argv[3], loaded locally), row-major
# and untransposed as MLX calls it: bit-identical to MLX's result exactly when MLX runs on that library.
PROBE = """
import ctypes, json, sys
from dataclasses import asdict
import qwen_mlx  # first, as a user of the library imports it
import mlx.core as mx
import numpy as np
from qwen_mlx.blas import global_sgemm, in_use

rng = np.random.default_rng(0)
results, first = {}, None
for m, k, n in json.loads(sys.argv[2]):
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    results[f"{m}x{k}x{n}"] = np.array(mx.array(a) @ mx.array(b))
    first = first or (a, b)
model, _ = qwen_mlx.load(sys.argv[4])
model.set_dtype(mx.float32)  # half-precision matmuls do not all reach cblas_sgemm
results["logits"] = np.array(model(mx.array([[151644, 872, 198, 9707, 11, 1879, 0]]))[0])
np.savez(sys.argv[1], **results)

a, b = first
c = np.zeros((a.shape[0], b.shape[1]), np.float32)
ptr = ctypes.POINTER(ctypes.c_float)
sgemm = ctypes.CDLL(sys.argv[3]).cblas_sgemm  # 101, 111: CblasRowMajor, CblasNoTrans
sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ptr, ctypes.c_int, ptr, ctypes.c_int, ctypes.c_float, ptr,
                                       ctypes.c_int]
sgemm(101, 111, 111, a.shape[0], b.shape[1], a.shape[1], 1.0, a.ctypes.data_as(ptr), a.shape[1],
      b.ctypes.data_as(ptr), b.shape[1], 0.0, c.ctypes.data_as(ptr), b.shape[1])
same = np.array_equal(next(iter(results.values())), c)
print(json.dumps({**asdict(in_use()), "global": global_sgemm(), "same_as_openblas": bool(same)}))
"""
# What blas.py reports in a fresh interpreter, as JSON.
ASK = "import json, dataclasses, qwen_mlx.blas as b; print(json.dumps(dataclasses.asdict(b.in_use())))"


def python(code: str, *args: str, blas: str | None = None) -> dict[str, Any]:
    """Run `code` in a fresh interpreter with QWEN_MLX_BLAS set to `blas` (unset for None); its JSON line."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if blas is not None:
        env[ENV] = blas
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default() -> dict[str, Any]:
    """What a plain `import qwen_mlx` loads; skips the module's OpenBLAS tests where the machine has none."""
    found = python(ASK)
    if found["note"] == INSTALL_HINT:
        pytest.skip("no optimized BLAS on this machine (Debian/Ubuntu: apt install libopenblas0-pthread; CI does)")
    return found


@pytest.fixture(scope="module")
def probe(default: dict[str, Any], tiny_model_dir: Callable[..., Path],
          tmp_path_factory: pytest.TempPathFactory) -> Callable[[str | None], tuple[dict[str, Any], Any]]:
    """`probe(blas)`: PROBE's report and results under QWEN_MLX_BLAS=`blas`, each run once per module."""
    folder, model = tmp_path_factory.mktemp("blas"), tiny_model_dir("blas")
    runs: dict[str | None, tuple[dict[str, Any], Any]] = {}

    def run(blas: str | None) -> tuple[dict[str, Any], Any]:
        if blas not in runs:
            out = folder / f"{blas or 'default'}.npz"
            report = python(PROBE, str(out), json.dumps(SHAPES), default["path"], str(model), blas=blas)
            runs[blas] = report, np.load(out)
        return runs[blas]

    return run


def test_importing_qwen_mlx_loads_openblas_before_mlx(default: dict[str, Any]) -> None:
    assert default["name"].startswith("OpenBLAS "), default
    assert default["in_time"] and not default["note"] and Path(default["path"]).is_file()


def test_mlx_matmuls_run_on_openblas_unless_reference_is_asked_for(probe: Callable[..., Any]) -> None:
    report, _ = probe(None)
    assert report["name"].startswith("OpenBLAS ") and report["global"] == report["path"]
    assert report["same_as_openblas"], "MLX's matmul is not OpenBLAS's: libmlx bound another cblas_sgemm"
    reference, _ = probe("reference")
    assert reference["name"] == REFERENCE and reference["note"] == f"{ENV}=reference"
    assert "mlx_cpu.libs" in reference["path"] and reference["global"] is None  # nothing loaded globally
    assert not reference["same_as_openblas"]


def test_matmuls_agree_with_the_reference_blas_within_float32_rounding(probe: Callable[..., Any]) -> None:
    (_, fast), (_, reference) = probe(None), probe("reference")
    for m, k, n in SHAPES:
        name = f"{m}x{k}x{n}"
        # Sums of k products of unit normals: rounding grows like sqrt(k) * eps * |terms|.
        np.testing.assert_allclose(fast[name], reference[name], rtol=0, atol=2e-6 * k, err_msg=name)
    assert any(not np.array_equal(fast[f"{m}x{k}x{n}"], reference[f"{m}x{k}x{n}"]) for m, k, n in SHAPES)


def test_model_logits_agree_with_the_reference_blas(probe: Callable[..., Any]) -> None:
    (_, fast), (_, reference) = probe(None), probe("reference")
    scale = np.abs(reference["logits"]).max()
    np.testing.assert_allclose(fast["logits"], reference["logits"], rtol=0, atol=1e-5 * scale)
    assert (fast["logits"].argmax(-1) == reference["logits"].argmax(-1)).all()


def test_mlx_imported_first_is_reported_as_too_late() -> None:
    late = python("import mlx.core\n" + ASK)
    assert late["name"] == REFERENCE and not late["in_time"] and "import qwen_mlx first" in late["note"]
