"""GPU benchmarks: perturbation-pass bandwidth, ZO step vs 2 x forward, one ZO step of OPT-30B.

For a lent H100/H200 (PyTorch + Triton installed, no network): every model is built
from a config in ``zo_deepspeed/model_configs`` with random weights, directly on the
device. ``bench/gpu.sh`` runs this with the defaults and prints the command.

Parts (``--parts pass,step,opt30b``):

* **pass**: one perturbation pass over a flat tensor of ``--numel`` elements (bf16
  and fp32), in GB/s of the bytes the pass must move (read + write of the tensor;
  6 B/element for the master pass: read the float32 copy, write the bf16 weights),
  next to a device-to-device copy of the same tensor (``y.copy_(x)``, the bandwidth
  ceiling) and the MeZO reference (``torch.manual_seed``, ``z = torch.normal(...)``,
  ``x.data = x.data + eps*z``, counted with the same bytes). The library's pass runs
  in chunks (``zo_deepspeed.fused.accelerator_chunk`` elements on a GPU, 64 Mi), one
  kernel launch and a few host-side tensors per chunk; it is timed with the CPU
  default ``fused.default_chunk`` (1 Mi) and with ``--big-chunk`` elements per chunk
  to show the per-chunk cost.
* **step**: one ZO step / (2 x one forward) for a ~1B model (``--step-model``,
  default opt-1.3b, batch x seq ``--batch``/``--seq``), restore inplace and master,
  default and big chunk; plus the time of one weight pass over the whole model.
* **opt30b**: one ZO step of an OPT-30B-shaped model, random bf16 weights built on the
  device (~56 GiB), the allocator capped at ``--mem-cap-gib`` (default 80: an 80 GB
  H100 on a larger GPU), batch 1 x 400 tokens (the MeZO paper's Table 22 setting:
  58 GB on an A100-80GB in fp16) and, with ``--big-batch``, 16 x 400 (Table 23: 5.9 s
  per step on an A100). ``zo.restore=inplace`` (MeZO's scheme): a master copy would
  need 112 GiB more. Reports time, ``torch.cuda.max_memory_allocated``,
  ``max_memory_reserved`` and the device memory in use (``mem_get_info``, context
  included), next to the planner's estimate for the same setting.

``--smoke``: tiny shapes that run on the CPU in seconds (eager fused pass), for the
test that keeps this script working; nothing is written to RESULTS.md.

    bash bench/gpu.sh
    python bench/gpu.py --smoke --no-write
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import _common as C  # noqa: I001  (puts the repository root on sys.path)
import torch

import zo_deepspeed as zd
from zo_deepspeed import fused
from zo_deepspeed.engine import causal_lm_loss
from zo_deepspeed.fused import Term
from zo_deepspeed.planner import CONFIG_DIR, CONSTANTS, GiB
from zo_deepspeed.planner import plan as make_plan
from zo_deepspeed.rng import stream_key

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMOKE_OPT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32,
                 vocab_size=128, max_position_embeddings=64)


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def med(xs) -> float:
    return statistics.median(xs)


def model_config(name: str, smoke: bool):
    from transformers import AutoConfig, OPTConfig

    if smoke:
        return OPTConfig(**SMOKE_OPT)
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def build_on_device(cfg, dtype: torch.dtype, dev: torch.device):
    """Random weights created directly on ``dev`` in ``dtype`` (HF init, no host copy, no download)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(dev):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return m.eval()


