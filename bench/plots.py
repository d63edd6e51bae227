"""PNG plots of the tables in bench/RESULTS.md (no measuring: reads what the scripts wrote).

* perturb_pass.png: ns/element of one pass per variant, fp32 and bf16 (wall median),
  with the MeZO reference and the memory-bound floor;
* step_time.png: step / (2 x forward) per setup (CPU-time ratio where recorded, else
  wall), both batch sizes, with the 1.10 and 1.25 goals;
* memory.png: steady peak of each workload / inference, with the 1.05 goal.

Writes bench/plots/*.png and a `plots` section of RESULTS.md linking them.
"""
from __future__ import annotations

import re

import _common as C  # noqa: E402

OUT = C.BENCH / "plots"


def table(section: str) -> list[dict]:
    text = C.RESULTS.read_text()
    m = re.search(rf"<!-- BEGIN {re.escape(section)} -->(.*?)<!-- END {re.escape(section)} -->", text, re.S)
    if not m:
        return []
    lines = [ln for ln in m.group(1).splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) == len(head):
            rows.append(dict(zip(head, cells)))
        if ln.startswith("| dtype | statistic"):  # the second table of perturb_pass starts here
            break
    return rows


def num(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return float("nan")


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(exist_ok=True)
    made = []

    rows = [r for r in table("perturb_pass") if "pass" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        names = [r["pass"] for r in rows if r["dtype"] == "float32"]
        for k, dt in enumerate(("float32", "bfloat16")):
            vals = [num(r["wall ns/el median"]) for r in rows if r["dtype"] == dt]
            ax.bar([i + 0.4 * k for i in range(len(vals))], vals, width=0.4, label=dt)
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=20, ha="right")
        ax.set(ylabel="ns / element (wall median)", yscale="log",
               title="one perturbation pass, SmolLM2-135M shape (lower is better)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "perturb_pass.png", dpi=110)
        made.append("perturb_pass.png")

    rows = table("step_time-t1") + table("step_time-t1-b16x256")
    if rows:
        fig, ax = plt.subplots(figsize=(9, 4))
        labels, vals = [], []
        for r in rows:
            cpu = num(r.get("CPU-time step / (2 fwd)", "-"))
            vals.append(cpu if cpu == cpu else num(r["step / (2 fwd)"]))
            setup = re.sub(r" \(\d passes\)", "", r["setup"]).replace("fuse_update=", "fuse=")
            labels.append(f"{r['model']} {r['batch x seq']}\n{setup}")
        ax.barh(range(len(vals)), vals)
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        ax.axvline(1.10, color="k", ls="--", lw=1, label="goal 1 rank: 1.10")
        ax.axvline(1.25, color="gray", ls=":", lw=1, label="goal 2 ranks: 1.25")
        ax.set(xlabel="ZO step / (2 x forward)  (CPU time at 1 rank, wall for 2 ranks)", xlim=(0.9, None),
               title="step time vs two forwards")
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / "step_time.png", dpi=110)
        made.append("step_time.png")

    rows = [r for r in table("memory") if "workload" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        labels = [f"{r['dtype']} {r['workload'][:28]}" for r in rows]
        vals = [num(r["steady / infer loss"]) for r in rows]
        ax.barh(range(len(vals)), vals)
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        ax.axvline(1.05, color="k", ls="--", lw=1, label="goal: ZO step <= 1.05 x inference")
        ax.set(xlabel="steady peak RSS / inference (same dtype)", title="peak memory, OPT-125m shape, 8 x 128")
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / "memory.png", dpi=110)
        made.append("memory.png")

    body = ("Drawn from the tables above by `python bench/plots.py` (no new measurement).\n\n"
            + "\n".join(f"![{m}](plots/{m})" for m in made) + "\n")
    C.write_section("plots", "plots.py: the tables above as PNG", body, info=C.machine())
    print("wrote", ", ".join(made))


if __name__ == "__main__":
    main()
