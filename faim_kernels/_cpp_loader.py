"""Loads the C++ CPU kernels (csrc/) into the PyTorch dispatcher, compiling them on first use.

The kernels register themselves with the dispatcher (TORCH_LIBRARY_IMPL / TORCH_LIBRARY_FRAGMENT
blocks) when their shared library is loaded, so loading is all there is to do. In this order:

1. a prebuilt faim_kernels/_C*.so next to the package (`python setup.py build_ext --inplace`, or
   `FAIM_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .`), unless its build stamp says it
   was built for another torch or from other sources;
2. else the sources shipped with the package (faim_kernels/csrc/, or csrc/ of a source checkout),
   compiled with torch.utils.cpp_extension.load against the torch that is running, once, into a
   cache directory keyed by the torch build, the Python ABI, the compiler, the flags and a hash of
   the sources ($FAIM_KERNELS_CACHE, else $XDG_CACHE_HOME/faim_kernels or ~/.cache/faim_kernels);
3. else CppKernelsUnavailable, whose message says why (no compiler, the compiler's last lines,
   an undefined symbol, ...) and what a pip user can do. The failure is remembered: later calls
   raise the same error without trying again.

Concurrent first uses (several processes, e.g. data-parallel ranks) build once: the build holds an
flock on a file in the cache, which the OS releases when its holder exits, even when it is killed,
so a killed build never leaves a stale lock; waiting for a live builder is bounded by
$FAIM_KERNELS_LOCK_TIMEOUT seconds (default 900). A build directory without its completion
stamp (a killed build) is wiped and built again from scratch.

This module imports nothing from the package (setup.py executes it on its own for the flags and
the source hash) and imports torch only when load() runs.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.machinery
import json
import os
import platform
import re
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CppKernelsUnavailable", "load", "available"]

_PKG = Path(__file__).resolve().parent
STAMP_NAME = "_C.build-info.json"  # written by setup.py next to a prebuilt _C*.so
_DEFAULT_LOCK_TIMEOUT_S = 900.0

_INSTALL_COMPILER = (
    "What to do: install a C++ compiler (Debian/Ubuntu: `apt install g++`; Fedora: `dnf install "
    "gcc-c++`; conda: `conda install -c conda-forge gxx`; macOS: `xcode-select --install`) or point "
    "CXX at one, then start Python again: the kernels compile on first use, once per torch version."
)
_REPORT = (
    "What to do: this compiler or torch build may be unsupported, or it is a bug: please report it "
    "with the full log at https://github.com/faim-kernels/faim_kernels/issues."
)
_ALTERNATIVES = (
    "Meanwhile: backend='auto' runs backend='torch' on CPU tensors without one (the same exact algorithm "
    "in plain PyTorch ops, slower than the kernels); CUDA tensors need no compiler (they run the Triton kernels)."
)
_REMEDY = f"{_INSTALL_COMPILER}\n{_ALTERNATIVES}"


class CppKernelsUnavailable(RuntimeError):
    """The C++ CPU kernels could not be built or loaded; the message gives the cause and the remedy."""


_lock = threading.Lock()
_loaded: tuple[str, str] | None = None  # (how: "prebuilt" | "cache" | "compiled", library path)
_error: CppKernelsUnavailable | None = None


def load() -> None:
    """Makes the C++ CPU kernels available as torch.ops.faim_kernels.*; idempotent and thread-safe.

    Raises CppKernelsUnavailable (every time, without retrying) when they cannot be built or loaded.
    """
    global _loaded, _error
    if _loaded is not None:
        return
    with _lock:
        if _loaded is not None:
            return
        if _error is not None:
            raise _error
        try:
            _loaded = _load()
        except CppKernelsUnavailable as e:
            _error = e
            raise
        except Exception as e:  # an unforeseen failure still names its cause, and is remembered
            _error = CppKernelsUnavailable(f"faim_kernels: loading the C++ CPU kernels failed: "
                                           f"{_describe(e)}\n{_REPORT}\n{_ALTERNATIVES}")
            raise _error from e


def available() -> bool:
    """True when load() succeeds; never raises for an unavailable build."""
    try:
        load()
    except CppKernelsUnavailable:
        return False
    return True


def _loaded_from() -> tuple[str, str] | None:
    """How the kernels were loaded in this process ("prebuilt", "cache" or "compiled") and the
    library's path; None before a successful load(). For tests and diagnostics."""
    return _loaded


