"""Shared helpers for the benchmarks: model shapes, timing, machine info, RESULTS.md sections.

Not a benchmark itself. Every script imports it first, which also puts the
repository root on sys.path (the package need not be installed) and defaults
TORCHINDUCTOR_COMPILE_THREADS to 1 (in-process compiles are much faster on a
small machine than spawning a compile worker pool).
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def _argv_threads() -> str | None:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return None


# --threads N must reach OpenMP before torch is imported (inductor's kernels use omp's own count)
THREADS = _argv_threads()
if THREADS:
    os.environ["OMP_NUM_THREADS"] = THREADS
    os.environ["MKL_NUM_THREADS"] = THREADS


def add_threads_arg(ap) -> None:
    ap.add_argument("--threads", type=int, default=None,
                    help="torch/OpenMP threads (default: torch's default, one per core). On a machine shared with "
                         "other jobs, 1 thread leaves a core to them and gives far steadier timings.")


def apply_threads(args) -> str:
    """Set torch threads from --threads; returns the RESULTS.md section suffix ('' or '-t1')."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        return f"-t{args.threads}"
    return ""

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = BENCH / "RESULTS.md"

# ---------------------------------------------------------------------------- models
MODELS = ("smollm2-135m", "opt-125m")


def model_config(name: str, layers: int | None = None):
    """transformers config of a named shape (random init; no download)."""
    if name == "smollm2-135m":
        from transformers import LlamaConfig

        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    elif name == "opt-125m":
        from transformers import OPTConfig

        # OPTConfig's defaults are facebook/opt-125m: hidden 768, 12 layers, ffn 3072, 12 heads, vocab 50272
        cfg = OPTConfig()
    else:
        raise ValueError(f"unknown model {name!r}; use one of {MODELS}")
    if layers is not None:
        cfg.num_hidden_layers = layers
    return cfg


def build_model(name: str, dtype=None, layers: int | None = None, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # built directly in `dtype` (no float32 intermediate, which would inflate peak-memory baselines)
    m = AutoModelForCausalLM.from_config(model_config(name, layers), dtype=dtype or torch.float32)
    m.eval()
    return m


def make_batch(vocab: int, batch: int, seq: int, seed: int = 1) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def free_port() -> int:
    """A TCP port free on this host right now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def n_params(model) -> int:
    return sum(p.numel() for _, p in model.named_parameters())


# ---------------------------------------------------------------------------- timing
def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def med(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> str:
    """'min..max' of a sample, for the noise column."""
    return f"{min(xs):.3g}..{max(xs):.3g}"


def _cpu_busy(window: float) -> float:
    """Fraction of all CPUs busy during ``window`` seconds (while this process sleeps: other jobs' load)."""
    def read():
        v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        idle = v[3] + v[4]  # idle + iowait
        return sum(v), idle
    t0, i0 = read()
    time.sleep(window)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


QUIET = {"threshold": 0.3, "max_wait": 3.0, "window": 0.25}
quiet_stats = {"calls": 0, "quiet": 0, "waited_s": 0.0}


def wait_quiet() -> bool:
    """Wait (at most QUIET['max_wait'] s) until other jobs use < QUIET['threshold'] of the CPUs.

    This machine is shared with a test suite; a 2-thread OpenMP kernel that loses one
    core to another process runs at half speed or worse, so timing only in quiet
    moments makes the variants comparable. Returns whether it was quiet.
    """
    t = time.time()
    quiet_stats["calls"] += 1
    while True:
        if _cpu_busy(QUIET["window"]) < QUIET["threshold"]:
            quiet_stats["quiet"] += 1
            quiet_stats["waited_s"] += time.time() - t
            return True
        if time.time() - t > QUIET["max_wait"]:
            quiet_stats["waited_s"] += time.time() - t
            return False


def quiet_note() -> str:
    q = quiet_stats
    return (f"Each timed call waited for a quiet machine (other jobs < {QUIET['threshold']:.0%} of the CPUs over "
            f"{QUIET['window']} s, at most {QUIET['max_wait']:.0f} s): {q['quiet']}/{q['calls']} calls started "
            f"quiet, {q['waited_s']:.0f} s spent waiting.")


def timed_cpu(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def interleaved(variants: dict, repeats: int, rotate: bool = True, quiet: bool = True,
                cpu: dict | None = None) -> dict[str, list[float]]:
    """Run every variant once per repeat, rotating the order each repeat; wall seconds per call.

    If ``cpu`` is a dict, it receives the process CPU seconds of every call (all threads):
    less sensitive than wall time to other jobs taking cores away, since a descheduled
    thread burns no CPU time (OpenMP spin-waiting still counts).
    """
    names = list(variants)
    out = {n: [] for n in names}
    if cpu is not None:
        cpu.update({n: [] for n in names})
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)] if rotate else names
        for n in order:
            if quiet:
                wait_quiet()
            w, c = timed_cpu(variants[n])
            out[n].append(w)
            if cpu is not None:
                cpu[n].append(c)
    return out


# ---------------------------------------------------------------------------- machine / report
def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import deepspeed  # noqa: F401  (prints an accelerator warning on CPU)

        ds = deepspeed.__version__
    except Exception as e:  # pragma: no cover
        ds = f"unavailable ({type(e).__name__})"
    import transformers

    # nproc honours OMP_NUM_THREADS, which --threads sets: ask it without
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, env=env).stdout.strip() or str(os.cpu_count())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:  # the library changes while benchmarks run: record which code was measured
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "zo_deepspeed"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        lib = f"{head}{' + uncommitted changes in zo_deepspeed/' if dirty else ''}"
    except OSError:
        lib = "unknown"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "nproc": nproc, "cpu": cpu,
            "mem_gb": f"{mem_gb:.0f}", "torch": torch.__version__, "deepspeed": ds,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "load": "%.1f %.1f %.1f" % os.getloadavg(), "library": lib}


def command_line() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("TORCHINDUCTOR_COMPILE_THREADS",) if k in os.environ)
    argv = [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
    return (env + " " if env else "") + "python " + " ".join(shlex.quote(a) for a in argv)


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    rows = [[fmt(v) for v in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, command: str | None = None, info: dict | None = None) -> None:
    """Replace (or append) the section ``name`` of bench/RESULTS.md."""
    info = info or machine()
    command = command or command_line()
    head = (f"## {title}\n\n"
            f"- date: {info['date']} (UTC)\n"
            f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gb']} GB RAM, "
            f"torch threads {info['threads']}; load average at start {info['load']}, "
            f"at end {'%.1f %.1f %.1f' % os.getloadavg()} (other jobs share this machine)\n"
            f"- versions: torch {info['torch']}, deepspeed {info['deepspeed']}, "
            f"transformers {info['transformers']}, python {info['python']}\n"
            f"- library: zo_deepspeed at commit {info.get('library', 'unknown')}\n"
            f"- command: `{command}`\n\n")
    block = f"<!-- BEGIN {name} -->\n{head}{body.rstrip()}\n<!-- END {name} -->\n"
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nEach section is written by its script (see bench/README.md); "
        "rerunning a script replaces its section.\n\n")
    pat = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->\n", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)
    print(f"\nwrote section '{name}' of {os.path.relpath(RESULTS, ROOT)}")
