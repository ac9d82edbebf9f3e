"""Compile the C++ kernels at first use, cache the library, load it with ctypes.

Why not a torch C++ extension: including torch's headers makes one compile take about a minute
on two cores and ties the build to one torch version. The kernels only need raw pointers, so
they are plain C++ (AVX2/FMA intrinsics, AVX-512 ones where -march=native has them, OpenMP),
compiled in a few seconds with the system compiler and called through ctypes; pip installs
nothing that could pull another torch.

The library is cached under ``$SPARSECRAFT_CACHE/kernels`` (default ``~/.cache/sparsecraft``)
by a hash of the source, the flags, the compiler and the CPU, written to a temporary name and
renamed, so concurrent first uses and interrupted builds never leave a broken library. When no
compiler is found, the CPU lacks AVX2/FMA/F16C, or the build fails, ``library()`` returns None
after one warning and callers use plain PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("sparse_kernels.cpp", "activation_kernels.cpp")]
#: Included by the sources: part of the cache key.
HEADERS = [CSRC / "plan.h"]
ABI_VERSION = 8
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno"]
#: Extra compiler flags, e.g. "-mno-avx512f" to build (and test) the AVX2 kernels on an AVX-512 machine.
EXTRA_FLAGS_ENV = "SPARSECRAFT_KERNEL_FLAGS"


def _flags() -> list[str]:
    return FLAGS + os.environ.get(EXTRA_FLAGS_ENV, "").split()

_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
#: Every product ends with xt, y, bias, out, in, tp, tokens, tile, threads (see sparse_kernels.cpp).
_TAIL = [_p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i32]
SIGNATURES = {
    "sc_csr16": [_p, _p, _p, _i32, *_TAIL],
    "sc_bitmask": [_p, _p, _i64, _p, _i32, *_TAIL],
    "sc_nm_half": [_p, _p, _i64, _p, _i32, *_TAIL],
    "sc_block": [_p, _p, _p, _i32, _i32, _i32, *_TAIL],
    "sc_panels": [_p, _p, _p, _p, _i32, _i64, _i64, *_TAIL],
}


class OneTokenPlan(ctypes.Structure):
    """ScPlan in sparse_kernels.cpp: one layer's arrays and sizes for sc_run_one (one token, four arguments)."""

    _fields_ = [("kind", ctypes.c_int32), ("vdtype", ctypes.c_int32), ("out", _i64), ("in_", _i64), ("nnz", _i64),
                ("min_work", _i64), ("row_bytes", _i64), ("a", _p), ("b", _p), ("c", _p), ("values", _p),
                ("bh", ctypes.c_int32), ("bw", ctypes.c_int32)]


def cache_dir() -> Path:
    root = os.environ.get("SPARSECRAFT_CACHE") or Path.home() / ".cache" / "sparsecraft"
    return Path(root) / "kernels"


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor()


def compile_library(compiler: str, target: Path, sources: list[Path] = SOURCES, flags: list[str] | None = None,
                    link: list[str] = ()) -> None:
    """Compiles sources into the shared library target (atomically: a temporary name, then a rename);
    link: libraries, after the sources (linkers drop a library named before the code that needs it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *(_flags() if flags is None else flags), *map(str, sources), *link, "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "compiler failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path) -> ctypes.CDLL:
    """A compiled kernel library with its function signatures set (RuntimeError on an ABI mismatch)."""
    lib = ctypes.CDLL(str(path))
    if lib.sc_abi_version() != ABI_VERSION:
        raise RuntimeError(f"library ABI {lib.sc_abi_version()} != {ABI_VERSION}")
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    lib.sc_transpose_pad.argtypes, lib.sc_transpose_pad.restype = [_p, _i64, _i64, _p, _i64, _i64, _i32], None
    lib.sc_run_one.argtypes, lib.sc_run_one.restype = [_p, _p, _p, _p], ctypes.c_int
    lib.sc_colskip.argtypes = [_p, _i64, _i64, _i64, _p, _p, _p, _i64, _p, _p, _p, _p, _i32]
    lib.sc_colskip.restype = _i64
    lib.sc_gated_rows.argtypes, lib.sc_gated_rows.restype = [_p, _i64, _i64, _i64, _p, _p, _p, _p, _i32], None
    return lib


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (after one warning) when the fast path is unavailable."""
    if os.environ.get("SPARSECRAFT_NO_KERNELS"):
        return None
    import torch  # noqa: F401  (load torch's OpenMP runtime first, so ours resolves to it)

    compiler = find_compiler()
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        warnings.warn("sparsecraft kernels: no C++ compiler or not x86-64; sparse layers use plain PyTorch (slower)", stacklevel=2)
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([*(src.read_bytes() for src in SOURCES + HEADERS), " ".join(_flags()).encode(), version.encode(), _cpu_signature().encode()]))
    target = cache_dir() / f"sparse_kernels-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            compile_library(compiler, target)
        return load(target)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        warnings.warn(f"sparsecraft kernels unavailable ({exc}); sparse layers use plain PyTorch (slower)", stacklevel=2)
        return None


def available() -> bool:
    """Whether the compiled fast path is loaded (compiling it on first call)."""
    return library() is not None


TORCH_OP_SOURCE = CSRC / "torch_op.cpp"


@lru_cache(maxsize=1)
def torch_op() -> bool:
    """Whether ``torch.ops.sparsecraft.one_token`` (torch_op.cpp, for compiled graphs) is loaded, building it
    at first use against torch's stable C ABI and the kernel library. When it cannot be built (no torch
    headers, another torch's ABI), compiled graphs keep the Python op: slower, same results."""
    lib = library()
    compiler = find_compiler()
    if lib is None or compiler is None or os.environ.get("SPARSECRAFT_NO_TORCH_OP"):
        return False
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    kernels = Path(lib._name)
    flags = ["-O2", "-shared", "-fPIC", "-std=c++17", *(f"-I{p}" for p in include_paths())]
    link = [*(f"-L{p}" for p in library_paths()), *(f"-Wl,-rpath,{p}" for p in library_paths()), "-ltorch_cpu", "-lc10",
            str(kernels), f"-Wl,-rpath,{kernels.parent}"]
    key = hashlib.sha256(b"\0".join([TORCH_OP_SOURCE.read_bytes(), *(h.read_bytes() for h in HEADERS),
                                      " ".join(flags).encode(), " ".join(link).encode(), torch.__version__.encode()]))
    target = cache_dir() / f"torch_op-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            compile_library(compiler, target, [TORCH_OP_SOURCE], flags, link)
        torch.ops.load_library(str(target))
        return True
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        warnings.warn(f"sparsecraft: the compiled-graph operator could not be built ({exc}); torch.compile'd sparse "
                      "layers use the Python operator (slower, same results)", stacklevel=2)
        return False
