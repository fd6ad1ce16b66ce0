"""Benchmark ComPEFT: ``adapt compress / decompress / apply`` vs a naive torch script.

Usage::

    python benchmarks/bench_compeft.py --preset small --runs 3 [--densities 0.05,0.1,0.2]
        [--workdir DIR] [--json FILE]
    python benchmarks/bench_compeft.py --naive FT BASE OUT --density 0.1 --alpha 1.0

Inputs are ``base`` and ``ft1`` (and ``ft2`` for the soup reference) of
``make_checkpoints.py`` (reused when present). Every job is a whole process, run once per
round: a warm-up round (page cache, numba cache, adapt's sha256 cache), then ``--runs``
measured rounds, interleaved so that a changing load hits every job alike. Wall time and CPU
time (user + sys of the process and its children) are medians, peak RSS the max of
``ru_maxrss`` from ``os.wait4``. File sizes are read from the container header (this harness
imports neither torch nor adapt: a forked child inherits the parent's high-water RSS).

The naive script is what a research script does: load both state dicts, tau per tensor in
float32, sigma = std of the concatenated update (ddof 1), per-tensor ``torch.topk`` of
``int(density * numel)`` entries, ``sign * alpha * sigma`` and ``save_file`` of the dense
result in the fine-tune's dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import statistics
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench_merge import GB, adapt_prefix, machine_info, prepare, read_all, run_once

HERE = Path(__file__).resolve().parent


def naive(ft: str, base: str, out: str, density: float, alpha: float) -> None:
    """The naive torch ComPEFT (see the module docstring)."""
    import torch
    from naive_torch import load_state_dict
    from safetensors.torch import save_file

    b, f = load_state_dict(base), load_state_dict(ft)
    taus = {k: f[k].float() - v.float() for k, v in b.items() if v.is_floating_point()}
    sigma = torch.cat([t.flatten() for t in taus.values()]).std()
    result = {}
    for k, t in taus.items():
        flat = t.flatten()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.topk(flat.abs(), int(density * flat.numel())).indices] = True
        result[k] = (torch.sign(t) * mask.view_as(t) * alpha * sigma).to(f[k].dtype)
    save_file(result, out)


def container_stats(path: Path) -> dict[str, float]:
    """Size, bits per parameter and the bound H(d) + d from a ComPEFT file's header."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    h = json.loads(meta["adapt_compeft"])
    size = path.stat().st_size
    d = h["coded"] / h["parameters"]
    bound = -d * math.log2(d) - (1 - d) * math.log2(1 - d) + d
    bits = 8 * size / h["parameters"]
    return {"bytes": size, "bits": bits, "bound": bound, "over_bound": bits / bound - 1}


@dataclass
class Job:
    """One command measured in every round."""

    name: str
    density: float | None
    cmd: list[str]
    out: Path
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, object]:
        return {
            "job": self.name,
            "density": self.density,
            "cmd": self.cmd,
            "walls": self.walls,
            "cpus": self.cpus,
            "wall": statistics.median(self.walls),
            "cpu": statistics.median(self.cpus),
            "rss": max(self.rss),
            **self.stats,
        }