# --- what a build is made of (setup.py uses these too) ---------------------------------------

def cxx_flags(native: bool | None = None) -> list[str]:
    """Release flags, shared by the JIT build and setup.py's ahead-of-time build (which adds -g0).

    -fopenmp is needed for threads, not only for `omp simd`: with PyTorch's OpenMP backend,
    at::parallel_for is an inline template (ATen/Parallel-inl.h) that runs the whole range on the
    calling thread unless _OPENMP is defined. Measured on 2 threads, 30 forward calls at
    (512, 4096, 256): -fopenmp-simd alone ran the tiles serially, and each tile's GEMM then spun
    both threads, 6-8x the CPU time of -fopenmp. It is not passed at link time: the few GOMP symbols
    bind to torch's own OpenMP runtime (loaded with libtorch_cpu), so torch.set_num_threads applies
    and no second runtime enters the process. Apple's clang has no -fopenmp: there the kernels'
    tiles run serially (untested).
    """
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    flags.append("-fopenmp-simd" if sys.platform == "darwin" else "-fopenmp")
    if native is None:
        native = native_build()
    if native:
        flags.append("-march=native")
    return flags


def native_build() -> bool:
    """Whether to compile for this machine's CPU (-march=native): FAIM_KERNELS_MARCH=native|portable,
    default native for the build on first use (it runs where it was built; the cache key names the
    CPU, see cpu_id) and portable for setup.py's ahead-of-time build (a wheel may travel).

    Why: the epilogue's square roots and divisions and the float64 row sums run in vector registers
    as wide as the CPU has; measured on an AVX-512 machine, one thread, (256, 1000, 128): the
    forward epilogue took 10% of the op's time with -march=native against 13% without, and the
    float64 row sums of the preparation ran about 4x faster."""
    return os.environ.get("FAIM_KERNELS_MARCH", "native") == "native"


def cpu_id() -> str:
    """The CPU a native build is for: model and feature flags (Linux), else the processor name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return hashlib.sha256("\n".join(sorted(set(lines))).encode()).hexdigest()[:16]
    except OSError:
        return platform.machine() + ":" + platform.processor()


def source_files(src_dir: Path) -> list[Path]:
    return sorted(list(src_dir.glob("*.cpp")) + list(src_dir.glob("*.h")))


def sources_hash(src_dir: Path) -> str:
    """sha256 over the names and contents of src_dir's *.cpp and *.h."""
    h = hashlib.sha256()
    for f in source_files(src_dir):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _source_dir() -> Path | None:
    """The C++ sources: package data of an installed package, else csrc/ of a source checkout."""
    candidates = [_PKG / "csrc"]
    if (_PKG.parent / "setup.py").is_file() and (_PKG.parent / "pyproject.toml").is_file():
        candidates.append(_PKG.parent / "csrc")
    for d in candidates:
        if any(d.glob("*.cpp")):
            return d
    return None


