"""Streaming and distributed conversion, measured (issue 14 parts 2 and 3).

``rss``: peak resident memory of ``sparsify convert config.json --hf --weights model.safetensors.index.json``
on a synthetic sharded checkpoint (benchmarks/make_sharded_checkpoint.py, default 2.2 GB of float32), each
run in a fresh process that reports its own ``resource.getrusage(RUSAGE_SELF).ru_maxrss``:

* baseline: the same process up to the work (imports, the model built on ``meta``, the plan), no weights;
* streamed: the whole conversion (and, with ``--in-memory``, the ordinary in-memory conversion of the
  same checkpoint for contrast: build the model, load every shard, ``sparsify()``, ``save()``).

Target (issue 14): streamed peak minus baseline below 25% of the checkpoint's size.  The checkpoint and
the outputs are deleted afterwards.

``distributed``: wall time of the same conversion of a model with many large layers (CP / Tucker / TT)
in one process (one thread, and two threads) and with ``torchrun --nproc_per_node 2 ... --distributed``
(one thread each, as torchrun sets); the artifacts are compared byte for byte.  This machine has two
cores shared with other work: the load average is recorded before and after each run.

    python benchmarks/bench_streaming.py rss [--size-gb 2.2] [--in-memory]
    python benchmarks/bench_streaming.py distributed [--layers 16] [--width 1024]

Results: benchmarks/results/streaming_rss.json, benchmarks/results/streaming_distributed.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _meta() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit.stdout.strip(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# ------------------------------------------------------------------ children (one measurement each)
def child(argv: list[str]) -> int:
    """Run one measured job in this fresh process; print {"peak_kib": ..., "seconds": ...} as the last line."""
    import warnings

    warnings.simplefilter("ignore")
    kind, ckpt, out = argv[0], Path(argv[1]), Path(argv[2])
    args = argv[3:]
    t0 = time.perf_counter()
    if kind == "imports":
        import transformers  # noqa: F401

        import sparsify  # noqa: F401
    elif kind == "baseline":
        import sparsify
        from sparsify.model_spec import parse_model
        from sparsify.streaming import plan_units

        spec = parse_model(str(ckpt / "config.json"), hf=True, weights=str(ckpt / "model.safetensors.index.json"))
        skeleton = spec.build_skeleton()
        plan_units(skeleton, sparsify.SparsifyConfig(method="block_sparse", density=0.25))
    elif kind == "stream":
        from sparsify.cli import main

        rc = main(["convert", str(ckpt / "config.json"), "--hf", "--weights", str(ckpt / "model.safetensors.index.json"),
                   "-o", str(out), "--no-progress", *args])
        if rc:
            return rc
    elif kind == "memory":
        import torch

        import sparsify
        from sparsify.model_spec import parse_model
        from sparsify.streaming import CheckpointReader

        spec = parse_model(str(ckpt / "config.json"), hf=True)
        model = spec.build()  # random weights first, as the in-memory path builds the model
        reader = CheckpointReader(ckpt / "model.safetensors.index.json")
        model.load_state_dict({n: reader.get(n) for n in reader.names()})
        conv = sparsify.sparsify(model.eval(), method="block_sparse", density=0.25)
        del model
        sparsify.save(conv, out, export=False)
        del conv, torch
    else:
        raise SystemExit(f"unknown child job {kind}")
    print(json.dumps({"peak_kib": _peak_kib(), "seconds": time.perf_counter() - t0}))
    return 0


def _measure(kind: str, ckpt: Path, out: Path, *args: str) -> dict:
    before = os.getloadavg()
    # Through /usr/bin/time's fork: Linux keeps ru_maxrss across fork and exec, so a child forked by this
    # process (which made the checkpoint) would start from this process's peak.
    launcher = ["/usr/bin/time", "-f", "%M"] if os.path.exists("/usr/bin/time") else []
    p = subprocess.run([*launcher, sys.executable, __file__, "_child", kind, str(ckpt), str(out), *args],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{kind} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if launcher:  # /usr/bin/time -f %M: the child's own peak (KiB), from wait4
        res["peak_kib_time"] = int(p.stderr.strip().splitlines()[-1])
    res["load_before"], res["load_after"] = [round(x, 2) for x in before], [round(x, 2) for x in os.getloadavg()]
    return res


# ------------------------------------------------------------------ rss
def bench_rss(args) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_sharded_checkpoint import make

    work = Path(tempfile.mkdtemp(prefix="sparsify-stream-", dir=args.tmp))
    try:
        print(f"disk before: {shutil.disk_usage(work).free / 2**30:.1f} GiB free in {work}")
        ckpt = make(work / "ckpt", args.size_gb, args.shard_size, 0)
        size = ckpt["bytes"]
        print(f"checkpoint: {size / 1e9:.2f} GB, {ckpt['shards']} shards, {ckpt['layers']} decoder layers")
        rows = {}
        rows["imports"] = _measure("imports", work / "ckpt", work / "none")
        rows["baseline"] = _measure("baseline", work / "ckpt", work / "none")
        conv = ["--method", "block_sparse", "--density", "0.25", "--max-shard-size", args.max_shard_size]
        rows["streamed"] = _measure("stream", work / "ckpt", work / "out-stream", *conv)
        out_bytes = sum(f.stat().st_size for f in (work / "out-stream").iterdir())
        if args.in_memory:
            rows["in_memory"] = _measure("memory", work / "ckpt", work / "out-memory")
            from sparsify.io import (
                read_manifest,  # the two conversions agree (weights, tensor by tensor)
            )

            a, b = read_manifest(work / "out-stream"), read_manifest(work / "out-memory")
            key = lambda m: [(d["name"], d["method"], d["result"]) for d in m["plan"]["decisions"]]  # noqa: E731
            rows["in_memory"]["same_decisions"] = key(a) == key(b)  # (FLOPs differ: the CLI has example inputs)
        base = rows["baseline"]["peak_kib"] * 1024
        table = [("job", "peak RSS", "above baseline", "of checkpoint", "seconds")]
        for k, r in rows.items():
            above = r["peak_kib"] * 1024 - base
            r["above_baseline_bytes"] = above
            r["above_baseline_fraction_of_checkpoint"] = round(above / size, 4)
            table.append((k, f"{r['peak_kib'] / 2**20:.2f} GiB", f"{above / 2**20:.0f} MiB",
                          f"{above / size:.1%}", f"{r['seconds']:.1f}"))
        widths = [max(len(str(row[i])) for row in table) for i in range(5)]
        for row in table:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        frac = rows["streamed"]["above_baseline_fraction_of_checkpoint"]
        verdict = "met" if frac < 0.25 else "NOT met"
        print(f"target (streamed peak above baseline < 25% of the checkpoint): {verdict} ({frac:.1%})")
        return {"meta": {**_meta(), "checkpoint_bytes": size, "checkpoint_shards": ckpt["shards"],
                         "decoder_layers": ckpt["layers"], "config": "block_sparse density 0.25, block 32",
                         "output_bytes": out_bytes, "max_shard_size": args.max_shard_size,
                         "measure": "resource.getrusage(RUSAGE_SELF).ru_maxrss of a fresh process per job"},
                "rows": rows, "target": {"fraction": 0.25, "met": frac < 0.25}}
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the synthetic checkpoint and the outputs
        print(f"deleted {work}")


# ------------------------------------------------------------------ distributed
def make_mlp(layers: int = 16, width: int = 1024):
    """The benchmark's model: ``layers`` Linear(width, width) with ReLUs (a factory for the CLI)."""
    import torch.nn as nn

    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def bench_distributed(args) -> dict:
    import torch
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp(prefix="sparsify-dist-", dir=args.tmp))
    try:
        torch.manual_seed(0)
        ckpt = work / "model.safetensors"
        save_file({k: v.contiguous() for k, v in make_mlp(args.layers, args.width).state_dict().items()}, str(ckpt))
        toml = work / "cfg.toml"
        # Linear layers sit at even indices: every fourth CP (rank 64), the next-but-one TT, the rest Tucker.
        rules = []
        for i in range(args.layers):
            kind = {0: ("cp", 64), 2: ("tt", 0.25)}.get((2 * i) % 8)
            if kind:
                rules.append(f'[[rules]]\npattern = "{2 * i}"\nmethod = "{kind[0]}"\nrank = {kind[1]}\n')
        toml.write_text('method = "tucker"\nrank = 0.25\n\n' + "\n".join(rules))
        factory = "bench_streaming:make_mlp"
        common = [factory, "--factory-args", json.dumps([args.layers, args.width]), "--weights", str(ckpt),
                  "--config", str(toml), "--no-progress", "--min-size", "0"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
               "PYTHONWARNINGS": "ignore"}
        runs = {}

        def run(name, cmd, threads):
            before = os.getloadavg()
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": str(threads)},
                               cwd=work)
            dt = time.perf_counter() - t0
            if p.returncode:
                raise SystemExit(f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            runs[name] = {"seconds": round(dt, 2), "threads_per_process": threads,
                          "load_before": [round(x, 2) for x in before],
                          "load_after": [round(x, 2) for x in os.getloadavg()]}
            print(f"{name}: {dt:.1f} s (load {before[0]:.2f} -> {os.getloadavg()[0]:.2f})")

        sp = [sys.executable, "-m", "sparsify", "convert", *common, "--stream"]
        run("1 process, 1 thread", sp + ["-o", str(work / "one-1")], 1)
        run("1 process, 2 threads", sp + ["-o", str(work / "one-2")], 2)
        tr = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "sparsify", "convert", *common,
              "--distributed"]
        run("torchrun 2 processes, 1 thread each", tr + ["-o", str(work / "two")], 1)
        same = all((work / "two" / f).read_bytes() == (work / "one-1" / f).read_bytes()
                   for f in os.listdir(work / "one-1") if f != "manifest.json")
        m = json.loads((work / "two" / "manifest.json").read_text())
        methods = {}
        for d in m["plan"]["decisions"]:
            methods[d["method"]] = methods.get(d["method"], 0) + 1
        t1, t2, td = (runs[k]["seconds"] for k in runs)
        print(f"speedup of 2 processes: {t1 / td:.2f}x over 1 process x 1 thread, {t2 / td:.2f}x over "
              f"1 process x 2 threads; weights identical to the 1-thread single process: {same}")
        return {"meta": {**_meta(), "model": f"{args.layers} x Linear({args.width}, {args.width})",
                         "methods": methods, "checkpoint_bytes": ckpt.stat().st_size},
                "runs": runs, "speedup_vs_1_thread": round(t1 / td, 2), "speedup_vs_2_threads": round(t2 / td, 2),
                "weights_identical_to_single_process_1_thread": same}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        return child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rss")
    r.add_argument("--size-gb", type=float, default=2.2)
    r.add_argument("--shard-size", default="500MB", help="the input checkpoint's shards")
    r.add_argument("--max-shard-size", default="128MB", help="the artifact's shards (the default)")
    r.add_argument("--in-memory", action="store_true", help="also measure the in-memory conversion")
    r.add_argument("--tmp", default=None, help="where the synthetic checkpoint goes (deleted after)")
    r.add_argument("--out", default=str(RESULTS / "streaming_rss.json"))
    d = sub.add_parser("distributed")
    d.add_argument("--layers", type=int, default=16)
    d.add_argument("--width", type=int, default=1024)
    d.add_argument("--tmp", default=None)
    d.add_argument("--out", default=str(RESULTS / "streaming_distributed.json"))
    args = p.parse_args(argv)
    res = bench_rss(args) if args.what == "rss" else bench_distributed(args)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
