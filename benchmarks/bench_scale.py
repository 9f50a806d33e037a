"""Cohorts at scale: training in bounded memory, and planning cost at 1k / 10k manifest rows (issue 26).

Part 1 (`train`): writes a synthetic cohort of features.h5 files directly (no slides; float16, the
real file layout) and, each in its own subprocess so peak RSS is the run's own, times
- the streaming scan (the train stage's one pass: checks each bag, per-bag moments for the fold
  statistics) and its read throughput,
- one training epoch (+ one validation pass) of ABMIL and MambaMIL on CPU through a BagSource with
  a bounded cache (`--cache-gb`), at two cohort sizes,
- the same epoch on the in-memory path (every bag loaded as float32 first, the previous train
  stage) on the smaller cohort, for its peak RSS;
`ratio` alternates streamed (no cache) and in-memory epochs in one process for the step-time ratio
(on a loaded machine, one run after another does not compare).
Peak RSS is the process's VmHWM (/proc/self/status).

Part 2 (`plan`): a manifest of N rows of symlinks to a few small demo slides; times
`wsi-pipeline validate-manifest` (10k), `run --dry-run` and the first scheduling pass of a real
`run` (validation, snakemake's DAG build, up to its first job: the run is stopped when the
first job starts) at
1k and 10k rows.

    nice python benchmarks/bench_scale.py train --sizes 150 600 --patches 1000 --dim 1024
    nice python benchmarks/bench_scale.py ratio --n 60      # the 1.2x check, alternated in one process
    nice python benchmarks/bench_scale.py plan --rows 1000 10000
Prints a JSON line per measurement and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENCODER = "synthetic"
MODELS = {  # CPU-sized: the memory and I/O behaviour does not depend on the width
    "abmil": {"hidden_dim": 128, "attention_dim": 64, "dropout": 0.0},
    "mambamil": {"d_model": 128, "n_layers": 2, "dropout": 0.0},
}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_cohort(folder: Path, n_bags: int, patches: int, dim: int, seed: int = 0) -> float:
    """n_bags float16 features.h5 of `patches` x `dim` (lengths vary +-20 %) → GiB written."""
    sys.path.insert(0, str(ROOT))
    from wsi_pipeline.features.features_h5 import write_features_h5

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n_bags):
        path = folder / f"s{i:05d}.h5"
        n = int(patches * rng.uniform(0.8, 1.2))
        if not path.is_file():
            x = rng.standard_normal((n, dim), dtype=np.float32)
            if i % 2:  # a planted signal, so training has something to do
                x[: max(1, n // 50), 0] += 3.0
            coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
            write_features_h5(path, x, coords, {"encoder": ENCODER, "out_dim": dim, "config_hash": f"h{i}"},
                              dtype="float16")
        total += path.stat().st_size
    return total / (1 << 30)


def train_once(folder: Path, n_bags: int, model_name: str, mode: str, cache_gb: float) -> dict:
    """One scan + one epoch in this process (called in a subprocess) → measurements."""
    sys.path.insert(0, str(ROOT))
    import torch

    from wsi_pipeline.models.mil import create_aggregator
    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.run.manifest import SlideRecord
    from wsi_pipeline.training.bag_source import BagSource
    from wsi_pipeline.training.bags import Bag, load_bag
    from wsi_pipeline.training.cv import _scan_bags
    from wsi_pipeline.training.standardize import InputStandardizer
    from wsi_pipeline.training.trainer import seed_everything, train_fold

    torch.set_num_threads(1)
    ids = [f"s{i:05d}" for i in range(n_bags)]
    records = [SlideRecord(s, Path("/dev/null"), f"p{s}", ("neg", "pos")[i % 2], "c", None, i + 1)
               for i, s in enumerate(ids)]

    class Features(RunFolder):  # the bench's cohort folder as the run's features folder
        def features_h5(self, encoder, slide_id):
            return folder / f"{slide_id}.h5"

    run = Features(folder.parent)
    n_val = max(2, n_bags // 10)
    train_ids, val_ids = ids[n_val:], ids[:n_val]
    t0 = time.perf_counter()
    refs, dims, problems, moments = _scan_bags(records, ["neg", "pos"], ENCODER, run, True, "")
    scan_s = time.perf_counter() - t0
    assert not problems and len(dims) == 1, problems
    dim = next(iter(dims))
    scanned = sum(r.n_instances * r.dim * 2 for r in refs.values())
    seed_everything(0)
    model = create_aggregator(model_name, dim, 2, **MODELS[model_name])
    model = InputStandardizer.from_moments(model, [moments[s] for s in train_ids])
    load_s = 0.0
    if mode == "memory":  # the previous path: every bag in memory as float32 before training
        t0 = time.perf_counter()
        bags = {}
        for r in records:
            f, c, _ = load_bag(refs[r.slide_id].path, r.slide_id)
            bags[r.slide_id] = Bag(r.slide_id, r.patient_id, refs[r.slide_id].label, f, c, "")
        load_s = time.perf_counter() - t0
        train_set, val_set, source = [bags[s] for s in train_ids], [bags[s] for s in val_ids], None
    else:
        source = BagSource(refs.values(), int(cache_gb * (1 << 30)))
        train_set, val_set = source.subset(train_ids), source.subset(val_ids)
    t0 = time.perf_counter()
    train_fold(model, train_set, val_set, n_classes=2, lr=1e-4, weight_decay=0.0, epochs=1, patience=1,
               balance="class_weights", grad_accumulation=1, seed=0, device=torch.device("cpu"))
    epoch_s = time.perf_counter() - t0
    out = {"model": model_name, "mode": mode, "bags": n_bags, "cache_gb": cache_gb if mode == "stream" else None,
           "scan_s": round(scan_s, 2), "scan_read_mb_s": round(scanned / scan_s / 1e6, 1),
           "load_s": round(load_s, 2), "epoch_s": round(epoch_s, 2),
           "step_ms": round(1000 * epoch_s / (len(train_ids) + len(val_ids)), 2),
           "peak_rss_mb": round(peak_rss_mb(), 0)}
    if source is not None:
        out.update(epoch_read_mb_s=round(source.bytes_read / epoch_s / 1e6, 1), bags_read=source.reads,
                   cache_hits=source.hits)
    return out


def ratio_once(folder: Path, n_bags: int, model_name: str, reps: int) -> dict:
    """Streamed (no cache: every bag read from its file each step) vs in-memory epochs, alternated
    in one process so the machine's load falls on both alike → min and median epoch times."""
    sys.path.insert(0, str(ROOT))
    import torch

    from wsi_pipeline.models.mil import create_aggregator
    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.run.manifest import SlideRecord
    from wsi_pipeline.training.bag_source import BagSource
    from wsi_pipeline.training.bags import Bag, load_bag
    from wsi_pipeline.training.cv import _scan_bags
    from wsi_pipeline.training.trainer import seed_everything, train_fold

    torch.set_num_threads(1)
    ids = [f"s{i:05d}" for i in range(n_bags)]
    records = [SlideRecord(s, Path("/dev/null"), f"p{s}", ("neg", "pos")[i % 2], "c", None, i + 1)
               for i, s in enumerate(ids)]

    class Features(RunFolder):
        def features_h5(self, encoder, slide_id):
            return folder / f"{slide_id}.h5"

    refs, dims, _, _ = _scan_bags(records, ["neg", "pos"], ENCODER, Features(folder.parent))
    dim = next(iter(dims))
    memory = []
    for s in ids:
        f, c, _ = load_bag(refs[s].path, s)
        memory.append(Bag(s, refs[s].patient_id, refs[s].label, f, c, ""))
    source = BagSource(refs.values(), cache_bytes=0)
    times = {"memory": [], "stream": []}
    for _ in range(reps):
        for mode in ("memory", "stream"):
            seed_everything(0)
            model = create_aggregator(model_name, dim, 2, **MODELS[model_name])
            bags = memory if mode == "memory" else source.subset(ids)
            t0 = time.perf_counter()
            train_fold(model, bags, [], n_classes=2, lr=1e-4, weight_decay=0.0, epochs=1, patience=1,
                       balance="class_weights", grad_accumulation=1, seed=0, device=torch.device("cpu"))
            times[mode].append(time.perf_counter() - t0)
    med = {m: float(np.median(t)) for m, t in times.items()}
    return {"model": model_name, "bags": n_bags, "reps": reps,
            "memory_epoch_s": [round(t, 2) for t in times["memory"]],
            "stream_epoch_s": [round(t, 2) for t in times["stream"]],
            "ratio_median": round(med["stream"] / med["memory"], 3),
            "ratio_min": round(min(times["stream"]) / min(times["memory"]), 3),
            "stream_read_mb_s": round(source.bytes_read / sum(times["stream"]) / 1e6, 1)}


