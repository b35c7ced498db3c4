"""Packaging and the C++ loader (faim_kernels/_cpp_loader.py).

As a new user installs: the sdist, built from this checkout, is installed with pip's defaults into a
fresh virtual environment that has only torch, outside the checkout; the first CPU call there
compiles the C++ kernels (once) and agrees with the einsum reference; without a C++ compiler the
user gets CppKernelsUnavailable with the cause and the remedy. Those tests take about three
minutes (torch from pip's cache, the sdist's isolated build, one compile) and are marked
`packaging` (`-m "not packaging"` leaves them out); the torch they install is this environment's
version unless FAIM_TEST_TORCH names another requirement. Offline they skip, except under CI.

The loader's own logic (the build lock, the build stamps, a killed build, the compiler's error in
the message, the remembered failure) is tested in small subprocesses with tiny C++ sources.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LOADER_PY = ROOT / "faim_kernels" / "_cpp_loader.py"
TORCH_REQ = os.environ.get("FAIM_TEST_TORCH") or f"torch=={torch.__version__.split('+')[0]}"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _clean_env(**extra) -> dict:
    """The environment without what points into this checkout or its virtual environment."""
    drop = {"PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV", "PYTHONHOME", "FAIM_KERNELS_CACHE"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def _run(cmd, *, cwd, env, timeout=900, check=True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


# --- the sdist and a fresh environment ---------------------------------------------------------

@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    res = _run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), timeout=300)
    return out / res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, sdist):
    """A virtual environment outside the checkout with only torch, then `pip install <sdist>`
    with pip's defaults (build isolation included). Returns (python, timings)."""
    where = tmp_path_factory.mktemp("venv")
    venv = where / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=where, env=_clean_env(), timeout=300)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    t0 = time.perf_counter()
    res = _run(pip + [TORCH_REQ], cwd=where, env=_clean_env(), check=False)
    if res.returncode != 0:
        msg = f"could not install {TORCH_REQ} into a fresh venv:\n{res.stdout[-1500:]}{res.stderr[-1500:]}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    t1 = time.perf_counter()
    _run(pip + [str(sdist)], cwd=where, env=_clean_env())
    t2 = time.perf_counter()
    timings = {"install_torch_s": round(t1 - t0, 1), "install_sdist_s": round(t2 - t1, 1)}
    print(f"\n[packaging] {timings}")
    yield py, timings
    shutil.rmtree(venv, ignore_errors=True)  # about 1 GB; pytest keeps its last temporary dirs


def test_sdist_contents(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for f in sorted(ROOT.glob("csrc/*.cpp")) + sorted(ROOT.glob("csrc/*.h")):
        assert f"csrc/{f.name}" in names, f"{f.name} is not in the sdist"
    for need in ["LICENSE", "README.md", "setup.py", "pyproject.toml", "faim_kernels/py.typed",
                 "faim_kernels/_cpp_loader.py", "tests/conftest.py", "bench/peak_memory.py", "bench/measure.py"]:
        assert need in names, f"{need} is not in the sdist"
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "build-info" in n]


SMOKE = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    t1 = time.perf_counter()
    import faim_kernels as fk
    t2 = time.perf_counter()
    from faim_kernels import _cpp_loader, reference
    g = torch.Generator().manual_seed(0)
    B, C, D = 37, 53, 29  # not multiples of anything
    x, mu = torch.randn(B, D, generator=g), torch.randn(C, D, generator=g)
    L = torch.eye(D) + 0.1 * torch.randn(D, D, generator=g)
    beta = torch.randn(D, generator=g) / D ** 0.5
    out = fk.randers_logits(x, mu, L, beta, 0.3, 2.0, backend="cpp")
    t3 = time.perf_counter()
    ref = reference.randers_logits(x.double(), mu.double(), L.double(), beta.double(), 0.3, 2.0)
    err = ((out.double() - ref).abs() / ref.abs()).max().item()
    print(json.dumps({"how": _cpp_loader._loaded_from(), "max_rel_err": err, "package": fk.__file__,
                      "import_torch_s": t1 - t0, "import_faim_kernels_s": t2 - t1,
                      "first_call_s": t3 - t2}))
