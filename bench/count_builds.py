"""Counts the distinct Triton kernel builds a test selection triggers, without a GPU: the selection
runs through Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) while every launch is recorded
with the key under which Triton's JIT would compile it on a GPU: the kernel, its constexpr values
and launch options, and for each other argument its type and specialisation (a tensor's dtype and
16-byte alignment, an integer's == 1 and divisibility by 16 unless the kernel lists it in
do_not_specialize, None). On a GPU each distinct key is one compilation (1-3 s on an H100 for most
variants), so this number bounds the compile time of the GPU test run before a GPU is at hand.

    TRITON_INTERPRET=1 python -m bench.count_builds                     # bench/gpu_tests.txt, limit 150
    TRITON_INTERPRET=1 python -m bench.count_builds --by-kernel -- tests/test_x.py -k triton

Approximations: the interpreter runs its own precision mode ("interpret", see
faim_kernels/ops/triton/interpreter.py) where a GPU runs the precision mode of
the dtype (one pinned config each, as on the GPU with FAIM_TRITON_AUTOTUNE=0), so the variant
count matches but the block sizes differ; tests marked for CUDA only (gpu_only) do not run here,
and their builds are not counted.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import sys

import pytest

DEFAULT_LIMIT = 150


def selection_file_args(path: str) -> list[str]:
    """The pytest arguments of a selection file: one per line, '#' starts a comment."""
    with open(path) as f:
        return [ln.split("#", 1)[0].strip() for ln in f if ln.split("#", 1)[0].strip()]


def _arg_key(value, specialize: bool):
    import torch
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        width = "i64" if not -2 ** 31 <= value < 2 ** 31 else "i32"
        return (width, value == 1, value % 16 == 0) if specialize else width
    if isinstance(value, float):
        return "fp32"
    return type(value).__name__


class BuildCounter:
    """A pytest plugin: records the compile key of every launch of an interpreted kernel."""

    def __init__(self):
        self.keys = set()
        self.launches = 0
        self.first_seen = {}  # key -> the test that first launched it
        self.test = None

    def pytest_runtest_setup(self, item):
        self.test = item.nodeid

    def key(self, fn, args, kwargs):
        py_fn = fn.fn
        params = list(inspect.signature(py_fn).parameters.values())
        bound = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        bound.update(zip(fn.arg_names, args))
        bound.update(kwargs)
        dns = fn.kwargs.get("do_not_specialize") or ()
        dns = {fn.arg_names[d] if isinstance(d, int) else d for d in dns}
        parts = []
        for p in params:
            v = bound.get(p.name)
            if "constexpr" in str(p.annotation):
                parts.append((p.name, repr(v)))
            else:
                parts.append((p.name, _arg_key(v, p.name not in dns)))
        names = {p.name for p in params}
        options = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in names))
        return (py_fn.__module__, py_fn.__name__, tuple(parts), options)

    def pytest_configure(self, config):
        from triton.runtime.interpreter import InterpretedFunction
        original = InterpretedFunction.run
        counter = self

        def run(fn, *args, grid, warmup, **kwargs):
            counter.launches += 1
            key = counter.key(fn, args, kwargs)
            counter.keys.add(key)
            counter.first_seen.setdefault(key, counter.test)
            return original(fn, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selection", default=os.path.join(os.path.dirname(__file__), "gpu_tests.txt"),
                    help="file of pytest arguments, one per line (default: the GPU check's selection)")
    ap.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="exit 1 above this many builds")
    ap.add_argument("--by-kernel", action="store_true", help="print the count per kernel")
    ap.add_argument("--by-test", action="store_true", help="print the new builds each test brings")
    ap.add_argument("--dump", default=None, help="write every key (and the test that first built it) here")
    ap.add_argument("pytest_args", nargs="*", help="pytest arguments instead of the selection file (after --)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench.count_builds runs the tests through the interpreter: set TRITON_INTERPRET=1")
    pytest_args = args.pytest_args or selection_file_args(args.selection)
    counter = BuildCounter()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args], plugins=[counter])
    if args.by_kernel:
        per = collections.Counter(k[1] for k in counter.keys)
        for name, n in per.most_common():
            print(f"{n:5d}  {name}")
    if args.by_test:
        per = collections.Counter(counter.first_seen.values())
        for name, n in per.most_common():
            print(f"{n:5d}  {name}")
    if args.dump:
        with open(args.dump, "w") as f:
            for key, test in counter.first_seen.items():
                f.write(f"{test}\t{key!r}\n")
    n = len(counter.keys)
    print(f"{n} distinct kernel builds ({counter.launches} launches); limit {args.limit}; pytest exit {int(rc)}")
    return 0 if (rc == 0 and n <= args.limit) else 1


if __name__ == "__main__":
    sys.exit(main())