def cmd_ratio(args) -> list[dict]:
    work = Path(args.work)
    write_cohort(work / "features", args.n, args.patches, args.dim)
    rows = []
    for m in MODELS:
        rows.append(ratio_once(work / "features", args.n, m, args.reps))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cmd_train(args) -> list[dict]:
    work = Path(args.work)
    results = []
    for n in sorted(args.sizes):
        gib = write_cohort(work / "features", n, args.patches, args.dim)
        print(json.dumps({"cohort_bags": n, "disk_gib": round(gib, 3),
                          "float32_in_memory_gib": round(gib * 2, 3)}), flush=True)
        runs = [(m, "stream") for m in MODELS]
        if n == min(args.sizes):
            runs += [(m, "memory") for m in MODELS]
        for model_name, mode in runs:
            cmd = [sys.executable, __file__, "_train_one", "--work", str(work), "--n", str(n),
                   "--model", model_name, "--mode", mode, "--cache-gb", str(args.cache_gb)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            row = {**json.loads(line), "disk_gib": round(gib, 3)}
            print(json.dumps(row), flush=True)
            results.append(row)
    print("\n| model | path | bags | disk (GiB, fp16) | peak RSS (MB) | scan (s, MB/s) | epoch (s) | "
          "ms/bag | epoch read MB/s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        path = "in memory" if r["mode"] == "memory" else f"streamed, cache {r['cache_gb']} GiB"
        print(f"| {r['model']} | {path} | {r['bags']} | {r['disk_gib']} | {r['peak_rss_mb']:.0f} | "
              f"{r['scan_s']} ({r['scan_read_mb_s']}) | {r['epoch_s']} | {r['step_ms']} | "
              f"{r.get('epoch_read_mb_s', '-')} |")
    small = min(args.sizes)
    for m in MODELS:
        s = next(r for r in results if r["model"] == m and r["mode"] == "stream" and r["bags"] == small)
        mem = next(r for r in results if r["model"] == m and r["mode"] == "memory")
        print(f"{m}: streamed / in-memory epoch time at {small} bags = {s['epoch_s'] / mem['epoch_s']:.3f}")
    return results


# ---------------------------------------------------------------- part 2: planning at 1k / 10k rows

def _cli(*argv, timeout=1800, stop_when=None, cwd=None) -> tuple[float, float, int]:
    """Run the CLI under /usr/bin/time → (wall s, peak RSS MB, rc). `stop_when(path)`: a file that,
    once it appears, ends the run (the first scheduling pass is over)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rss_file = tempfile.NamedTemporaryFile(delete=False, suffix=".rss")
    cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, sys.executable, "-m", "wsi_pipeline.cli", *argv]
    err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: Snakemake logs every job to stderr
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err,
                            text=True, start_new_session=True)
    rc = None
    while rc is None:
        rc = proc.poll()
        if rc is None and stop_when is not None and stop_when():
            wall = time.perf_counter() - t0
            os.killpg(proc.pid, 9)
            proc.wait()
            return wall, float("nan"), -9
        if time.perf_counter() - t0 > timeout:
            os.killpg(proc.pid, 9)
            proc.wait()
            return float("nan"), float("nan"), -1
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    text = Path(rss_file.name).read_text().strip().splitlines()
    os.unlink(rss_file.name)
    if rc != 0:
        err.seek(0)
        sys.stderr.write(err.read()[-3000:])
    err.close()
    return wall, (int(text[-1]) / 1024 if text and text[-1].isdigit() else float("nan")), rc


def write_manifest(work: Path, n_rows: int, slides: list[Path]) -> Path:
    """n_rows rows, each a symlink to one of `slides`, with labels and one cohort."""
    links = work / f"links_{n_rows}"
    links.mkdir(parents=True, exist_ok=True)
    manifest = work / f"manifest_{n_rows}.csv"
    lines = ["slide_id,path,patient_id,label,cohort"]
    for i in range(n_rows):
        src = slides[i % len(slides)]
        link = links / f"s{i:05d}{src.suffix}"
        if not link.is_symlink():
            link.symlink_to(src)
        # Rows showing one image share its patient (one image under two ids across patients is
        # refused: it could be in training and test); 2 patients per class, hence train.folds 2.
        k = i % len(slides)
        lines.append(f"s{i:05d},{link},p{k},{('neg', 'pos')[k % 2]},c1")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def cmd_plan(args) -> list[dict]:
    work = Path(args.work) / "plan"
    work.mkdir(parents=True, exist_ok=True)
    demo = work / "demo"
    if not any(demo.glob("**/*.tif*")):
        subprocess.run([sys.executable, "-c", "from wsi_pipeline.demo.slides import make_demo_cohort; "
                        f"make_demo_cohort({str(demo)!r}, 4, width_px=1024, height_px=768)"], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    slides = sorted(p.resolve() for p in demo.glob("**/*") if p.suffix in (".tif", ".tiff", ".svs"))[:4]
    config = work / "plan.yaml"
    config.write_text("train:\n  folds: 2\n")
    results = []
    for n in sorted(args.rows):
        manifest = write_manifest(work, n, slides)
        if n == max(args.rows) or args.validate_all:
            wall, rss, rc = _cli("validate-manifest", str(manifest), "--require-labels")
            results.append({"what": "validate-manifest", "rows": n, "wall_s": round(wall, 1),
                            "peak_rss_mb": round(rss), "rc": rc})
            print(json.dumps(results[-1]), flush=True)
        run_dir = work / f"run_{n}"
        wall, rss, rc = _cli("run", "--manifest", str(manifest), "--config", str(config), "--out", str(run_dir),
                             "--dry-run")
        results.append({"what": "run --dry-run", "rows": n, "wall_s": round(wall, 1),
                        "peak_rss_mb": round(rss), "rc": rc})
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)

        def first_job_started(run_dir=run_dir):  # Snakemake makes a job's log folder as it starts it
            return (run_dir / "logs" / "snakemake" / "tile").is_dir()
        wall, rss, rc = _cli("run", "--manifest", str(manifest), "--config", str(config), "--out", str(run_dir),
                             "--cores", "1",
                             stop_when=first_job_started)
        results.append({"what": "run: first scheduling pass (to the first job's output)", "rows": n,
                        "wall_s": round(wall, 1), "rc": rc})
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    print("\n| measurement | rows | wall (s) | peak RSS (MB) |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['what']} | {r['rows']} | {r['wall_s']} | {r.get('peak_rss_mb', '-')} |")
    for what in sorted({r["what"] for r in results}):
        rows = {r["rows"]: r["wall_s"] for r in results if r["what"] == what}
        if len(rows) == 2:
            (a, ta), (b, tb) = sorted(rows.items())
            print(f"{what}: {ta} s -> {tb} s for {a} -> {b} rows: x{tb / ta:.2f} time for x{b / a:.0f} rows")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "wsi_bench_scale"))
    t.add_argument("--sizes", type=int, nargs=2, default=[150, 600])
    t.add_argument("--patches", type=int, default=1000)
    t.add_argument("--dim", type=int, default=1024)
    t.add_argument("--cache-gb", type=float, default=0.5)
    one = sub.add_parser("_train_one")
    one.add_argument("--work")
    one.add_argument("--n", type=int)
    one.add_argument("--model")
    one.add_argument("--mode", choices=["stream", "memory"])
    one.add_argument("--cache-gb", type=float)
    r = sub.add_parser("ratio", help="streamed vs in-memory epoch time, alternated in one process")
    r.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "wsi_bench_scale"))
    r.add_argument("--n", type=int, default=60)
    r.add_argument("--patches", type=int, default=1000)
    r.add_argument("--dim", type=int, default=1024)
    r.add_argument("--reps", type=int, default=3)
    p = sub.add_parser("plan")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "wsi_bench_scale"))
    p.add_argument("--rows", type=int, nargs=2, default=[1000, 10000])
    p.add_argument("--validate-all", action="store_true", help="validate-manifest at every size")
    args = ap.parse_args(argv)
    if args.cmd == "_train_one":
        print(json.dumps(train_once(Path(args.work) / "features", args.n, args.model, args.mode, args.cache_gb)))
    elif args.cmd == "train":
        cmd_train(args)
    elif args.cmd == "ratio":
        cmd_ratio(args)
    else:
        cmd_plan(args)


if __name__ == "__main__":
    main()
