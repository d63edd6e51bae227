"""Perturb on read (zo.perturb=forward) against partition mode and a naive MeZO step, side by side.

Part 1, one process (world size 1): **the default job's step** (``zo-deepspeed train`` with no arguments:
SmolLM2-135M-Instruct, Rotten Tomatoes, batch 16, the ``choice`` objective; each variant is a real
``Trainer`` whose ``train_step()`` is timed, so every variant sees the same batch at the same step):

* ``default`` : the embedded default now: a replica (stage 0) at world size 1, zo.perturb=forward;
* ``stage 0 partition`` : the same layout, zo.perturb=partition (restore inplace, fuse_update on);
* ``ZeRO-3 partition`` : the previous default (the embedded ZeRO-3 config at world size 1, partition mode);
* ``naive MeZO`` : MeZO's reference step on a plain copy of the model: per parameter ``torch.manual_seed`` +
  ``torch.normal`` for each of its four passes (+eps z, -2 eps z, +eps z restore, update) and two sequential
  forwards, on the same examples with the same loss;
* ``forward`` : one loss evaluation of the replica at theta (the denominator of step / (2 x forward)).

Part 2, two gloo ranks (the deepspeed launcher, one thread each), an OPT-125m-shaped model under ZeRO-3
(persistence threshold 0) and ZeRO-3 + offload_param cpu, each mode on the same batches: step time, one
forward, step / (2 x forward), the bytes DeepSpeed's comms logger saw all-gathered per step and rank (the
step profile), and the elements of this rank's partition the step wrote (under offload: the host's work).

Goals (issue "Perturb on read"): default step >= 1.8x faster than naive MeZO; ZeRO-3 gathers one forward's
worth per step; under offload the host edits <= 1x its partition per step.

    TORCHINDUCTOR_COMPILE_THREADS=1 python bench/perturb_read.py [--repeats 5] [--no-multirank]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C  # noqa: I001  (puts the repository root on sys.path)
import torch

LR, EPS = 1e-5, 1e-3


# ------------------------------------------------------------------------------ part 1: the default job
class NaiveMeZO:
    """MeZO's step as its reference implementation writes it (the baseline the issue measures against):
    z regenerated per parameter from torch's global RNG for every pass, ``p.data = p.data + s * eps * z``."""

    def __init__(self, model, objective, train, batch_size: int, seed: int = 0):
        self.model, self.objective, self.train, self.bs, self.seed = model, objective, train, batch_size, seed
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.t = 0

    def _perturb(self, zseed: int, scale: float) -> None:
        torch.manual_seed(zseed)  # bench code, not library code
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * EPS * z

    @torch.no_grad()
    def step(self) -> None:
        from zo_deepspeed.trainer import batch_indices

        ids = batch_indices(self.seed, self.t, len(self.train), self.bs)
        batch = self.objective.batch([self.train[i] for i in ids])
        zseed = 1_000_003 * (self.t + 1)

        def loss() -> float:
            s, c = self.objective(self.model, batch)
            return float(s / c)

        self._perturb(zseed, 1.0)
        lp = loss()
        self._perturb(zseed, -2.0)
        lm = loss()
        self._perturb(zseed, 1.0)
        g = (lp - lm) / (2 * EPS)
        torch.manual_seed(zseed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data - LR * g * z
        self.t += 1


def default_job(args) -> tuple[list[list], dict]:
    from transformers import AutoModelForCausalLM

    from zo_deepspeed.run_config import load_run_config
    from zo_deepspeed.trainer import Trainer, batch_indices

    tmp = Path(tempfile.mkdtemp(prefix="perturb_read_"))
    base = ["train.zero_shot_eval=false", "train.export=false", f"zo.lr={LR}", f"zo.eps={EPS}"]

    def trainer(name: str, *extra: str) -> Trainer:
        return Trainer(load_run_config(None, [*base, f"train.output_dir={tmp / name}", *extra]))

    # stage-0 engines first: a ZeRO-3 engine keeps HfDeepSpeedConfig alive, and every later from_pretrained
    # in this process would then be partitioned at load
    trainers = {"default": trainer("default"),
                "stage 0 partition": trainer("z0_partition", "zo.perturb=partition")}
    ref = trainers["default"]
    plain = AutoModelForCausalLM.from_pretrained(ref.setup.model_path).eval()
    naive = NaiveMeZO(plain, ref.objective, ref.setup.splits["train"], ref.cfg.train.batch_size)
    ids = batch_indices(0, 0, len(ref.setup.splits["train"]), ref.cfg.train.batch_size)
    batch0 = ref.objective.batch([ref.setup.splits["train"][i] for i in ids])
    fwd_model = AutoModelForCausalLM.from_pretrained(ref.setup.model_path).eval()

    @torch.no_grad()
    def forward():
        ref.objective(fwd_model, batch0)

    from zo_deepspeed.run_config import DEFAULT_DS_CONFIG

    z3 = tmp / "zero3.json"
    z3.write_text(json.dumps(DEFAULT_DS_CONFIG))
    trainers["ZeRO-3 partition"] = trainer("z3_partition", "zo.perturb=partition", f"deepspeed={z3}")
    variants = {name: t.train_step for name, t in trainers.items()}
    variants["naive MeZO"] = naive.step
    variants["forward"] = forward
    for name, fn in variants.items():  # warm-up: compiles the fused kernels, faults pages in
        for _ in range(2 if name != "forward" else 1):
            print(f"  warm-up {name:18s} {C.timed(fn):7.2f} s", flush=True)
    cpu: dict = {}
    times = C.interleaved(variants, args.repeats, cpu=cpu)
    prof = {name: t.train_step().profile for name, t in trainers.items()}
    f = C.med(times["forward"])
    naive_t = C.med(times["naive MeZO"])
    rows = []
    for name in ("default", "stage 0 partition", "ZeRO-3 partition", "naive MeZO"):
        s = C.med(times[name])
        p = prof.get(name)
        layout = {"default": "stage 0", "stage 0 partition": "stage 0", "ZeRO-3 partition": "ZeRO-3 (ws 1)",
                  "naive MeZO": "plain module"}[name]
        mode = {"default": "forward", "naive MeZO": "MeZO reference"}.get(name, "partition")
        goal = "-" if name != "default" else ("met" if naive_t / s >= 1.8 else f"missed ({naive_t / s:.2f}x < 1.8x)")
        rows.append([name, layout, mode, s, C.spread(times[name]), C.med(cpu[name]), naive_t / s, s / (2 * f),
                     p.forward_s if p else "-", p.edit_s if p else "-", p.edited / 1e6 if p else "-", goal])
        print(f"  {name:18s} {s:7.3f} s/step  naive/this {naive_t / s:5.2f}x  step/(2 fwd) {s / (2 * f):5.2f}")
    n = sum(p.numel() for p in plain.parameters())
    return rows, {"forward": f, "params": n, "quiet": C.quiet_note()}


# ------------------------------------------------------------------------------ part 2: two ranks
def worker(spec_path: str) -> None:
    """Runs on every rank under the deepspeed launcher: both modes, the same batches."""
    import zo_deepspeed as zd
    from zo_deepspeed.distributed import shard_batch
    from zo_deepspeed.engine import causal_lm_loss

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    full = C.make_batch(C.model_config(spec["model"]).vocab_size, spec["batch"], spec["seq"])
    out = {}
    for layout in ("zero3", "offload"):
        zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
        if layout == "offload":
            zero["offload_param"] = {"device": "cpu"}
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
              "comms_logger": {"enabled": True, "verbose": False, "prof_all": True}}
        for mode in ("forward", "partition"):
            eng = zd.initialize(lambda: C.build_model(spec["model"], torch.float32), ds,
                                zd.ZOConfig(lr=LR, eps=EPS, perturb=mode))
            batch = shard_batch(full)

            def timed_max(fn) -> float:
                torch.distributed.barrier()
                t = torch.tensor([C.timed(fn)], dtype=torch.float64)
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                return float(t)

            @torch.no_grad()
            def fwd():
                causal_lm_loss(eng.forward, batch)

            eng.step(batch)  # warm-up: compile, first gathers
            fwd()
            res = {"step": [], "forward": [], "gathered": [], "edited": []}
            for _ in range(spec["repeats"]):
                res["forward"].append(timed_max(fwd))
                r = None

                def step():
                    nonlocal r
                    r = eng.step(batch)
                res["step"].append(timed_max(step))
                res["gathered"].append(r.profile.gathered_bytes)
                res["edited"].append(r.profile.edited)
            res["local_numel"] = eng.parts.local_numel()
            out[f"{layout} {mode}"] = res
            del eng
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(out))


