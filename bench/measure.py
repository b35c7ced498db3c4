"""The one timing and peak-memory helper of the bench scripts (every script in bench/ times and
measures through it, so that two tables of this directory always mean the same thing).

Time
    median_seconds(fn, min_run_time, device)   median seconds per call: torch.utils.benchmark's
        blocked_autorange on CPU (on torch.get_num_threads() threads: the Timer's own default is
        one), triton.testing.do_bench (CUDA events) on CUDA. The first call is
        run untimed (kernel loading, compilation, autotuning). min_run_time <= 0 on CPU: one timed
        call (for calls that take seconds each).
    quantiles_ms(fn, device)                    (median, 20th, 80th percentile) in milliseconds.
    rounds_seconds(calls, rounds, min_run_time, device) / best_of_rounds(...)
        the calls of one table row timed in turn, `rounds` times over, each keeping every round /
        its fastest round: on a shared machine load comes and goes, the least disturbed round is the
        closest to a call's own cost, and taking turns spreads the load over all the calls.
    per_call_seconds(fn, calls, rounds)         best of `rounds` loops of `calls` calls: for calls of
        a few microseconds, where the Timer's own overhead shows.
    set_threads(n)                              the torch intra-op thread count of a run.

Peak memory (bytes beyond what exists before the call: the inputs and the incoming gradient)
    host_peak_bytes(fn)        resident memory: resets the kernel's high-water mark (writing 5 to
        /proc/self/clear_refs, Linux), reads VmRSS, runs fn once and returns VmHWM − VmRSS_before.
        CPU tensors have no caching allocator to ask. Run it in a fresh process (below): freed
        pages of an earlier call would hide a later call's peak.
    cuda_peak_bytes(fn)        the CUDA allocator's high-water mark during one call of fn.
    peak_bytes_in_fresh_process(argv) / print_probe(bytes)
        a script's hidden `--probe` mode prints {"bytes": N} as its last line (print_probe); the
        parent runs `python -m <argv>` and reads it back (-1 if the probe failed).

Where the numbers come from
    device_name(device), versions(), environment(device)
        the CPU model or GPU name; torch (and triton) and Python versions; the two in one line for
        the header of a table or a results section.
"""
from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import time

import torch


def set_threads(n: int | None) -> int:
    """Sets torch's intra-op thread count (None: leaves it) and returns the count in use."""
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


_ALLOCATOR_SETTLED = False


def settle_host_allocator() -> None:
    """Frees one 31 MiB block, once per process, before anything is timed.

    Why: glibc's malloc serves blocks of 128 KiB and more with mmap and gives freed memory at the
    top of its heap back to the kernel, so a step that allocates megabyte buffers may fault every
    page of them in again on the next step. Its thresholds rise with the largest block the process
    has freed (its "dynamic mmap threshold"), and which buffers still get returned depends on the
    order and sizes of every allocation in the process. In a fresh benchmark process that singled
    out the head: at (256, 1000, 128), diagonal Σ, two threads, the head's training step took ~650
    page faults and 2.1-2.3 ms per step, nn.Linear + CE's under 10 faults and 1.06 ms; after this
    call 0.3 faults and 1.6 ms, nn.Linear + CE unchanged. The block is as large as glibc adapts to
    (its threshold stops rising at 32 MiB): after a 16 MiB block the (512, 4096, 256) step, whose
    [B, C] buffers are 8 MiB, still took 1,000-1,800 faults (nn.Linear + CE's ~540), after this
    one under 40 (nn.Linear + CE's none). (Behind a small convolutional backbone
    both heads' steps took 1,400-4,000 faults, most of them the backbone's: docs/usage.md, "CPU
    training and the allocator".) So the tables compare the kernels' work, not the heap's history;
    both sides of every comparison run after the same call. The block is never touched, so it
    costs no memory; peak-memory probes run in fresh processes that time nothing."""
    global _ALLOCATOR_SETTLED
    if not _ALLOCATOR_SETTLED:
        block = torch.empty(31 << 20, dtype=torch.uint8)
        del block
        _ALLOCATOR_SETTLED = True


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, min_run_time: float = 1.0, device: str = "cpu", warmup: bool = True) -> float:
    """Median seconds per call of fn (see the module docstring)."""
    settle_host_allocator()
    if warmup:
        fn()
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    if min_run_time <= 0:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    from torch.utils.benchmark import Timer
    # num_threads: the Timer runs its statement on ONE thread unless told otherwise (its default is
    # 1, whatever torch.get_num_threads() says). Until 2026-12-07 this call left the default, so every
    # CPU table of bench/ timed one thread while its header named the process's thread count.
    return Timer(stmt="fn()", globals={"fn": fn},
                 num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time).median


