"""Benchmark merging LoRA adapters into a model: ``adapt merge`` vs peft.

Usage::

    python benchmarks/bench_lora.py [--preset small] [--n 3] [--rank 16] [--runs 3] \
        [--tools adapt,peft] [--workdir DIR] [--no-check] [--json FILE]

The base is the merge benchmark's (``make_checkpoints.py``, reused when present). The N
adapters are written here with random A and B (r=16, lora_alpha=32, every linear layer of
every block, float32, peft's key format and adapter_config.json). Both tools produce the
same model, base + sum_i scale * B_i A_i, in the base dtype (bf16):

- adapt: ``adapt merge --base BASE lora1 .. loraN --method task-arithmetic -o OUT``
- peft: ``PeftModel.from_pretrained`` + ``load_adapter``, ``add_weighted_adapter(weights=1,
  combination_type="cat")``, ``merge_and_unload``, ``save_pretrained`` (this script's
  ``peft-merge`` subcommand).

Each job runs as a whole subprocess ``--runs`` times, the tools interleaved run by run. Wall
time is the median; peak RSS is ru_maxrss from ``os.wait4`` (max over runs), measured by
``bench_merge.run_once``. Then both outputs are written once more and compared tensor by
tensor. The harness never imports torch (its RSS would leak into the children's ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from bench_merge import GB, Result, adapt_prefix, fmt, machine_info, measure, prepare, ratio

HERE = Path(__file__).resolve().parent
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- subcommands


def make_adapters(base: Path, root: Path, n: int, rank: int, seed: int) -> None:
    """Write ``root/lora1 .. loraN``: random float32 factors on every linear layer."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(base / "model.safetensors"), "np") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    targets = [k for k in shapes if k.removesuffix(".weight").rpartition(".")[2] in LINEAR]
    for i in range(1, n + 1):
        rng = np.random.default_rng([seed, i])
        state = {}
        for name in targets:
            out_f, in_f = shapes[name]
            key = "base_model.model." + name.removesuffix(".weight")
            state[key + ".lora_A.weight"] = (rng.standard_normal((rank, in_f)) * 0.01).astype(
                np.float32
            )
            state[key + ".lora_B.weight"] = (rng.standard_normal((out_f, rank)) * 0.01).astype(
                np.float32
            )
        folder = root / f"lora{i}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base),
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(LINEAR),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (root / ".complete").write_text(json.dumps({"n": n, "rank": rank, "seed": seed}) + "\n")


def peft_merge(base: Path, out: Path, adapters: list[Path]) -> None:
    """peft's way: load, add_weighted_adapter(cat), merge_and_unload, save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(a, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type="cat")
    model.set_adapter("merged")
    model.merge_and_unload().save_pretrained(out)


def compare(a: Path, b: Path) -> None:
    """Print how far two model folders' tensors are apart (as JSON)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if set(x) != set(y):
        print(json.dumps({"error": f"tensor names differ: {sorted(set(x) ^ set(y))[:5]}"}))
        return
    worst = differ = total = 0
    for k in x:
        d = (x[k].double() - y[k].double()).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 0).sum())
        total += d.numel()
        assert x[k].dtype == y[k].dtype == torch.bfloat16, k
    print(json.dumps({"max_abs_diff": worst, "differing": differ, "total": total}))


# --------------------------------------------------------------------------- driver


