"""Benchmark ``adapt merge`` against naive torch scripts (and mergekit when installed).

Usage::

    python benchmarks/bench_merge.py --preset small --n 3 --runs 3 \
        [--methods soup,task-arithmetic,ties,ties-global,dare-linear,dare-ties] \
        [--tools adapt,naive,mergekit] [--workdir DIR] [--sharded] [--json FILE]
    python benchmarks/bench_merge.py --rss-scaling [--tools adapt,naive]

Each job runs as a whole subprocess ``--runs`` times.  Wall time is
``time.perf_counter`` around the process; peak RSS is ``ru_maxrss`` from
``os.wait4`` (the largest single process among the child and its reaped
descendants) and, separately, the peak of the summed RSS of the process tree
polled with psutil every 20 ms (catches worker pools; double-counts shared pages).
The table reports the median wall time and the max peak RSS over the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

ALL_METHODS = ["soup", "task-arithmetic", "ties", "ties-global", "dare-linear", "dare-ties"]
ALL_TOOLS = ["adapt", "naive", "mergekit"]
DENSITY = {"ties": 0.2, "ties-global": 0.2, "dare-linear": 0.5, "dare-ties": 0.5}
GB = 1e9


@dataclass
class Inputs:
    """Paths of one generated checkpoint set."""

    root: Path
    base: Path
    fts: list[Path]

    @classmethod
    def at(cls, root: Path, n: int) -> Inputs:
        return cls(root, root / "base", [root / f"ft{i}" for i in range(1, n + 1)])

    def files(self) -> list[Path]:
        """All weight files of base and fine-tunes."""
        return sorted(p for d in [self.base, *self.fts] for p in d.glob("*.safetensors"))

    def model_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.base.glob("*.safetensors"))

    def info(self) -> dict[str, object]:
        return json.loads((self.root / ".complete").read_text())


@dataclass
class Result:
    """Measurements of one (tool, method) job."""

    tool: str
    method: str
    cmd: list[str]
    walls: list[float] = field(default_factory=list)
    rss_wait4: list[int] = field(default_factory=list)
    rss_tree: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls and not self.error else None

    @property
    def rss(self) -> int | None:
        return max(self.rss_wait4) if self.rss_wait4 and not self.error else None

    @property
    def tree(self) -> int | None:
        return max(self.rss_tree) if self.rss_tree and not self.error else None


# --------------------------------------------------------------------------- tools


def adapt_prefix(override: str | None) -> list[str] | None:
    """Command prefix that runs the adapt CLI, or None if it is not available."""
    if override:
        return shlex.split(override)
    cands = []
    exe = Path(sys.executable).parent / "adapt"
    if exe.exists():
        cands.append([str(exe)])
    elif shutil.which("adapt"):
        cands.append([shutil.which("adapt") or "adapt"])
    cands.append([sys.executable, "-m", "cli"])
    for c in cands:
        r = subprocess.run([*c, "merge", "--help"], capture_output=True, cwd=HERE.parent)
        if r.returncode == 0:
            return c
    return None


def mergekit_prefix(override: str | None) -> list[str] | None:
    """Command prefix for ``mergekit-yaml``, or None if it is not installed."""
    if override:
        return shlex.split(override)
    exe = Path(sys.executable).parent / "mergekit-yaml"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mergekit-yaml")
    return [found] if found else None


def adapt_cmd(prefix: list[str], method: str, inp: Inputs, out: Path) -> list[str]:
    """adapt CLI command line for ``method``."""
    fts = [str(p) for p in inp.fts]
    tail = ["-o", str(out), "--quiet"]
    if method == "soup":
        return [*prefix, "merge", *fts, *tail]
    cmd = [*prefix, "merge", "--base", str(inp.base), *fts]
    if method == "task-arithmetic":
        return [*cmd, "--method", "task-arithmetic", "--lambda", "1.0", *tail]
    if method in ("ties", "ties-global"):
        scope = "global" if method == "ties-global" else "tensor"
        return [*cmd, "--method", "ties", "--density", "0.2", "--scope", scope, *tail]
    return [*cmd, "--method", method, "--density", str(DENSITY[method]), "--seed", "0", *tail]


def naive_cmd(method: str, inp: Inputs, out: Path) -> list[str] | None:
    """naive_torch.py command line, or None for methods it does not implement."""
    if method == "ties-global":
        return None
    cmd = [sys.executable, str(HERE / "naive_torch.py"), method, "--out", str(out)]
    if method != "soup":
        cmd += ["--base", str(inp.base), "--lam", "1.0"]
    if method in DENSITY:
        cmd += ["--density", str(DENSITY[method]), "--seed", "0"]
    return cmd + [str(p) for p in inp.fts]


def mergekit_config(method: str, inp: Inputs) -> str | None:
    """mergekit YAML for ``method`` (None where mergekit has no equivalent)."""
    names = {
        "soup": "linear",
        "task-arithmetic": "task_arithmetic",
        "ties": "ties",
        "dare-linear": "dare_linear",
        "dare-ties": "dare_ties",
    }
    if method not in names:
        return None
    lines = [f"merge_method: {names[method]}"]
    if method != "soup":
        lines.append(f"base_model: {inp.base}")
    lines.append("models:")
    for p in inp.fts:
        params = "weight: 1.0"
        if method in DENSITY:
            params += f", density: {DENSITY[method]}"
        lines += [f"  - model: {p}", f"    parameters: {{{params}}}"]
    if method in ("task-arithmetic", "dare-linear"):
        lines.append("parameters: {normalize: false}")  # plain sum of task vectors
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


def mergekit_cmd(prefix: list[str], method: str, inp: Inputs, out: Path, cfg_dir: Path):
    """mergekit-yaml command line (writes its YAML config into ``cfg_dir``)."""
    text = mergekit_config(method, inp)
    if text is None:
        return None
    cfg_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg_dir / f"{method}.yml"
    cfg.write_text(text)
    cmd = [*prefix, str(cfg), str(out), "--no-copy-tokenizer", "--quiet"]
    return [*cmd, "--random-seed", "0"] if method.startswith("dare") else cmd


# --------------------------------------------------------------------------- measuring


def read_all(files: list[Path], block: int = 4 << 20) -> tuple[float, int]:
    """Read every file fully; return (seconds, bytes)."""
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - t0, total


def write_floor(nbytes: int, path: Path, block: int = 4 << 20) -> float:
    """Seconds to write ``nbytes`` to ``path`` (no fsync, like a merge tool)."""
    buf = memoryview(os.urandom(block))
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(buf[: min(block, left)])
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def _poll_tree(pid: int, stop: threading.Event, peak: list[int]) -> None:
    try:
        import psutil
    except ImportError:
        return
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            break
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        peak[0] = max(peak[0], total)
        stop.wait(0.02)


def run_once(cmd: list[str], log: Path, timeout: float) -> tuple[float, int, int, int]:
    """Run ``cmd``; return (wall s, ru_maxrss bytes, polled tree peak bytes, exit code).

    Linux carries the parent's high-water RSS into a forked child's ru_maxrss (it
    survives exec), so this harness process must stay small: it never imports torch.
    """
    with open(log, "wb") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=HERE.parent)
        stop, peak = threading.Event(), [0]
        poller = threading.Thread(target=_poll_tree, args=(proc.pid, stop, peak), daemon=True)
        poller.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
        stop.set()
        poller.join()
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # already reaped by wait4
    return wall, usage.ru_maxrss * 1024, peak[0], rc


def measure(res: Result, out: Path, runs: int, logdir: Path, timeout: float) -> Result:
    """Run one job ``runs`` times, deleting the output before and after each run."""
    for i in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        log = logdir / f"{res.tool}-{res.method}-{i}.log"
        wall, rss, tree, rc = run_once(res.cmd, log, timeout)
        ok = rc == 0 and out.exists() and any(out.rglob("*.safetensors"))
        shutil.rmtree(out, ignore_errors=True)
        if not ok:
            lines = log.read_text(errors="replace").splitlines()
            tail = [ln.strip() for ln in lines if ln.strip() and ln.lstrip()[0] not in "│╭╰"][-3:]
            res.error = f"rc={rc}" + ("" if rc else " (no output)") + " | " + " / ".join(tail)
            print(f"  {res.tool:8s} {res.method:16s} FAILED {res.error[:300]}", flush=True)
            return res
        res.walls.append(wall)
        res.rss_wait4.append(rss)
        res.rss_tree.append(tree)
        print(
            f"  {res.tool:8s} {res.method:16s} run {i + 1}/{runs}: {wall:7.2f} s  "
            f"maxrss {rss / GB:5.2f} GB  tree {tree / GB:5.2f} GB",
            flush=True,
        )
    return res


# --------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, object]:
    """nproc, CPU model, RAM, load average, versions."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    # Not `import torch`: the harness must stay small (see run_once).
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["torch"] = importlib.metadata.version("torch")
    info["harness_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    info["loadavg_start"] = list(os.getloadavg())
    return info


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(results: list[Result]) -> str:
    """Markdown table; speedup = other tool's wall / this wall, RSS ratio = this / other."""
    refs = [t for t in ("naive", "mergekit") if any(r.tool == t and not r.error for r in results)]
    by = {(r.tool, r.method): r for r in results}
    head = ["method", "tool", "wall s (median)", "peak RSS GB", "tree RSS GB"]
    for ref in refs:
        head += [f"speedup vs {ref}", f"RSS vs {ref}"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.error:
            cells = [r.method, r.tool, "FAILED", "", ""] + ["", ""] * len(refs)
        else:
            cells = [r.method, r.tool, fmt(r.wall, ".2f"), fmt(r.rss and r.rss / GB, ".2f")]
            cells.append(fmt(r.tree and r.tree / GB, ".2f"))
            for ref in refs:
                o = by.get((ref, r.method))
                if o is None or o is r or o.error:
                    cells += ["", ""]
                else:
                    cells += [
                        fmt(ratio(o.wall, r.wall), ".2f") + "x",
                        fmt(ratio(r.rss, o.rss), ".2f") + "x",
                    ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- driver


def prepare(args: argparse.Namespace, preset: str, sharded: bool) -> Inputs:
    """Generate (or reuse) the checkpoints for one configuration."""
    name = f"{preset}-n{args.n}-seed{args.seed}" + ("-sharded" if sharded else "")
    root = Path(args.workdir) / name
    cmd = [sys.executable, str(HERE / "make_checkpoints.py"), "--preset", preset]
    cmd += ["--n", str(args.n), "--out", str(root), "--seed", str(args.seed)]
    if sharded:
        cmd += ["--shard-size", args.shard_size]
    # A subprocess, so that torch never loads into this (parent) process.
    subprocess.run(cmd, check=True)
    return Inputs.at(root, args.n)


def build_jobs(
    args: argparse.Namespace, inp: Inputs, methods: list[str], tools: list[str], out: Path
) -> list[Result]:
    """The (tool, method) jobs that can run here."""
    prefixes: dict[str, list[str] | None] = {"naive": []}
    if "adapt" in tools:
        prefixes["adapt"] = adapt_prefix(args.adapt_cmd)
        if prefixes["adapt"] is None:
            print("adapt CLI not available (no `adapt merge --help`, no `python -m cli`): skipped")
    if "mergekit" in tools:
        prefixes["mergekit"] = mergekit_prefix(args.mergekit_cmd)
        if prefixes["mergekit"] is None:
            print("mergekit is not installed (no mergekit-yaml): skipped")
    jobs = []
    for method in methods:
        for tool in tools:
            prefix = prefixes.get(tool)
            if prefix is None:
                continue
            if tool == "adapt":
                cmd = adapt_cmd(prefix, method, inp, out)
            elif tool == "naive":
                cmd = naive_cmd(method, inp, out)
            else:
                cmd = mergekit_cmd(prefix, method, inp, out, Path(args.workdir) / "mergekit")
            if cmd is not None:
                jobs.append(Result(tool, method, cmd))
    return jobs


def bench(args: argparse.Namespace) -> dict[str, object]:
    """The main benchmark: all methods x tools on one preset."""
    methods = args.methods.split(",")
    tools = args.tools.split(",")
    for m in methods:
        if m not in ALL_METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {ALL_METHODS}")
    machine = machine_info()
    inp = prepare(args, args.preset, args.sharded)
    info = inp.info()
    files = inp.files()
    cold, nbytes = read_all(files)  # warms the page cache
    hot, _ = read_all(files)
    out = Path(args.workdir) / "out"
    logdir = Path(args.workdir) / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    wfloor = write_floor(inp.model_bytes(), Path(args.workdir) / "write_floor.tmp")
    print(
        f"read all inputs ({len(files)} files, {nbytes / GB:.2f} GB): first pass {cold:.2f} s, "
        f"page-cache floor {hot:.2f} s; write one model ({inp.model_bytes() / GB:.2f} GB) "
        f"{wfloor:.2f} s"
    )
    results = [
        measure(j, out, args.runs, logdir, args.timeout)
        for j in build_jobs(args, inp, methods, tools, out)
    ]
    machine["loadavg_end"] = list(os.getloadavg())
    machine["harness_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine,
        "preset": args.preset,
        "n": args.n,
        "sharded": args.sharded,
        "parameters": info["parameters"],
        "bytes_per_model": info["bytes_per_model"],
        "read_first_s": cold,
        "read_floor_s": hot,
        "read_bytes": nbytes,
        "write_one_model_s": wfloor,
        "runs": args.runs,
        "results": [asdict(r) | {"wall": r.wall, "rss": r.rss, "tree": r.tree} for r in results],
    }
    print()
    print(f"## adapt merge benchmark: preset `{args.preset}`, n={args.n}, runs={args.runs}")
    print()
    print(f"- command: `{report['command']}`")
    print(
        f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, {machine.get('ram_gb', '?')} GiB "
        f"RAM, load avg {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}; "
        f"Python {machine['python']}, torch {machine.get('torch', '?')}"
    )
    print(
        f"- model: {info['parameters']:,} params, {info['bytes_per_model'] / GB:.3f} GB bf16 "
        f"per checkpoint{' (sharded)' if args.sharded else ''}; base + {args.n} fine-tunes"
    )
    print(
        f"- floor: read all inputs {hot:.2f} s from page cache ({nbytes / GB:.2f} GB; first "
        f"pass {cold:.2f} s), write one model {wfloor:.2f} s"
    )
    print(
        "- peak RSS = ru_maxrss (os.wait4, max single process); tree RSS = polled sum "
        "over the process tree; speedup = ref wall / tool wall; RSS ratio = tool / ref; "
        f"harness process maxrss {machine['harness_maxrss_mb']} MB (a floor for peak RSS)"
    )
    print()
    print(table(results))
    return report


def rss_scaling(args: argparse.Namespace) -> dict[str, object]:
    """Soup on tiny, small and small sharded: peak RSS should not grow with model size."""
    tools = [t for t in args.tools.split(",") if t != "mergekit"] or ["naive"]
    configs = [("tiny", False), ("small", False), ("small", True)]
    rows = []
    logdir = Path(args.workdir) / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.workdir) / "out"
    for preset, sharded in configs:
        inp = prepare(args, preset, sharded)
        read_all(inp.files())
        label = preset + (f" sharded {args.shard_size}" if sharded else "")
        for job in build_jobs(args, inp, ["soup"], tools, out):
            job.method = f"soup [{label}]"
            measure(job, out, args.runs, logdir, args.timeout)
            rows.append((label, inp.model_bytes(), job))
    print()
    print("## peak RSS of soup vs model size")
    print()
    print("| model | GB per checkpoint | tool | wall s | peak RSS GB | tree RSS GB |")
    print("|---|---|---|---|---|---|")
    for label, mb, r in rows:
        rss = fmt(r.rss and r.rss / GB, ".2f")
        tree = fmt(r.tree and r.tree / GB, ".2f")
        wall = fmt(r.wall, ".2f") if not r.error else "FAILED"
        print(f"| {label} | {mb / GB:.3f} | {r.tool} | {wall} | {rss} | {tree} |")
    return {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine_info(),
        "rss_scaling": [
            {"model": lab, "bytes_per_model": mb, **asdict(r), "wall": r.wall, "rss": r.rss}
            for lab, mb, r in rows
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["tiny", "small"], default="small")
    ap.add_argument("--n", type=int, default=3, help="number of fine-tunes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--tools", default=",".join(ALL_TOOLS))
    ap.add_argument("--workdir", default=str(HERE / ".data"))
    ap.add_argument("--sharded", action="store_true", help="inputs sharded at --shard-size")
    ap.add_argument("--shard-size", default="200MB")
    ap.add_argument("--seed", type=int, default=0, help="checkpoint generation seed")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--rss-scaling", action="store_true", help="soup on tiny/small/sharded")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--adapt-cmd", help="override the adapt command prefix (shell words)")
    ap.add_argument("--mergekit-cmd", help="override the mergekit-yaml command prefix")
    args = ap.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    report = rss_scaling(args) if args.rss_scaling else bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
