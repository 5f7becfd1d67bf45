"""An optimized BLAS under MLX's CPU build on Linux, loaded before MLX is.

MLX's Linux wheel (`mlx[cpu]`) links the reference (netlib) BLAS that it bundles, so every float matmul MLX runs on
the CPU goes through the textbook loops: 64x896 by 896x4864 in float32 takes about 100 ms there and 2.7 ms with
Debian's OpenBLAS 0.3.21 on this project's 2-core machine. Quantized matmuls do not use BLAS; attention, float
weights and any dequantize-then-matmul path do.

libmlx.so takes `cblas_sgemm` from the first library that defines it in the dynamic linker's order: the global scope
first, then its own dependencies. A BLAS loaded with RTLD_GLOBAL before mlx.core is imported is therefore the one MLX
calls; loaded after, it changes nothing (Python loads extensions with RTLD_NOW, which binds every symbol at import).
That is why this module imports nothing else of qwen_mlx, and why qwen_mlx/__init__.py imports it first.

    QWEN_MLX_BLAS=/path/to/libopenblas.so.0   load that library instead of searching for one
    QWEN_MLX_BLAS=reference                   keep MLX's bundled reference BLAS

OPENBLAS_NUM_THREADS is OpenBLAS's own: by default it uses every core. On macOS MLX uses Accelerate and nothing here
applies.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ENV = "QWEN_MLX_BLAS"
# Searched by soname, so the dynamic linker's own search applies (ld.so.cache, LD_LIBRARY_PATH): Debian's and
# Ubuntu's libopenblas0-pthread (through the alternatives link) and Fedora's openblas, then Fedora's openblas-threads
# and openblas-openmp builds. A pip wheel's OpenBLAS (scipy-openblas32/64, numpy's own) cannot serve: its symbols are
# prefixed (scipy_cblas_sgemm), so MLX would still call the reference BLAS.
CANDIDATES = ("libopenblas.so.0", "libopenblasp.so.0", "libopenblaso.so.0")
REFERENCE = "reference BLAS bundled with MLX"
INSTALL_HINT = "no OpenBLAS found: `apt install libopenblas0-pthread` (Debian, Ubuntu) or `dnf install openblas`"


@dataclass(frozen=True)
class Blas:
    """The BLAS MLX's float matmuls run on: its name (for OpenBLAS with version, kernels and threads), the file
    `cblas_sgemm` comes from, whether it was loaded before mlx.core (`in_time`), and why it is not an optimized
    one (`note`)."""

    name: str
    path: str | None
    in_time: bool = True
    note: str = ""

    @property
    def optimized(self) -> bool:
        """Whether float matmuls run on an optimized BLAS (not the reference one, ~40x slower)."""
        return self.name != REFERENCE

    def describe(self) -> str:
        """One line for `qwen-mlx info` and `bench`."""
        where = f" ({self.path})" if self.path else ""
        return self.name + where + (f"; {self.note}" if self.note else "")


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def global_sgemm() -> str | None:
    """The file whose `cblas_sgemm` the global scope resolves to (dlsym + dladdr): the one a library loaded after
    now would bind. None when no global library defines it (MLX's bundled BLAS is loaded locally)."""
    libc = ctypes.CDLL(None)
    libc.dlsym.restype = ctypes.c_void_p
    libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    address = libc.dlsym(None, b"cblas_sgemm")  # None is RTLD_DEFAULT
    info = _DlInfo()
    if not address or not libc.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _openblas_name(lib: ctypes.CDLL) -> str | None:
    """"OpenBLAS 0.3.21 (SkylakeX kernels, 2 threads)", or None when `lib` is not OpenBLAS."""
    try:
        config, core, threads = lib.openblas_get_config, lib.openblas_get_corename, lib.openblas_get_num_threads
    except AttributeError:
        return None
    config.restype = core.restype = ctypes.c_char_p
    words = (config() or b"OpenBLAS").decode().split()
    count = threads()
    return f"{' '.join(words[:2])} ({(core() or b'?').decode()} kernels, {count} thread{'s' * (count != 1)})"


def bundled_reference() -> str | None:
    """The reference BLAS inside MLX's Linux wheel (mlx_cpu.libs/libblas-*.so*), found without importing MLX."""
    spec = importlib.util.find_spec("mlx")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted((Path(location).parent / "mlx_cpu.libs").glob("libblas*.so*")):
            return str(path)
    return None


def mlx_loaded() -> bool:
    """Whether libmlx is already in this process: its symbols are bound then, and a BLAS loaded now comes too late."""
    if "mlx.core" in sys.modules:
        return True
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return any("libmlx" in line for line in maps)
    except OSError:
        return False


def _load_global(path: str) -> Blas | None:
    """Load `path` with RTLD_GLOBAL and describe what then serves `cblas_sgemm`; None when it cannot be loaded or
    defines no unprefixed `cblas_sgemm`."""
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        lib.cblas_sgemm  # noqa: B018 (a prefixed build, scipy_cblas_sgemm, raises here)
    except (OSError, AttributeError):
        return None
    # Normally `lib` itself; a BLAS something else loaded globally before qwen_mlx would come first, and MLX uses that.
    provider = global_sgemm() or path
    name = _openblas_name(ctypes.CDLL(provider)) or Path(provider).name
    return Blas(name, provider)


def load() -> Blas:
    """Find and load an optimized BLAS for MLX (see the module's docstring); what MLX ends up using."""
    if sys.platform == "darwin":
        return Blas("Accelerate", None)
    if not sys.platform.startswith("linux"):
        return Blas("MLX's own BLAS", None)
    choice = os.environ.get(ENV, "").strip()
    if choice == "reference":
        return Blas(REFERENCE, bundled_reference(), note=f"{ENV}=reference")
    if mlx_loaded():
        return Blas(REFERENCE, bundled_reference(), in_time=False,
                    note="mlx.core was imported before qwen_mlx, too late to load an optimized BLAS: import qwen_mlx "
                         "first")
    if choice:
        return _load_global(choice) or Blas(REFERENCE, bundled_reference(), note=(
            f"{ENV}={choice} cannot be loaded or has no cblas_sgemm (a prefixed build such as scipy-openblas "
            "cannot serve MLX)"))
    for candidate in CANDIDATES:
        found = _load_global(candidate)
        if found:
            return found
    return Blas(REFERENCE, bundled_reference(), note=INSTALL_HINT)


# Once per process, at the first import of qwen_mlx: it must happen before mlx.core is imported, and a second
# search could not change what MLX has already bound.
_IN_USE = load()


def in_use() -> Blas:
    """The BLAS MLX's float matmuls run on in this process (decided when qwen_mlx was first imported)."""
    return _IN_USE


def set_threads(count: int) -> bool:
    """Run OpenBLAS's matmuls on `count` threads from now on (openblas_set_num_threads); False where MLX's BLAS is
    not OpenBLAS. Float matmuls split across streams, one per core, want 1: more would oversubscribe the cores."""
    path = in_use().path
    if path is None:
        return False
    try:
        setter = ctypes.CDLL(path).openblas_set_num_threads
    except (OSError, AttributeError):
        return False
    setter.argtypes = [ctypes.c_int]
    setter(count)
    return True