""")


@pytest.mark.slow
@pytest.mark.packaging
def test_sdist_installs_and_first_cpu_call_compiles(fresh_venv, tmp_path):
    py, timings = fresh_venv
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path, env=_clean_env()).stdout.strip())
    pkg = site / "faim_kernels"
    # A pure-Python wheel with the sources as package data, the license and honest metadata.
    assert sorted(p.name for p in (pkg / "csrc").iterdir()) == \
        sorted(p.name for p in list(ROOT.glob("csrc/*.cpp")) + list(ROOT.glob("csrc/*.h")))
    assert (pkg / "py.typed").is_file() and not list(pkg.glob("_C*"))
    dist_info = next(site.glob("faim_kernels-*.dist-info"))
    assert "Root-Is-Purelib: true" in (dist_info / "WHEEL").read_text()
    meta = (dist_info / "METADATA").read_text()
    requires = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert any("torch>=2.4" in r for r in requires) and not any("numpy" in r for r in requires), requires
    assert "License-Expression: Apache-2.0" in meta
    assert list(dist_info.rglob("LICENSE"))

    cache = tmp_path / "cache"
    env = _clean_env(FAIM_KERNELS_CACHE=str(cache))
    first = _run([str(py), "-c", SMOKE], cwd=tmp_path, env=env)
    r1 = json.loads(first.stdout.strip().splitlines()[-1])
    assert r1["package"].startswith(str(site)), "the checkout leaked into the fresh environment"
    assert r1["how"][0] == "compiled" and r1["how"][1].startswith(str(cache)), r1
    assert "compiling the C++ CPU kernels" in first.stderr
    assert r1["max_rel_err"] < 1e-4, r1

    second = _run([str(py), "-c", SMOKE], cwd=tmp_path, env=env)
    r2 = json.loads(second.stdout.strip().splitlines()[-1])
    assert r2["how"] == ["cache", r1["how"][1]], r2
    assert "compiling" not in second.stderr
    print(f"\n[packaging] {timings}; first process: import {r1['import_faim_kernels_s']:.1f} s, first call "
          f"{r1['first_call_s']:.1f} s; second: import {r2['import_faim_kernels_s']:.2f} s, first call "
          f"{r2['first_call_s']:.2f} s")


NO_COMPILER = textwrap.dedent("""
    import time, torch, faim_kernels as fk
    from faim_kernels._cpp_loader import CppKernelsUnavailable, available
    x, mu, L, beta = torch.randn(3, 4), torch.randn(5, 4), torch.rand(4) + 0.5, torch.randn(4)
    errors = []
    for _ in range(2):
        t = time.perf_counter()
        try:
            fk.randers_logits(x, mu, L, beta, 0.1, 1.0, backend="cpp")
        except CppKernelsUnavailable as e:
            errors.append(e)
        print("seconds", time.perf_counter() - t)
    assert len(errors) == 2 and errors[0] is errors[1], errors
    assert not available()
    print(errors[0])
""")


@pytest.mark.slow
@pytest.mark.packaging
def test_no_compiler_gives_the_cause_and_the_remedy(fresh_venv, tmp_path):
    py, _ = fresh_venv
    cache = tmp_path / "cache"
    env = _clean_env(PATH=str(py.parent), FAIM_KERNELS_CACHE=str(cache))
    env.pop("CXX", None)
    res = _run([str(py), "-c", NO_COMPILER], cwd=tmp_path, env=env)
    assert "no C++ compiler" in res.stdout and "`c++` is not on PATH" in res.stdout, res.stdout
    assert "apt install g++" in res.stdout and "backend='torch'" in res.stdout
    assert not cache.exists() or not any(cache.iterdir()), "nothing is built without a compiler"


# --- the loader's logic, on tiny sources ---------------------------------------------------------

def _fresh_loader(pkg_dir: Path):
    """A private instance of _cpp_loader whose package directory is `pkg_dir` (its csrc/ holds the
    sources; a _C*.so there is the prebuilt library)."""
    spec = importlib.util.spec_from_file_location(f"_loader_{pkg_dir.name}", LOADER_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._PKG = pkg_dir
    return mod


LOADER_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("loader", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._PKG = Path(sys.argv[2])
    try:
        mod.load()
        print(json.dumps({"how": mod._loaded_from()}))
    except mod.CppKernelsUnavailable as e:
        again = None
        try:
            mod.load()
        except mod.CppKernelsUnavailable as e2:
            again = e2 is e
        print(json.dumps({"error": str(e), "same_error_again": again}))
""")


def _load_in_subprocess(pkg_dir: Path, cache: Path, **env) -> dict:
    res = _run([sys.executable, "-c", LOADER_SCRIPT, str(LOADER_PY), str(pkg_dir)], cwd=pkg_dir,
               env=_clean_env(FAIM_KERNELS_CACHE=str(cache), **env), timeout=300)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _tiny_package(tmp_path: Path, source: str) -> Path:
    pkg = tmp_path / "pkg"
    (pkg / "csrc").mkdir(parents=True)
    (pkg / "csrc" / "probe.cpp").write_text(source)
    return pkg