def run(job: Job, log: Path, timeout: float, record: bool) -> None:
    """Run a job once (its output removed first); record wall, CPU (children's user + sys
    from ``getrusage``) and peak RSS (``ru_maxrss`` from ``os.wait4``)."""
    _remove(job.out)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, maxrss, _, rc = run_once(job.cmd, log, timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0 or not job.out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"failed (rc={rc}): {shlex.join(job.cmd)}\n" + "\n".join(tail))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if record:
        job.walls.append(wall)
        job.cpus.append(cpu)
        job.rss.append(maxrss)
    tag = "record" if record else "warm-up"
    print(
        f"  {tag} {job.name} d={job.density}: {wall:6.2f} s wall, {cpu:6.2f} s cpu, "
        f"maxrss {maxrss / GB:5.2f} GB",
        flush=True,
    )


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def bench(args: argparse.Namespace) -> dict[str, object]:
    """Every job once per round, rounds interleaved (a warm-up round, then ``--runs``), so that
    a changing load on a shared machine hits every job alike; prints a Markdown table."""
    inp = prepare(args, args.preset, False)
    adapt = adapt_prefix(None)
    if adapt is None:
        raise SystemExit("the adapt CLI is not available")
    work = Path(args.workdir) / "compeft"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "run.log"
    machine = machine_info()
    read_all(inp.files())
    ft, base = str(inp.fts[0]), str(inp.base)
    q = ["--quiet"]
    soup = Job(
        "soup of 2 (adapt merge)",
        None,
        [*adapt, "merge", ft, str(inp.fts[1]), "-o", str(work / "soup"), *q],
        work / "soup",
    )
    jobs, groups = [soup], []
    for d in [float(x) for x in args.densities.split(",")]:
        cpeft = work / f"ft1-{d}.cpeft.safetensors"
        naive_out = work / "naive.safetensors"
        group = {
            "naive": Job(
                "naive torch compress",
                d,
                [
                    sys.executable,
                    __file__,
                    "--naive",
                    ft,
                    base,
                    str(naive_out),
                    "--density",
                    str(d),
                    "--alpha",
                    "1.0",
                ],
                naive_out,
            ),
            "global": Job(
                "adapt compress (global)",
                d,
                [*adapt, "compress", ft, "--base", base, "--density", str(d), "-o", str(cpeft), *q],
                cpeft,
            ),
            "tensor": Job(
                "adapt compress (tensor)",
                d,
                [
                    *adapt,
                    "compress",
                    ft,
                    "--base",
                    base,
                    "--density",
                    str(d),
                    "--scope",
                    "tensor",
                    "-o",
                    str(work / "tensor.cpeft.safetensors"),
                    *q,
                ],
                work / "tensor.cpeft.safetensors",
            ),
            "decompress": Job(
                "adapt decompress",
                d,
                [*adapt, "decompress", str(cpeft), "-o", str(work / "delta.safetensors"), *q],
                work / "delta.safetensors",
            ),
            "apply": Job(
                "adapt apply",
                d,
                [*adapt, "apply", str(cpeft), "--base", base, "-o", str(work / "applied"), *q],
                work / "applied",
            ),
        }
        groups.append(group)
        jobs += group.values()
    for r in range(args.runs + 1):
        print(f"round {r} ({'warm-up' if r == 0 else 'measured'})", flush=True)
        for job in jobs:
            run(job, log, args.timeout, record=r > 0)
            if job.name.startswith("adapt compress"):
                job.stats = container_stats(job.out)
            if job.name.startswith("naive") or "tensor" in job.name:
                _remove(job.out)
    rows = [soup.row()]
    for group in groups:
        naive_row = group["naive"].row()
        rows.append(naive_row)
        for key in ("global", "tensor"):
            row = group[key].row()
            row["speedup"] = naive_row["wall"] / row["wall"]
            row["cpu_ratio"] = naive_row["cpu"] / row["cpu"]
            rows.append(row)
        rows.append(group["decompress"].row())
        row = group["apply"].row()
        row["vs_soup"] = row["wall"] / rows[0]["wall"]
        rows.append(row)
    for job in jobs:
        _remove(job.out)
    info = inp.info()
    print()
    print(f"## ComPEFT benchmark: preset `{args.preset}`, {args.runs} interleaved rounds (median)")
    print()
    print(f"- command: `{shlex.join(sys.argv)}`")
    print(
        f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, load avg "
        f"{machine['loadavg_start'][0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; model "
        f"{info['parameters']:,} params, {info['bytes_per_model'] / GB:.3f} GB bf16"
    )
    print()
    print(
        "| job | density | wall s | CPU s | peak RSS GB | file MB | bits/param | bound H(d)+d "
        "| over bound | vs naive (wall / CPU) | vs soup |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            str(r["job"]),
            "" if r["density"] is None else f"{r['density']:g}",
            f"{r['wall']:.2f}",
            f"{r['cpu']:.2f}",
            f"{r['rss'] / GB:.2f}",
            f"{r['bytes'] / 1e6:.2f}" if "bytes" in r else "",
            f"{r['bits']:.4f}" if "bits" in r else "",
            f"{r['bound']:.4f}" if "bound" in r else "",
            f"{100 * r['over_bound']:+.2f}%" if "over_bound" in r else "",
            f"{r['speedup']:.1f}x / {r['cpu_ratio']:.1f}x" if "speedup" in r else "",
            f"{r['vs_soup']:.2f}x" if "vs_soup" in r else "",
        ]
        print("| " + " | ".join(cells) + " |")
    return {"command": sys.argv, "machine": machine, "preset": args.preset, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--naive", nargs=3, metavar=("FT", "BASE", "OUT"))
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--preset", choices=["tiny", "small"], default="small")
    ap.add_argument("--n", type=int, default=3, help="fine-tunes generated (2 are used)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--densities", default="0.05,0.1,0.2")
    ap.add_argument("--workdir", default=str(HERE / ".data"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.naive:
        naive(*args.naive, args.density, args.alpha)
        return 0
    report = bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
