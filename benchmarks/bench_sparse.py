"""Benchmark sparse fine-tunes: ``adapt sparse extract / apply`` vs a naive torch script.

Usage::

    python benchmarks/bench_sparse.py --preset small --runs 3 [--densities 0.01,0.05]
        [--workdir DIR] [--json FILE]
    python benchmarks/bench_sparse.py --naive-extract FT BASE OUT --density 0.05
    python benchmarks/bench_sparse.py --naive-apply BASE SFT OUT

Inputs are ``base`` and ``ft1`` of ``make_checkpoints.py`` (reused when present). Every job
is a whole process run ``--runs`` times after one unmeasured warm-up run (page cache, numba
cache, adapt's sha256 cache); wall time is the median, peak RSS the max of ``ru_maxrss`` from
``os.wait4`` (this harness imports neither torch nor adapt: a forked child inherits the
parent's high-water RSS).

The naive script is what a research script does: extract loads both state dicts, computes
``ft.float() - base.float()`` per tensor, concatenates them, takes one global ``torch.topk``
of ``round(density * d)`` magnitudes and saves ``NAME.indices`` (int64, row-major) and
``NAME.values`` (float32) with ``save_file``; apply loads the base and that file, and per
tensor adds the values with ``index_put_(accumulate=True)`` in float32 and casts back.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bench_compeft import _remove, measure
from bench_merge import GB, adapt_prefix, machine_info, prepare, read_all

HERE = Path(__file__).resolve().parent


def naive_extract(ft: str, base: str, out: str, density: float) -> None:
    """The naive torch extraction (see the module docstring)."""
    import torch
    from naive_torch import load_state_dict
    from safetensors.torch import save_file

    b, f = load_state_dict(base), load_state_dict(ft)
    names = sorted(k for k, v in b.items() if v.is_floating_point())
    taus = [(f[k].float() - b[k].float()).reshape(-1) for k in names]
    cat = torch.cat(taus)
    k = round(density * cat.numel())
    idx = torch.topk(cat.abs(), k).indices.sort().values
    result, offset = {}, 0
    for name, t in zip(names, taus, strict=True):
        lo, hi = torch.searchsorted(idx, offset), torch.searchsorted(idx, offset + t.numel())
        mine = idx[lo:hi] - offset
        result[name + ".indices"] = mine.contiguous()
        result[name + ".values"] = t[mine].contiguous()
        offset += t.numel()
    save_file(result, out)


def naive_apply(base: str, sft: str, out: str) -> None:
    """The naive torch apply (see the module docstring)."""
    from naive_torch import load_state_dict
    from safetensors.torch import load_file, save_file

    b, s = load_state_dict(base), load_file(sft)
    for name, t in b.items():
        if name + ".indices" in s:
            flat = t.float().reshape(-1)
            flat.index_put_((s[name + ".indices"],), s[name + ".values"], accumulate=True)
            b[name] = flat.reshape(t.shape).to(t.dtype)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(b, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})


def bench(args: argparse.Namespace) -> dict[str, object]:
    """All jobs; prints a Markdown table."""
    inp = prepare(args, args.preset, False)
    adapt = adapt_prefix(None)
    if adapt is None:
        raise SystemExit("the adapt CLI is not available")
    work = Path(args.workdir) / "sparse"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "run.log"
    machine = machine_info()
    read_all(inp.files())
    ft, base = str(inp.fts[0]), str(inp.base)
    me = [sys.executable, __file__]
    extract = [*adapt, "sparse", "extract", ft, "--base", base, "-q"]
    rows: list[dict[str, object]] = []

    def job(name: str, density: float, cmd: list[str], out: Path) -> dict[str, object]:
        print(f"{name} (density {density}): {shlex.join(cmd)}", flush=True)
        r = measure(cmd, out, args.runs, log, args.timeout) | {"job": name, "density": density}
        rows.append(r)
        return r

    for d in [float(x) for x in args.densities.split(",")]:
        sft, naive_sft = work / f"ft1-{d}.sft.safetensors", work / f"naive-{d}.safetensors"
        ref = job(
            "naive torch extract",
            d,
            [*me, "--naive-extract", ft, base, str(naive_sft), "--density", str(d)],
            naive_sft,
        )
        ref["bytes"] = naive_sft.stat().st_size
        x = job(
            "adapt sparse extract",
            d,
            [*extract, "--density", str(d), "-o", str(sft)],
            sft,
        )
        x |= {"bytes": sft.stat().st_size, "speedup": ref["wall"] / x["wall"]}
        ref_apply = job(
            "naive torch apply",
            d,
            [*me, "--naive-apply", base, str(naive_sft), str(work / "naive-applied")],
            work / "naive-applied",
        )
        a = job(
            "adapt sparse apply",
            d,
            [*adapt, "sparse", "apply", base, str(sft), "-o", str(work / "applied"), "-q"],
            work / "applied",
        )
        a["speedup"] = ref_apply["wall"] / a["wall"]
        for p in (sft, naive_sft, work / "applied", work / "naive-applied"):
            _remove(p)
    info = inp.info()
    print()
    print(f"## Sparse fine-tune benchmark: preset `{args.preset}`, runs={args.runs} (median wall)")
    print()
    print(f"- command: `{shlex.join(sys.argv)}`")
    print(
        f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, load avg "
        f"{machine['loadavg_start'][0]:.2f} at start; model {info['parameters']:,} params, "
        f"{info['bytes_per_model'] / GB:.3f} GB bf16"
    )
    print()
    print("| job | density | wall s | peak RSS GB | file MB | vs naive |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            str(r["job"]),
            f"{r['density']:g}",
            f"{r['wall']:.2f}",
            f"{r['rss'] / GB:.2f}",
            f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "",
            f"{r['speedup']:.2f}x faster" if "speedup" in r else "",
        ]
        print("| " + " | ".join(cells) + " |")
    return {"command": sys.argv, "machine": machine, "preset": args.preset, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--naive-extract", nargs=3, metavar=("FT", "BASE", "OUT"))
    ap.add_argument("--naive-apply", nargs=3, metavar=("BASE", "SFT", "OUT"))
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--preset", choices=["tiny", "small"], default="small")
    ap.add_argument("--n", type=int, default=3, help="fine-tunes generated (1 is used)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--densities", default="0.01,0.05")
    ap.add_argument("--workdir", default=str(HERE / ".data"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.naive_extract:
        naive_extract(*args.naive_extract, args.density)
        return 0
    if args.naive_apply:
        naive_apply(*args.naive_apply)
        return 0
    report = bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