def multirank(args) -> list[list]:
    tmp = Path(tempfile.mkdtemp(prefix="perturb_read_mr_"))
    spec = {"model": "opt-125m", "batch": 8, "seq": 64, "repeats": args.repeats, "out": str(tmp / "out.json")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(C.free_port()),
           __file__, "--worker", str(tmp / "spec.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"2-rank run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = json.loads(Path(spec["out"]).read_text())
    rows = []
    for layout in ("zero3", "offload"):
        part_g = C.med(res[f"{layout} partition"]["gathered"])
        for mode in ("forward", "partition"):
            r = res[f"{layout} {mode}"]
            s, f, g, e = C.med(r["step"]), C.med(r["forward"]), C.med(r["gathered"]), C.med(r["edited"])
            rows.append([layout, mode, s, C.spread(r["step"]), f, s / (2 * f), g / 2**20,
                         f"{g / part_g:.2f}" if part_g else "-", e / r["local_numel"]])
            print(f"  {layout:8s} {mode:9s} {s:7.3f} s/step  step/(2 fwd) {s / (2 * f):5.2f}  gathered "
                  f"{g / 2**20:7.1f} MiB  edited {e / r['local_numel']:.2f}x partition", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-multirank", dest="multirank", action="store_false")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    C.add_threads_arg(ap)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    suffix = C.apply_threads(args)
    info = C.machine()
    rows, extra = default_job(args)
    body = ("Part 1: the default job's step at world size 1 (SmolLM2-135M-Instruct, "
            f"{extra['params'] / 1e6:.1f} M parameters, Rotten Tomatoes, batch 16, `choice` objective), each variant a "
            f"real Trainer's train_step(); medians of {args.repeats} interleaved repeats after warm-up. One forward "
            f"(the choice loss of the same batch at theta): {extra['forward']:.3f} s. {extra['quiet']} Profile "
            "columns: the step profile of one more step (zo_deepspeed/profile.py).\n\n"
            + C.table(["variant", "layout", "perturbation", "s / step", "min..max", "CPU s / step",
                       "naive MeZO / this", "step / (2 fwd)", "forward s", "edit s", "edited M el.",
                       "goal: >= 1.8x naive"], rows) + "\n")
    if args.multirank:
        mrows = multirank(args)
        body += ("\nPart 2: 2 gloo ranks, OPT-125m shape, global batch 8 x 64, ZeRO-3 (persistence threshold 0) "
                 "and ZeRO-3 + offload_param cpu. Gathered: DeepSpeed's comms logger, all-gather bytes per step "
                 "and rank. Edited: elements of this rank's partition written per step / its partition "
                 "(under offload the partition is in host memory: the host's z work).\n\n"
                 + C.table(["layout", "perturbation", "s / step", "min..max", "forward s", "step / (2 fwd)",
                            "gathered MiB / step", "gathered / partition mode's", "edited / partition"], mrows)
                 + "\n")
    print("\n" + body)
    if not args.no_write:
        C.write_section("perturb_read" + suffix, "perturb_read.py: perturb on read vs partition mode vs naive MeZO",
                        body, info=info)


if __name__ == "__main__":
    main()