def _cache_root() -> Path:
    if os.environ.get("FAIM_KERNELS_CACHE"):
        return Path(os.environ["FAIM_KERNELS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "faim_kernels"


def _describe(e: BaseException) -> str:
    """An exception and its causes on one line (torch.ops.load_library hides the dlopen error in
    __cause__: 'Could not load this library: ...' from 'undefined symbol: ...')."""
    parts = []
    while e is not None and len(parts) < 4:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__
    return " <- ".join(parts)


# --- the three steps ----------------------------------------------------------------------------

def _load() -> tuple[str, str]:
    import torch

    src = _source_dir()
    skipped = None  # why a prebuilt library was passed over, for the messages
    pre = next((_PKG / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
                if (_PKG / f"_C{suffix}").is_file()), None)
    if pre is not None:
        why = _prebuilt_mismatch(torch, src)
        if why is None:
            try:
                torch.ops.load_library(str(pre))
                return "prebuilt", str(pre)
            except OSError as e:
                why = f"does not load ({_describe(e)})"
        skipped = f"the prebuilt {pre} {why}"
    if src is None:
        why = skipped or "there is no prebuilt faim_kernels/_C library"
        raise CppKernelsUnavailable(
            f"faim_kernels: the C++ CPU kernels cannot be loaded: {why}, and their sources are not "
            f"in the package (looked for {_PKG / 'csrc'}): reinstall faim_kernels from its sdist or "
            f"wheel (`pip install --force-reinstall --no-deps faim_kernels`).")
    return _jit(torch, src, skipped)


def _prebuilt_mismatch(torch, src: Path | None) -> str | None:
    """Why a prebuilt _C must not be used (its stamp names another torch, or other sources), or
    None. A library built against another torch may load and still misbehave, so it is not tried."""
    stamp = _PKG / STAMP_NAME
    if not stamp.is_file():
        return None
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    if info.get("torch") != torch.__version__ or info.get("torch_git") != torch.version.git_version:
        return f"was built for torch {info.get('torch')}, and this is torch {torch.__version__}"
    if info.get("cpu") not in (None, cpu_id()):
        return "was built for another CPU (-march=native)"
    if src is not None and info.get("sources") not in (None, sources_hash(src)):
        return (f"was built from other sources than {src} (rebuild it: "
                f"`python setup.py build_ext --inplace`)")
    return None


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"  # what torch.utils.cpp_extension uses
    path = shutil.which(cxx)
    if path is None:
        how = f"CXX={cxx!r} is not an executable" if os.environ.get("CXX") else "`c++` is not on PATH"
        raise CppKernelsUnavailable(
            f"faim_kernels: no C++ compiler to build the C++ CPU kernels ({how}).\n{_REMEDY}")
    return path


def _build_key(torch, cxx: str, flags: list[str], src: Path) -> tuple[str, str]:
    """(the build's directory name, its digest) for this torch build, Python ABI, compiler, flags
    and sources."""
    ident = {
        "torch": torch.__version__, "torch_git": torch.version.git_version,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "python": sys.implementation.cache_tag, "platform": sysconfig.get_platform(),
        "cxx": cxx, "flags": flags, "sources": sources_hash(src),
        "cpu": cpu_id() if "-march=native" in flags else None,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    name = f"torch{torch.__version__}-{sys.implementation.cache_tag}-{digest}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name), digest


def _jit(torch, src: Path, skipped: str | None) -> tuple[str, str]:
    before = f" ({skipped})" if skipped else ""
    if os.name == "nt":
        raise CppKernelsUnavailable(f"faim_kernels: the C++ CPU kernels are built with GCC or Clang; "
                                    f"Windows is not supported yet{before}.\n{_ALTERNATIVES}")
    cxx = _compiler()
    flags = cxx_flags()
    root = _cache_root()
    key, digest = _build_key(torch, cxx, flags, src)
    build = root / key
    # A name per build: torch.utils.cpp_extension renames a second, different build of one name
    # in the same process (name_v1), which would not be found here afterwards.
    name = f"faim_kernels_cpu_{digest}"
    lib, done = build / f"{name}.so", build / "build-info.json"

    if done.is_file() and lib.is_file():
        try:
            torch.ops.load_library(str(lib))
            return "cache", str(lib)
        except OSError as e:  # e.g. a system library changed under it: build it again
            print(f"faim_kernels: the cached build {lib} does not load ({_describe(e)}); rebuilding",
                  file=sys.stderr)
    try:
        root.mkdir(parents=True, exist_ok=True)
        # An existing directory may still be unwritable (permissions, a read-only mount): find out
        # here, where the message can name the remedy, not in the build lock's open().
        probe = root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CppKernelsUnavailable(
            f"faim_kernels: cannot create or write the build cache {root} ({_describe(e)}): set "
            f"FAIM_KERNELS_CACHE to a writable directory.") from e

    with _build_lock(root / f"{key}.lock"):
        if done.is_file() and lib.is_file():  # another process built it while this one waited
            torch.ops.load_library(str(lib))
            return "cache", str(lib)
        # No completion stamp: nothing here is trusted (a killed build may have left objects, or
        # torch's own 'lock' file, which would make cpp_extension.load wait forever).
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir()
        if skipped:
            # Said here, where a compile really starts, not where the prebuilt library is passed
            # over: when the cache holds a build for this torch, it loads in about a second, and a
            # warning in every process that a compile is under way was wrong.
            warnings.warn(f"faim_kernels: {skipped}; compiling the C++ CPU kernels for this torch "
                          f"instead", RuntimeWarning, stacklevel=2)
        print(f"faim_kernels: compiling the C++ CPU kernels for torch {torch.__version__} "
              f"(once per torch version; about a minute) in {build}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load as cpp_load
            with _ninja_on_path():
                path = cpp_load(name=name, sources=[str(p) for p in sorted(src.glob("*.cpp"))],
                                extra_cflags=flags, build_directory=str(build),
                                is_python_module=False, verbose=False)
        except CppKernelsUnavailable:
            raise
        except Exception as e:
            text = str(e)
            (build / "build.log").write_text(text)
            raise CppKernelsUnavailable(_build_failure(text, e, cxx, torch, build, before)) from e
        seconds = time.perf_counter() - t0
        for obj in build.glob("*.o"):  # only the library is needed from now on
            obj.unlink()
        done.write_text(json.dumps({"torch": torch.__version__, "compiler": cxx, "flags": flags,
                                    "seconds": round(seconds, 1)}, indent=1))
        print(f"faim_kernels: compiled in {seconds:.0f} s", file=sys.stderr, flush=True)
        return "compiled", str(path)


def _build_failure(text: str, e: Exception, cxx: str, torch, build: Path, before: str) -> str:
    if isinstance(e, OSError):  # compiled, but the library does not load
        return (f"faim_kernels: the C++ CPU kernels compiled in {build} but do not load: "
                f"{_describe(e)}{before}.\n{_REPORT}\n{_ALTERNATIVES}")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = "\n".join(lines[-25:])
    hint = ""
    if "Python.h" in text:
        hint = ("\nHint: the Python development headers are missing (Debian/Ubuntu: "
                "`apt install python3-dev`; Fedora: `dnf install python3-devel`).")
    elif "ninja" in text.lower() and "required" in text.lower():
        hint = "\nHint: `pip install ninja` (torch.utils.cpp_extension builds with it)."
    return (f"faim_kernels: compiling the C++ CPU kernels failed (compiler {cxx}, torch "
            f"{torch.__version__}){before}. The compiler's last lines:\n{tail}{hint}\n"
            f"Full log: {build / 'build.log'}\n{_REPORT}\n{_ALTERNATIVES}")


@contextmanager
def _ninja_on_path():
    """torch.utils.cpp_extension runs `ninja` from PATH; in a virtual environment that was not
    activated, the ninja that pip installed is not on it. Adds its directory for the build."""
    if shutil.which("ninja"):
        yield
        return
    dirs = []
    try:
        import ninja
        dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    dirs.append(os.path.dirname(sys.executable))
    old = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(dirs + ([old] if old else []))
    try:
        if not shutil.which("ninja"):
            raise CppKernelsUnavailable(
                "faim_kernels: building the C++ CPU kernels needs ninja, which is not installed: "
                "`pip install ninja`, then start Python again.")
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


@contextmanager
def _build_lock(path: Path, timeout: float | None = None):
    """An exclusive flock on `path`. The OS releases it when the holder exits, however it exits,
    so it is never stale; waiting for a live holder gives up after `timeout` seconds."""
    import fcntl

    if timeout is None:
        timeout = float(os.environ.get("FAIM_KERNELS_LOCK_TIMEOUT", _DEFAULT_LOCK_TIMEOUT_S))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise CppKernelsUnavailable(
                    f"faim_kernels: gave up after {timeout:.0f} s waiting for another process "
                    f"(pid {holder}) that is compiling the C++ CPU kernels (lock {path}). If it is "
                    f"stuck, stop it; FAIM_KERNELS_LOCK_TIMEOUT sets the wait.")
            if not told:
                print(f"faim_kernels: waiting for another process that is compiling the C++ CPU "
                      f"kernels (lock {path})", file=sys.stderr, flush=True)
                told = True
            time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