def test_compile_error_is_reported_with_the_compiler_output_and_remembered(tmp_path):
    pkg = _tiny_package(tmp_path, "int main( { return 0; }\n")
    out = _load_in_subprocess(pkg, tmp_path / "cache")
    assert "compiling the C++ CPU kernels failed" in out["error"], out
    assert "probe.cpp" in out["error"] and "error" in out["error"].split("last lines:")[1], out
    assert "Full log:" in out["error"] and "please report it" in out["error"]
    assert out["same_error_again"] is True


def test_killed_build_is_rebuilt_and_then_cached(tmp_path):
    """A killed build leaves objects and torch's own 'lock' file (on which cpp_extension.load
    would wait forever) but no completion stamp: the next load starts that build afresh."""
    pkg = _tiny_package(tmp_path, 'extern "C" int faim_probe() { return 42; }\n')
    cache = tmp_path / "cache"
    loader = _fresh_loader(pkg)
    key, _ = loader._build_key(torch, loader._compiler(), loader.cxx_flags(), pkg / "csrc")
    (cache / key).mkdir(parents=True)
    (cache / key / "lock").write_text("")  # torch's FileBaton, left behind by a killed build
    (cache / key / "probe.o").write_text("half an object file")
    first = _load_in_subprocess(pkg, cache)
    assert first["how"][0] == "compiled", first
    assert _load_in_subprocess(pkg, cache)["how"] == ["cache", first["how"][1]]


def test_stale_prebuilt_warning_only_when_a_compile_happens(tmp_path):
    """A prebuilt library built for another torch is passed over; the warning that says so (and
    that a compile follows) comes only from the process that compiles: the next ones load the
    cached build in about a second, and warn nothing."""
    pkg = _tiny_package(tmp_path, 'extern "C" int faim_probe() { return 42; }\n')
    loader = _fresh_loader(pkg)
    (pkg / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not loaded")
    (pkg / loader.STAMP_NAME).write_text(json.dumps({"torch": "2.9.0", "torch_git": "x"}))
    warning = "was built for torch 2.9.0, and this is torch"

    def load():
        res = _run([sys.executable, "-W", "always::RuntimeWarning", "-c", LOADER_SCRIPT, str(LOADER_PY), str(pkg)],
                   cwd=pkg, env=_clean_env(FAIM_KERNELS_CACHE=str(tmp_path / "cache")), timeout=300)
        return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr

    first, err = load()
    assert first["how"][0] == "compiled", first
    assert warning in err and "compiling the C++ CPU kernels for this torch instead" in err, err
    again, err = load()
    assert again["how"] == ["cache", first["how"][1]], again
    assert warning not in err and "RuntimeWarning" not in err, err


LOCK_HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("loader", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with mod._build_lock(Path(sys.argv[2])):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_build_lock_times_out_on_a_live_holder_and_is_free_once_it_is_killed(tmp_path):
    lock = tmp_path / "k.lock"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(LOADER_PY), str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        loader = _fresh_loader(tmp_path)
        with pytest.raises(loader.CppKernelsUnavailable, match=f"pid {holder.pid}.*FAIM_KERNELS_LOCK_TIMEOUT"):
            with loader._build_lock(lock, timeout=0.5):
                pass
        holder.send_signal(signal.SIGKILL)  # a build killed while holding the lock
        holder.wait(timeout=30)
        t = time.perf_counter()
        with loader._build_lock(lock, timeout=5):
            pass
        assert time.perf_counter() - t < 1.0
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_prebuilt_library_is_skipped_when_its_stamp_names_another_torch_or_other_sources(tmp_path):
    pkg = _tiny_package(tmp_path, "// v1\n")
    loader = _fresh_loader(pkg)
    stamp = pkg / loader.STAMP_NAME
    assert loader._prebuilt_mismatch(torch, pkg / "csrc") is None  # no stamp: tried as it is
    good = {"torch": torch.__version__, "torch_git": torch.version.git_version,
            "sources": loader.sources_hash(pkg / "csrc")}
    stamp.write_text(json.dumps(good))
    assert loader._prebuilt_mismatch(torch, pkg / "csrc") is None
    stamp.write_text(json.dumps({**good, "torch": "2.9.0"}))
    assert "built for torch 2.9.0" in loader._prebuilt_mismatch(torch, pkg / "csrc")
    stamp.write_text(json.dumps(good))
    (pkg / "csrc" / "probe.cpp").write_text("// v2\n")
    assert "other sources" in loader._prebuilt_mismatch(torch, pkg / "csrc")


def test_the_checkout_loads_its_kernels():
    """In this checkout the kernels come from the in-place build when there is one (make setup)."""
    from faim_kernels import _cpp_loader

    _cpp_loader.load()
    how, path = _cpp_loader._loaded_from()
    assert how in ("prebuilt", "cache", "compiled")
    assert torch.ops.faim_kernels.randers_logits.default is not None