def make_batch(vocab: int, batch: int, seq: int, dev: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {k: v.to(dev) for k, v in b.items()}


def mem_now(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(dev)
    return {"max_allocated": torch.cuda.max_memory_allocated(dev), "max_reserved": torch.cuda.max_memory_reserved(dev),
            "device_used": total - free, "device_total": total}


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


# ---------------------------------------------------------------------------- part 1: pass bandwidth
def part_pass(args, dev) -> dict:
    compiled = dev.type == "cuda" and not args.eager
    n = args.numel
    rows = []
    for dname in ("bf16", "fp32"):
        dtype = DTYPES[dname]
        x = torch.empty(n, device=dev, dtype=dtype).normal_(0, 0.02)
        y = torch.empty_like(x)
        es = x.element_size()
        k1, k2 = stream_key(1, "bench.x"), stream_key(2, "bench.x")
        variants = {
            "device-to-device copy": (lambda: y.copy_(x), 2 * n * es),
            "add_ (in-place floor)": (lambda: x.add_(1e-7), 2 * n * es),
            f"fused 1-term, chunk {fused.default_chunk}": (
                lambda: fused.apply(x, 0, [Term(k1, 1e-3)], compiled=compiled, chunk=fused.default_chunk),
                2 * n * es),
            f"fused 1-term, chunk {args.big_chunk}": (
                lambda: fused.apply(x, 0, [Term(k1, 1e-3)], compiled=compiled, chunk=args.big_chunk), 2 * n * es),
            f"fused 2-term, chunk {fused.default_chunk}": (
                lambda: fused.apply(x, 0, [Term(k1, 1e-3), Term(k2, -1e-3)], compiled=compiled,
                                    chunk=fused.default_chunk), 2 * n * es),
            f"fused 2-term, chunk {args.big_chunk}": (
                lambda: fused.apply(x, 0, [Term(k1, 1e-3), Term(k2, -1e-3)], compiled=compiled,
                                    chunk=args.big_chunk), 2 * n * es),
        }
        if dtype != torch.float32:
            base = x.float()
            variants[f"fused master (x = base32 + eps z), chunk {args.big_chunk}"] = (
                lambda: fused.apply(x, 0, [Term(k1, 1e-3)], base=base, compiled=compiled, chunk=args.big_chunk),
                n * (4 + es))

        def mezo_reference():
            torch.manual_seed(1234)
            z = torch.normal(mean=0.0, std=1.0, size=x.shape, device=dev, dtype=dtype)
            x.data = x.data + 1e-3 * z

        variants["MeZO reference (torch.normal, out of place)"] = (mezo_reference, 2 * n * es)
        times = {k: [] for k in variants}
        for k, (fn, _) in variants.items():  # warm-up (compiles the fused kernels)
            fn()
        sync(dev)
        names = list(variants)
        for r in range(args.repeats):
            for k in names[r % len(names):] + names[:r % len(names)]:
                times[k].append(timed(variants[k][0], dev))
        copy_gbs = 2 * n * es / med(times["device-to-device copy"]) / 1e9
        for k, (_, nbytes) in variants.items():
            t = med(times[k])
            gbs = nbytes / t / 1e9
            rows.append([dname, k, f"{n / 2**20:g} Mi", t * 1e3, min(times[k]) * 1e3, gbs, gbs / copy_gbs,
                         t / n * 1e9])
            log(f"pass {dname:5s} {k:50s} {t * 1e3:9.3f} ms  {gbs:8.1f} GB/s  ({gbs / copy_gbs:.2f} x copy)")
        del x, y, variants
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    table = C.table(["dtype", "pass", "elements", "ms median", "ms min", "GB/s", "/ copy GB/s", "ns/element"], rows)
    return {"rows": rows, "table": table, "compiled": compiled}


# ---------------------------------------------------------------------------- part 2: step vs 2 x forward
def part_step(args, dev) -> dict:
    cfg = model_config(args.step_model, args.smoke)
    dtype = DTYPES[args.dtype]
    t = time.perf_counter()
    model = build_on_device(cfg, dtype, dev)
    build_s = time.perf_counter() - t
    nparam = sum(p.numel() for p in model.parameters())
    batch = make_batch(cfg.vocab_size, args.batch, args.seq, dev)
    compiled = dev.type == "cuda" and not args.eager
    log(f"step: {args.step_model if not args.smoke else 'smoke OPT'} {nparam / 1e9:.3f} B params, {args.dtype}, "
        f"batch {args.batch} x {args.seq}, built on {dev} in {build_s:.1f} s")

    @torch.no_grad()
    def forward():
        causal_lm_loss(model, batch)

    rows = []
    default_chunk, accel_chunk = fused.default_chunk, fused.accelerator_chunk
    for restore in ("inplace", "master"):
        for chunk in (default_chunk, args.big_chunk):
            fused.default_chunk = fused.accelerator_chunk = chunk  # CPU and accelerator defaults alike
            eng = zd.initialize(model, None, zd.ZOConfig(lr=1e-6, eps=1e-3, restore=restore, compile=compiled))
            eng.step(batch)  # compile + first pending update
            eng.step(batch)
            forward()
            fwd, step, passes = [], [], []
            for r in range(args.repeats):
                order = [("fwd", forward), ("step", lambda: eng.step(batch))]
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    (fwd if name == "fwd" else step).append(timed(fn, dev))
            # one weight pass over the whole model: alternate between two offsets (each call is one pass)
            for r in range(args.repeats):
                passes.append(timed(lambda: eng.state.transition(None, [(777, 1e-3 if r % 2 else -1e-3)]), dev))
            eng.flush()
            ratio = med(step) / (2 * med(fwd))
            pbytes = nparam * (2 * dtype.itemsize if restore == "inplace" else (4 + dtype.itemsize))
            rows.append([restore, chunk, med(fwd) * 1e3, med(step) * 1e3, ratio, med(passes) * 1e3,
                         pbytes / med(passes) / 1e9])
            log(f"step restore={restore:7s} chunk={chunk:>10d}: forward {med(fwd) * 1e3:8.2f} ms, step "
                f"{med(step) * 1e3:8.2f} ms, step/(2 fwd) {ratio:.2f}, one pass {med(passes) * 1e3:.2f} ms")
            del eng
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    fused.default_chunk, fused.accelerator_chunk = default_chunk, accel_chunk
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    table = C.table(["zo.restore", "chunk (elements)", "forward ms", "ZO step ms", "step / (2 x forward)",
                     "one weight pass ms", "pass GB/s (bytes moved)"], rows)
    return {"rows": rows, "table": table, "params": nparam, "build_s": build_s}


# ---------------------------------------------------------------------------- part 3: OPT-30B on one GPU
def part_opt30b(args, dev) -> dict:
    cfg = model_config("opt-30b", args.smoke)
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        if args.mem_cap_gib and args.mem_cap_gib * GiB < total:
            torch.cuda.set_per_process_memory_fraction(args.mem_cap_gib * GiB / total, dev)
            log(f"opt30b: allocator capped at {args.mem_cap_gib:g} GiB of {total / GiB:.1f} GiB")
    reset_peak(dev)
    t = time.perf_counter()
    model = build_on_device(cfg, torch.bfloat16, dev)
    sync(dev)
    build_s = time.perf_counter() - t
    nparam = sum(p.numel() for p in model.parameters())
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"opt30b: {nparam / 1e9:.2f} B params, {wbytes / GiB:.2f} GiB of bf16 weights built on {dev} "
        f"in {build_s:.1f} s")
    compiled = dev.type == "cuda" and not args.eager
    eng = zd.initialize(model, None, zd.ZOConfig(lr=1e-6, eps=1e-3, restore="inplace", compile=compiled))
    plan_model = "opt-30b" if not args.smoke else _smoke_config_path(cfg)
    settings = [(1, args.seq30)] + ([(16, args.seq30)] if args.big_batch else [])
    rows, raw = [], []
    default_chunk, accel_chunk = fused.default_chunk, fused.accelerator_chunk
    for bsz, seq in settings:
        batch = make_batch(cfg.vocab_size, bsz, seq, dev)
        for chunk in (default_chunk, args.big_chunk):
            fused.default_chunk = fused.accelerator_chunk = chunk  # CPU and accelerator defaults alike
            rec = {"batch": bsz, "seq": seq, "chunk": chunk}
            try:
                rec["first_step_s"] = timed(lambda: eng.step(batch), dev)  # includes kernel compiles
                with torch.no_grad():
                    rec["forward_s"] = med([timed(lambda: causal_lm_loss(model, batch), dev) for _ in range(2)])
                reset_peak(dev)
                steps = [timed(lambda: eng.step(batch), dev) for _ in range(args.steps30)]
                rec.update(step_s=med(steps), steps_s=steps, **mem_now(dev))
            except torch.cuda.OutOfMemoryError as e:  # pragma: no cover (GPU only)
                rec["error"] = "OOM: " + str(e).splitlines()[0][:200]
                gc.collect()
                torch.cuda.empty_cache()
            try:
                est = make_plan(plan_model, 1, 1,
                                args.mem_cap_gib or 80, 1024, "none", "bf16", bsz, seq, "inplace", "same")
                g = est.chosen.per_gpu
                rec["plan_total"] = est.chosen.gpu_total
                rec["plan_allocator"] = est.chosen.gpu_total - g["cuda_context"] - g["fragmentation"] - g["nccl"]
                rec["plan_activations"] = g["activations"]
            except ValueError as e:
                rec["plan_error"] = str(e)
            raw.append(rec)
            log(f"opt30b batch {bsz} x {seq} chunk {chunk}: " + json.dumps(
                {k: (round(v / GiB, 2) if k.startswith(("max_", "device_", "plan_")) and isinstance(v, int)
                     else (round(v, 3) if isinstance(v, float) else v)) for k, v in rec.items() if k != "steps_s"}))
            if "error" in rec:
                break
    fused.default_chunk, fused.accelerator_chunk = default_chunk, accel_chunk
    if args.smoke:
        shutil.rmtree(plan_model, ignore_errors=True)
    for r in raw:
        gib = lambda k: (f"{r[k] / GiB:.2f}" if k in r else "n/a")  # noqa: E731
        rows.append([f"{r['batch']} x {r['seq']}", r["chunk"],
                     f"{r['step_s']:.3f}" if "step_s" in r else r.get("error"),
                     f"{r['forward_s']:.3f}" if "forward_s" in r else "n/a",
                     f"{r['step_s'] / (2 * r['forward_s']):.2f}" if "step_s" in r else "n/a",
                     gib("max_allocated"), gib("plan_allocator"), gib("max_reserved"), gib("device_used"),
                     gib("plan_total")])
    table = C.table(["batch x seq", "chunk", "ZO step s", "forward s", "step / (2 x fwd)",
                     "max allocated GiB", "planner: allocator GiB", "max reserved GiB", "device used GiB",
                     "planner: total GiB"], rows)
    del eng, model
    gc.collect()
    return {"rows": rows, "table": table, "raw": raw, "params": nparam, "weights_gib": wbytes / GiB,
            "build_s": build_s}


def _smoke_config_path(cfg) -> str:
    import tempfile

    d = tempfile.mkdtemp(prefix="zo_gpu_smoke_")
    cfg.to_json_file(os.path.join(d, "config.json"))
    return d


# ---------------------------------------------------------------------------- report
def device_info(dev: torch.device) -> str:
    if dev.type != "cuda":
        return f"device: {dev} (no CUDA: smoke run)"
    p = torch.cuda.get_device_properties(dev)
    try:
        import triton

        tv = triton.__version__
    except ImportError:  # pragma: no cover
        tv = "not installed"
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        drv = "unknown"
    return (f"device: {p.name}, {p.total_memory / GiB:.1f} GiB, {p.multi_processor_count} SMs; driver {drv}, "
            f"CUDA {torch.version.cuda}, triton {tv}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="pass,step,opt30b", help="comma-separated: pass, step, opt30b")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU in seconds (implies --no-write)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu (smoke only)")
    ap.add_argument("--numel", type=int, default=None, help="elements of the pass tensor (default 2**28; smoke 2**12)")
    ap.add_argument("--big-chunk", type=int, default=None, help="elements per chunk of the big-chunk variants "
                                                                 "(default 2**26; smoke 2**10)")
    ap.add_argument("--step-model", default="opt-1.3b", help="model_configs name for the step part")
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="dtype of the step part")
    ap.add_argument("--batch", type=int, default=None, help="step part batch (default 8; smoke 2)")
    ap.add_argument("--seq", type=int, default=None, help="step part tokens (default 512; smoke 16)")
    ap.add_argument("--seq30", type=int, default=None, help="opt30b tokens per example (default 400; smoke 16)")
    ap.add_argument("--steps30", type=int, default=None, help="timed opt30b steps per setting (default 2; smoke 1)")
    ap.add_argument("--big-batch", action="store_true", help="opt30b: also batch 16 (MeZO Table 23 setting)")
    ap.add_argument("--mem-cap-gib", type=float, default=80.0,
                    help="cap the allocator (set_per_process_memory_fraction) for opt30b; 0: no cap")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; smoke 1)")
    ap.add_argument("--eager", action="store_true", help="use the eager fused pass (no torch.compile)")
    ap.add_argument("--json-out", default=None, help="also write the raw results to this JSON file")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda" and not args.smoke:
        raise SystemExit("bench/gpu.py: no CUDA device here; run it on a GPU machine (bench/gpu.sh), "
                         "or pass --smoke for a tiny CPU dry run")
    s = args.smoke
    args.numel = args.numel or (1 << 12 if s else 1 << 28)
    args.big_chunk = args.big_chunk or (1 << 10 if s else 1 << 26)
    args.batch = args.batch or (2 if s else 8)
    args.seq = args.seq or (16 if s else 512)
    args.seq30 = args.seq30 or (16 if s else 400)
    args.repeats = args.repeats or (1 if s else 10)
    args.steps30 = args.steps30 or (1 if s else 2)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"pass", "step", "opt30b"}
    if unknown:
        raise SystemExit(f"bench/gpu.py: unknown part(s) {sorted(unknown)}; use pass, step, opt30b")
    write = not (args.no_write or args.smoke)
    info = C.machine() if write else None  # imports deepspeed: only when writing RESULTS.md
    log(device_info(dev))
    t0 = time.perf_counter()
    res = {}
    if "pass" in parts:
        res["pass"] = part_pass(args, dev)
    if "step" in parts:
        res["step"] = part_step(args, dev)
    if "opt30b" in parts:
        res["opt30b"] = part_opt30b(args, dev)
    wall = time.perf_counter() - t0
    body = [f"{device_info(dev)}. Random weights built on the device; no network. Total wall time {wall:.0f} s.\n"]
    if "pass" in res:
        body.append(f"### Perturbation pass ({'compiled, Triton' if res['pass']['compiled'] else 'eager'})\n\n"
                    "GB/s of the bytes the pass must move (read + write of the tensor; the master pass reads the "
                    "float32 copy and writes the bf16 weights, 6 B/element); `/ copy` is against the "
                    "device-to-device copy of the same tensor. The library chunks every pass into "
                    "`fused.default_chunk` elements (one kernel launch plus host-side index/key tensors per chunk); "
                    "the big-chunk rows show the pass without that per-chunk cost.\n\n" + res["pass"]["table"] + "\n")
    if "step" in res:
        r = res["step"]
        body.append(f"### ZO step vs 2 x forward ({args.step_model}, {r['params'] / 1e9:.2f} B parameters, "
                    f"{args.dtype}, batch {args.batch} x {args.seq})\n\n"
                    "Forward = `causal_lm_loss` under no_grad (what a step runs twice). Medians of "
                    f"{args.repeats}, forward and step interleaved. One weight pass = one "
                    "`WeightState.transition` over every parameter.\n\n" + r["table"] + "\n")
    if "opt30b" in res:
        r = res["opt30b"]
        body.append(f"### One ZO step of OPT-30B on one GPU ({r['params'] / 1e9:.2f} B parameters, "
                    f"{r['weights_gib']:.1f} GiB bf16, built in {r['build_s']:.0f} s)\n\n"
                    f"Allocator capped at {args.mem_cap_gib:g} GiB; zo.restore=inplace, fuse_update on; step times "
                    f"are medians of {args.steps30} after a first step (kernel compiles). Peaks over the timed steps. "
                    "`planner: allocator` = the planner's per-GPU total less the CUDA context and fragmentation "
                    "allowances (what max_memory_allocated should show); `device used` includes the CUDA context "
                    f"(planner allowance {CONSTANTS['cuda_context_gib']} GiB). MeZO paper: 58 GB on one "
                    "A100-80GB (fp16, batch 1, MultiRC ~400 tokens); 5.9 s per step at batch 16.\n\n"
                    + r["table"] + "\n")
    text = "\n".join(body)
    print("\n" + text)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "device": device_info(dev), "wall_s": wall,
                       "results": {k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in res.items()}},
                      f, indent=2, default=str)
    if write:
        C.write_section("gpu", "gpu.py: perturbation pass, step vs forward, OPT-30B on one GPU", text, info=info)


if __name__ == "__main__":
    sys.exit(main())