def run_step(*args: str) -> str:
    """This script's subcommand in a fresh process (torch stays out of the harness)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def bench(args: argparse.Namespace) -> dict[str, object]:
    machine = machine_info()
    inp = prepare(args, args.preset, False)
    root = Path(args.workdir) / f"lora-{args.preset}-r{args.rank}-n{args.n}-seed{args.seed}"
    if not (root / ".complete").is_file():
        run_step("make-adapters", str(inp.base), str(root), str(args.n), str(args.rank))
    adapters = [str(root / f"lora{i}") for i in range(1, args.n + 1)]
    out = Path(args.workdir) / "lora-out"
    logdir = Path(args.workdir) / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    prefix = adapt_prefix(None)
    if prefix is None and "adapt" in args.tools:
        raise SystemExit("adapt CLI not available")

    def command(tool: str, dest: Path) -> list[str]:
        if tool == "adapt":
            assert prefix is not None
            cmd = [*prefix, "merge", "--base", str(inp.base), *adapters]
            return [*cmd, "--method", "task-arithmetic", "-o", str(dest), "--quiet"]
        script = [sys.executable, str(Path(__file__).resolve()), "peft-merge"]
        return [*script, str(inp.base), str(dest), *adapters]

    jobs = [Result(t, "lora-cat", command(t, out)) for t in args.tools.split(",")]
    for _ in range(args.runs):  # interleaved, so load changes hit both tools alike
        for job in jobs:
            if not job.error:
                measure(job, out, 1, logdir, args.timeout)
    check = None
    if args.check and len(jobs) == 2 and not any(j.error for j in jobs):
        outs = [Path(args.workdir) / f"lora-out-{j.tool}" for j in jobs]
        for job, dest in zip(jobs, outs, strict=True):
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run(command(job.tool, dest), check=True, capture_output=True)
        check = json.loads(run_step("compare", *map(str, outs)))
        for dest in outs:
            shutil.rmtree(dest)
    machine["loadavg_end"] = list(os.getloadavg())
    cmdline = " ".join(shlex.quote(a) for a in sys.argv)
    peft = next((j for j in jobs if j.tool == "peft" and not j.error), None)
    rows = [
        "| tool | wall s (median) | peak RSS GB | speedup vs peft | RSS vs peft |",
        "|---|---|---|---|---|",
    ]
    for j in jobs:
        if j.error:
            rows.append(f"| {j.tool} | FAILED: {j.error[:80]} | | | |")
            continue
        vs = "" if peft is None or j is peft else fmt(ratio(peft.wall, j.wall), ".2f") + "x"
        rss = "" if peft is None or j is peft else fmt(ratio(j.rss, peft.rss), ".2f") + "x"
        peak = fmt(j.rss and j.rss / GB, ".2f")
        rows.append(f"| {j.tool} | {fmt(j.wall, '.2f')} | {peak} | {vs} | {rss} |")
    print()
    print(f"## LoRA merge benchmark: {args.n} adapters r={args.rank} into `{args.preset}`")
    print()
    print(f"- command: `{cmdline}`")
    print(
        f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, {machine.get('ram_gb', '?')} GiB "
        f"RAM, load avg {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}; "
        f"Python {machine['python']}, torch {machine.get('torch', '?')}"
    )
    info = inp.info()
    print(
        f"- base: {info['parameters']:,} params bf16; adapters: r={args.rank}, "
        f"alpha={2 * args.rank}, {len(LINEAR)} linear layers x every block, float32; "
        f"runs={args.runs} (interleaved)"
    )
    if check is not None:
        print(
            f"- outputs agree: max |adapt - peft| = {check.get('max_abs_diff')} over "
            f"{check.get('total', 0):,} bf16 values ({check.get('differing', 0):,} differ)"
        )
    print()
    print("\n".join(rows))
    return {
        "command": cmdline,
        "machine": machine,
        "check": check,
        "results": [
            {
                "tool": j.tool,
                "walls": j.walls,
                "rss_wait4": j.rss_wait4,
                "wall": j.wall,
                "rss": j.rss,
                "error": j.error,
            }
            for j in jobs
        ],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "make-adapters":
        make_adapters(Path(argv[1]), Path(argv[2]), int(argv[3]), int(argv[4]), 0)
        return 0
    if argv and argv[0] == "peft-merge":
        peft_merge(Path(argv[1]), Path(argv[2]), [Path(a) for a in argv[3:]])
        return 0
    if argv and argv[0] == "compare":
        compare(Path(argv[1]), Path(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["tiny", "small"], default="small")
    ap.add_argument("--n", type=int, default=3, help="number of adapters")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tools", default="adapt,peft")
    ap.add_argument("--workdir", default=str(HERE / ".data"))
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the comparison")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    args.seed, args.shard_size = 0, "200MB"  # the checkpoint set bench_merge.prepare reuses
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    report = bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