def quantiles_ms(fn, device: str = "cpu", cpu_runs: int = 3) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds per call. CUDA: do_bench's quantiles; CPU (a
    smoke run through Triton's interpreter, where one call takes long): the median, fastest and
    slowest of `cpu_runs` timed calls after one untimed call."""
    if device == "cuda":
        import triton.testing
        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    fn()
    runs = []
    for _ in range(cpu_runs):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    runs.sort()
    return runs[len(runs) // 2], runs[0], runs[-1]


def rounds_seconds(calls: dict, rounds: int, min_run_time: float, device: str = "cpu",
                   on_error=None) -> dict[str, list[float]]:
    """{name: [median seconds of each round]}, the calls timed in turn within each round, each round
    taking min_run_time per call. Every call runs once first (untimed). on_error(name, exception):
    called for a call that raises RuntimeError or OutOfMemoryError, which then leaves the rounds
    (without on_error the exception propagates)."""
    live = dict(calls)
    times: dict[str, list[float]] = {}

    def attempt(name, timed):
        try:
            if timed:
                times[name].append(median_seconds(live[name], min_run_time, device, warmup=False))
            else:
                live[name]()
                times[name] = []
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if on_error is None:
                raise
            on_error(name, e)
            del live[name]

    for name in list(live):
        attempt(name, timed=False)
    for _ in range(rounds):
        for name in list(live):
            attempt(name, timed=True)
    return {name: t for name, t in times.items() if name in live}


def best_of_rounds(calls: dict, rounds: int, min_run_time: float, device: str = "cpu") -> dict[str, float]:
    """{name: fastest round's median seconds} (rounds_seconds)."""
    return {name: min(t) for name, t in rounds_seconds(calls, rounds, min_run_time, device).items()}


def fastest_interleaved(calls: dict, rounds: int, clock=time.perf_counter) -> dict[str, float]:
    """{name: fastest single call over `rounds`}, the calls alternating within each round, timed by
    `clock` (time.thread_time: the calling thread's CPU time, blind to waiting for a core on a
    loaded machine). Every call runs once first (untimed)."""
    settle_host_allocator()
    for fn in calls.values():
        fn()
    best = {k: float("inf") for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            t0 = clock()
            fn()
            best[k] = min(best[k], clock() - t0)
    return best


def per_call_seconds(fn, calls: int = 300, rounds: int = 7, warmup: int = 20) -> float:
    """Seconds per call: the best of `rounds` loops of `calls` back-to-back calls."""
    settle_host_allocator()
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def host_peak_bytes(fn) -> int:
    """Bytes of peak extra resident memory while fn() runs (Linux; see the module docstring)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - before) * 1024


def cuda_peak_bytes(fn, empty_cache: bool = False) -> int:
    """Bytes the CUDA allocator holds at its peak during one call of fn, beyond what it held before."""
    torch.cuda.synchronize()
    if empty_cache:
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_bytes(fn, device: str = "cpu") -> int:
    """host_peak_bytes on CPU, cuda_peak_bytes on CUDA."""
    return cuda_peak_bytes(fn) if device == "cuda" else host_peak_bytes(fn)


def print_probe(n_bytes: int) -> None:
    """The last line of a probe process: what peak_bytes_in_fresh_process reads back."""
    print(json.dumps({"bytes": n_bytes}))


def peak_bytes_in_fresh_process(argv: list[str], env=None) -> int:
    """Runs `python -m argv...` (a script's probe mode) and returns the bytes it printed with
    print_probe, or -1 (its error output copied to stderr) if it failed."""
    res = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-2000:])
        return -1
    return json.loads(res.stdout.strip().splitlines()[-1])["bytes"]


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU's model name (/proc/cpuinfo; the architecture elsewhere)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(with_triton: bool = False) -> str:
    """'torch X, triton Y, Python Z' (triton only where asked and importable)."""
    parts = [f"torch {torch.__version__}"]
    if with_triton:
        try:
            import triton
            parts.append(f"triton {triton.__version__}")
        except ImportError:
            pass
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def environment(device: str = "cpu") -> str:
    """One line for a table's header: the device, the threads (CPU), the versions."""
    if device == "cuda":
        return f"{device_name(device)}, {versions(with_triton=True)}"
    return f"{device_name(device)}, {torch.get_num_threads()} threads, {versions()}"


# What a failed measurement raises (out of memory for an unfused path, say): the row records it and
# the table goes on with the other implementations.
MEASURE_ERRORS = (RuntimeError, torch.OutOfMemoryError)


def record_failure(row: dict, e: BaseException, device: str = "cpu") -> None:
    """Marks a table row as failed (the error's first line) and, on CUDA, releases the cached blocks
    so that the next implementation starts from free memory."""
    row["error"] = str(e).splitlines()[0][:120]
    if device == "cuda":
        torch.cuda.empty_cache()


def emit_row(rows: list, row: dict, log=print) -> None:
    """Appends a finished table row and logs it as one JSON line (log=None: silent), so that a long
    run shows its rows as they come and its log can be parsed."""
    rows.append(row)
    if log:
        log(json.dumps(row))


def parse_sizes(triples: list[str] | None):
    """`--sizes 256,1000,128 ...` as [(B, C, D), ...], or None where none were given."""
    return [tuple(int(v) for v in s.split(",")) for s in triples] if triples else None
