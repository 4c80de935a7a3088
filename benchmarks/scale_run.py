"""The JFT-shaped path at two corpus sizes: labeling, balancing and a streaming student on shards.

    pip install -e ".[bench]"
    python benchmarks/scale_run.py                              # N = 100,000 and 1,000,000 (docs/benchmarks.md)
    python benchmarks/scale_run.py --images 20000 200000        # quicker
    python benchmarks/scale_run.py --steps 0 --phash-baseline   # what near-duplicate detection costs
    python benchmarks/scale_run.py --images 100000 --kill-after 20   # SIGKILL labeling, resume, check counts
    python benchmarks/scale_run.py --steps 0 --object-store-mb 512  # labeling's read-ahead limited
    python benchmarks/scale_run.py --steps 50 --student-only runs/scale/n100000/run-* runs/scale/n1000000/run-*

Corpus: scikit-learn's 1,797 digits, each copy randomly shifted, scaled and noised (no two alike),
16x16 grayscale PNGs in WebDataset shards of 10,000 (and the same images as Parquet files, for
``--format parquet``). Teacher: timm's ``test_resnet`` at 16 px, trained here in-process for a
few hundred steps on all the digits (a teacher that predicts every class, so balancing trims and
fills). Stages, each timed: labeling (``run_labeling``, which hashes every image: ``label.phash``),
the near-duplicate step (``labeler.dedup``: hashing an evaluation set of ``--eval-images`` other
variants, as PNG files in a folder, then comparing every prediction with it at the default distance),
balancing to ``--per-class`` rows per class at threshold 0.3 (without the excluded rows), and a student
(``feed: ray_data``) for a fixed ``--steps`` steps, which reads the balanced set (the images travel in it)
across many of its files. ``--phash-baseline`` also labels each corpus with ``phash`` off first, the
baseline of what hashing adds to labeling, and prints the near-duplicate cost against it.

Memory is sampled every 0.5 s from the processes themselves (psutil): the driver, and the largest
of the Ray processes this run started (its descendants: workers, raylet, GCS), each as its own
memory (USS) and as its resident set (RSS, which also counts shared object-store pages).
Prints a table per N and the ratios of the largest N to the smallest; this machine is shared and
noisy, so only same-run ratios mean much. The 1M-image run writes about 0.6 GB under --workdir.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARD = 10_000
SIZE = 16


def synthetic_digits(n: int, seed: int):
    """Yield (key, png bytes) of ``n`` distinct variants of the digits: shift, scale, noise."""
    from sklearn.datasets import load_digits

    base = load_digits().images / 16.0
    rng = np.random.default_rng(seed)
    for start in range(0, n, SHARD):
        m = min(SHARD, n - start)
        idx = rng.integers(0, len(base), m)
        scale = rng.uniform(1.5, 2.0, m)
        shift = rng.integers(-2, 3, (m, 2))
        noise = rng.normal(0, 0.08, (m, SIZE, SIZE))
        for j in range(m):
            side = int(round(8 * scale[j]))
            img = Image.fromarray((base[idx[j]] * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
            canvas = np.zeros((SIZE, SIZE), np.float32)
            off = (SIZE - side) // 2
            arr = np.asarray(img, np.float32) / 255.0
            y0, x0 = off + shift[j, 0], off + shift[j, 1]
            ys, xs = slice(max(0, y0), min(SIZE, y0 + side)), slice(max(0, x0), min(SIZE, x0 + side))
            canvas[ys, xs] = arr[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
            out = ((canvas + noise[j]).clip(0, 1) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(out, "L").save(buf, format="PNG")
            yield f"img{start + j:09d}", buf.getvalue()


def write_corpus(root: str, n: int, seed: int = 0) -> dict:
    """WebDataset shards and Parquet files of the same ``n`` images (skipped when already there)."""
    wds, parquet = os.path.join(root, "wds"), os.path.join(root, "parquet")
    marker = os.path.join(root, "corpus.json")
    if os.path.exists(marker) and json.load(open(marker))["images"] == n:
        return {"webdataset": wds, "parquet": parquet}
    os.makedirs(wds, exist_ok=True)
    os.makedirs(parquet, exist_ok=True)
    keys, blobs = [], []
    for key, png in synthetic_digits(n, seed):
        keys.append(key)
        blobs.append(png)
        if len(keys) == SHARD:
            _flush(wds, parquet, keys, blobs)
            keys, blobs = [], []
    if keys:
        _flush(wds, parquet, keys, blobs)
    json.dump({"images": n}, open(marker, "w"))
    return {"webdataset": wds, "parquet": parquet}


def _flush(wds: str, parquet: str, keys: list, blobs: list) -> None:
    shard = int(keys[0][3:]) // SHARD
    with tarfile.open(os.path.join(wds, f"shard-{shard:05d}.tar"), "w") as tar:
        for key, data in zip(keys, blobs):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": keys, "image": blobs}), os.path.join(parquet, f"part-{shard:05d}.parquet"))


def train_teacher(directory: str, steps: int = 300):
    """test_resnet at 16 px on all 1,797 digits, in-process (a teacher that predicts every class)."""
    import torch
    from sklearn.datasets import load_digits

    from core.model import ModelSpec, create_model, save_checkpoint

    spec = ModelSpec("test_resnet", [str(i) for i in range(10)], SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    if os.path.exists(os.path.join(directory, "model.json")):
        return spec
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    x = torch.nn.functional.interpolate(x, size=SIZE, mode="bilinear").repeat(1, 3, 1, 1)
    x, y = (x - 0.5) / 0.5, torch.tensor(digits.target)
    torch.manual_seed(0)
    model = create_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_checkpoint(model, spec, directory)
    return spec


def _is_store(path: str) -> bool:
    """Whether a mapping is Ray's object store (plasma, a /dev/shm mapping)."""
    return "plasma" in path or path.startswith("/dev/shm")


def _sum_jumps(jumps: list) -> dict:
    out: dict[str, int] = {}
    for title, mb in jumps:
        out[title] = out.get(title, 0) + mb
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:5])


class MemorySampler:
    """Peak memory of this process and of the largest of its descendants (Ray's), sampled.

    Two measures per process: the resident set (RSS), which also counts the pages of Ray's shared
    object store a process has touched (they grow with how much data passed through it, up to the
    store's size, and are not that process's own), and the unique set (USS: pages no other process
    maps), the process's own memory. The ratios are taken on USS; RSS is printed beside it.
    """

    def __init__(self, interval: float = 0.5):
        self.interval, self.me = interval, psutil.Process()
        self.driver = self.worker = self.driver_rss = self.worker_rss = 0
        self.worker_name = ""
        self.worker_heap, self.worker_heap_name = 0, ""  # USS less object-store pages, the largest process
        # per Ray process (pid): peak USS, its title at that peak (a Ray worker's title is what it runs:
        # ray::IDLE, ray::ReadParquet->MapBatches(...), ...; raylet and gcs_server show their binary), its
        # last USS and title, and its peak USS under each title
        self.procs: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _store_pages(proc: psutil.Process) -> int:
        """Bytes of Ray's object store (plasma, a /dev/shm mapping) that count in ``proc``'s USS: store
        pages only this process has mapped (objects it wrote that no other process has read yet, or
        freed ones); the store's memory, capped by object_store_memory, not the process's heap."""
        return sum(m.private_clean + m.private_dirty for m in proc.memory_maps(grouped=True) if _is_store(m.path))

    def _sample(self, proc: psutil.Process) -> tuple[int, int]:
        info = proc.memory_full_info()
        return info.uss, info.rss

    @staticmethod
    def _title(proc: psutil.Process) -> str:
        cmd = " ".join(proc.cmdline()).strip()
        if cmd.startswith("ray::"):
            return cmd[:90]
        return os.path.basename(proc.cmdline()[0])[:40] if proc.cmdline() else proc.name()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                uss, rss = self._sample(self.me)
                self.driver, self.driver_rss = max(self.driver, uss), max(self.driver_rss, rss)
                for child in self.me.children(recursive=True):
                    try:
                        uss, rss = self._sample(child)
                        title = self._title(child)
                        self.worker_rss = max(self.worker_rss, rss)
                        if uss > self.worker_heap:  # else its own memory less the store's pages is no larger
                            heap = uss - self._store_pages(child)
                            if heap > self.worker_heap:
                                self.worker_heap, self.worker_heap_name = heap, title
                        rec = self.procs.setdefault(child.pid, {"peak": 0, "peak_title": "", "titles": {}})
                        if uss - rec.get("last", uss) >= 32 << 20:  # grew between two samples: under which title
                            rec.setdefault("jumps", []).append((title, (uss - rec["last"]) >> 20))
                        rec["last"], rec["last_title"] = uss, title
                        rec["titles"][title] = max(rec["titles"].get(title, 0), uss)  # peak USS per title
                        if uss > rec["peak"]:
                            rec["peak"], rec["peak_title"] = uss, title
                        if uss > self.worker:
                            self.worker, self.worker_name = uss, title
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    @staticmethod
    def breakdown(pid: int) -> dict:
        """A process's own memory (private pages, MB) by mapping: Ray's object store (plasma, shared memory),
        the heap and other anonymous memory, and files (libraries)."""
        out = {"plasma": 0, "anon": 0, "files": 0}
        try:
            for m in psutil.Process(pid).memory_maps(grouped=True):
                kind = "plasma" if _is_store(m.path) else "files" if m.path.startswith("/") else "anon"
                out[kind] += m.private_clean + m.private_dirty
        except psutil.Error:
            return {}
        return {k: v >> 20 for k, v in out.items()}

    def top(self, k: int = 3) -> list[dict]:
        """The ``k`` Ray processes with the largest peak USS: pid, peak and last MB, titles."""
        ranked = sorted(self.procs.items(), key=lambda kv: -kv[1]["peak"])[:k]
        out = []
        for pid, r in ranked:
            by_title = sorted(r["titles"].items(), key=lambda kv: -kv[1])[:5]
            out.append({"pid": pid, "own_mb_now": self.breakdown(pid), "peak_mb": r["peak"] >> 20,
                        "at_peak": r["peak_title"], "last_mb": r["last"] >> 20, "last": r["last_title"],
                        "peak_mb_by_title": {t: v >> 20 for t, v in by_title},
                        "growth_mb_by_title": _sum_jumps(r.get("jumps", []))})  # fmt: skip
        return out

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_eval_set(folder: str, n: int) -> str:
    """``n`` more variants (another seed: none is a corpus image) as PNG files in one folder (kept when there)."""
    if os.path.exists(folder) and len(os.listdir(folder)) == n:
        return folder
    os.makedirs(folder, exist_ok=True)
    for key, png in synthetic_digits(n, seed=1):
        with open(os.path.join(folder, f"{key}.png"), "wb") as f:
            f.write(png)
    return folder


def near_duplicates(predictions: str, eval_set: str, out: str) -> dict:
    """The loop's near-duplicate step: hash the evaluation set, compare every prediction with it."""
    from labeler.dedup import collect_hashes, find_duplicates

    return find_duplicates(predictions, {"test": collect_hashes(eval_set)}, out)


def run_size(n: int, args, teacher: str, spec, labeled: str) -> dict:
    """Label, compare with the evaluation set, balance and train a student on a corpus of ``n`` images; time
    and memory per stage."""
    import dataclasses

    from labeler.api import LabelOptions, run_labeling
    from pipeline.balance import balance_predictions

    root = os.path.join(args.workdir, f"n{n}")
    corpus = write_corpus(os.path.join(root, "corpus"), n)[args.format]
    out = os.path.join(root, f"run-{time.time_ns()}")
    opts = LabelOptions(batch_size=args.batch, keep_image_bytes=True, image_bytes_min_confidence=args.threshold,
                        object_store_mb=args.object_store_mb)  # fmt: skip
    stages: dict[str, dict] = {}

    def stage(name, fn):
        with MemorySampler() as mem:
            start = time.perf_counter()
            result = fn()
            stages[name] = {"seconds": round(time.perf_counter() - start, 1), "driver_mb": mem.driver >> 20,
                            "worker_mb": mem.worker >> 20, "worker": mem.worker_name,
                            "driver_rss_mb": mem.driver_rss >> 20, "worker_rss_mb": mem.worker_rss >> 20,
                            "worker_no_store_mb": mem.worker_heap >> 20, "worker_no_store": mem.worker_heap_name,
                            "top": mem.top()}  # fmt: skip
        top = stages[name].pop("top")
        print(f"  N={n:,} {name}: {stages[name]}", flush=True)
        for t in top:
            print(f"      {t}", flush=True)
        stages[name]["top"] = top
        return result

    if args.phash_baseline:
        off = dataclasses.replace(opts, phash=False)
        stage("labeling, phash off", lambda: run_labeling(corpus, teacher, os.path.join(out, "labels_off"), off))
    manifest = stage("labeling", lambda: run_labeling(corpus, teacher, os.path.join(out, "labels"), opts))
    assert manifest["rows"] == n, manifest
    predictions, dedup = os.path.join(out, "labels", "predictions"), os.path.join(out, "dedup")
    eval_set = write_eval_set(os.path.join(args.workdir, f"eval{args.eval_images}"), args.eval_images)
    found = stage("near-duplicates", lambda: near_duplicates(predictions, eval_set, dedup))
    print(f"  N={n:,} near-duplicates: {found['near_duplicates_of_eval']}, corpus {found['corpus_duplicates']}")
    per_class = args.per_class or n // 20
    stats = stage("balancing", lambda: balance_predictions(
        predictions, out, 10, per_class, args.threshold, dedup=dedup))  # fmt: skip
    if args.steps:
        stage("student", lambda: train_student(out, args.steps, spec, labeled))
    _file_layout(out, n)
    sizes = {k: _megabytes(p) for k, p in (("corpus", corpus), ("predictions", os.path.join(out, "labels")),
                                            ("balanced", os.path.join(out, "balanced")))}  # fmt: skip
    print(f"  N={n:,} storage MB: {sizes}")
    return {"n": n, "stages": stages, "balanced_rows": stats["total_rows"], "labeled": manifest["labeled"],
            "passes": stats["refinement_passes"], "images_per_s": manifest["images_per_s"], "mb": sizes}  # fmt: skip


def train_student(out: str, steps: int, spec, labeled: str) -> dict:
    """The student stage: ``steps`` steps of 32 labeled + 96 pseudo-labeled images, ``feed: ray_data``,
    reading ``out/balanced``; writes under ``out/student``."""
    from trainer.api import train_model
    from trainer.settings import TrainSettings

    settings = TrainSettings(epochs=1, steps_per_epoch=steps, batch_size=32, ratio=3, num_workers=1,
                             feed="ray_data", warmup_epochs=0, recalibrate_bn=False)  # fmt: skip
    tag = f"student-{time.time_ns()}"  # a rerun on the same balanced set starts afresh (no resume)
    final = train_model(settings, spec, labeled, os.path.join(out, tag), os.path.join(out, "ray_train"), tag,
                        pseudo=os.path.join(out, "balanced"), progress=False)  # fmt: skip
    assert final["unreadable_pseudo"] == 0 and final["images"] == steps * 128, final
    return final


def student_only(runs: list[str], steps: int, spec, labeled: str) -> None:
    """``--student-only``: the student stage alone on the balanced sets of earlier runs, timed."""
    for out in runs:
        with MemorySampler() as mem:
            start = time.perf_counter()
            train_student(out, steps, spec, labeled)
            seconds = time.perf_counter() - start
        print(f"  {out}: student {steps} steps {seconds:.1f} s, driver {mem.driver >> 20} MB, "
              f"largest Ray process {mem.worker >> 20} MB (USS)", flush=True)  # fmt: skip
        for t in mem.top():
            print(f"      {t}", flush=True)


def _file_layout(out: str, n: int) -> None:
    """Rows per Parquet file and row groups of the predictions and the balanced set (they bound block sizes)."""
    import glob

    for name, pattern in (("predictions", "labels/predictions/**/*.parquet"), ("balanced", "balanced/*.parquet")):
        metas = [pq.ParquetFile(f).metadata for f in glob.glob(os.path.join(out, pattern), recursive=True)]
        if not metas:
            continue
        rows = [m.num_rows for m in metas]
        groups = [m.num_row_groups for m in metas]
        print(f"  N={n:,} {name}: {len(metas)} files, rows per file min {min(rows):,} max {max(rows):,}, "
              f"row groups per file max {max(groups)}", flush=True)  # fmt: skip


def _megabytes(path: str) -> float:
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return round(total / 2**20, 1)


def kill_and_resume(n: int, args, teacher: str) -> None:
    """SIGKILL a labeling job (its driver and every process it started) part-way, resume, check counts."""
    root = os.path.join(args.workdir, f"n{n}")
    corpus = write_corpus(os.path.join(root, "corpus"), n)[args.format]
    out = os.path.join(root, f"killed-{time.time_ns()}")
    cmd = [sys.executable, "-m", "labeler", "--input", corpus, "--checkpoint", teacher, "--output", out,
           "--batch-size", str(args.batch), "--object-store-mb", str(args.object_store_mb)]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(args.kill_after)
    family = [proc, *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:  # only the processes this job started, by pid
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    units = len(os.listdir(os.path.join(out, "units"))) if os.path.exists(os.path.join(out, "units")) else 0
    print(f"  killed after {args.kill_after} s with {units} input units recorded; resuming")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    ids = pq.read_table(os.path.join(out, "predictions"), columns=["id"])["id"]
    distinct = pc.count_distinct(ids).as_py()
    ok = len(ids) == distinct == n == manifest["labeled"] + manifest["rejected"]
    print(f"  resumed_from={manifest['resumed_from']} rows={len(ids)} distinct ids={distinct} inputs={n}: "
          f"{'exact' if ok else 'MISMATCH'}")  # fmt: skip
    if not ok:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--format", choices=["webdataset", "parquet"], default="webdataset")
    parser.add_argument("--workdir", default="runs/scale")
    parser.add_argument("--steps", type=int, default=200, help="student steps (128 images each); 0: no student")
    parser.add_argument("--per-class", type=int, default=0, help="balancing target (0: N / 20)")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--eval-images", type=int, default=10_000, help="evaluation set of the near-duplicate step")
    parser.add_argument("--phash-baseline", action="store_true", help="also label with phash off first (the "
                        "baseline of the near-duplicate cost)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=256, help="inference batch")
    parser.add_argument("--object-store-mb", type=float, default=0.0, help="labeling's object-store limit "
                        "(label.object_store_mb; 0: Ray Data's default)")  # fmt: skip
    parser.add_argument("--kill-after", type=float, help="kill-and-resume mode: SIGKILL labeling after this many s")
    parser.add_argument("--student-only", nargs="+", metavar="RUN", help="time the student stage alone on earlier "
                        "runs' balanced sets (RUN: a run-* folder under --workdir/n<N>/)")  # fmt: skip
    parser.add_argument("--default-allocator", action="store_true", help="workers keep pyarrow's default memory "
                        "pool (mimalloc) instead of core.ray_runtime.WORKER_ENV, for comparison")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.makedirs(args.workdir, exist_ok=True)
    args.workdir = os.path.abspath(args.workdir)
    teacher = os.path.join(args.workdir, "teacher")
    spec = train_teacher(teacher)
    if args.kill_after:
        for n in args.images:
            kill_and_resume(n, args, teacher)
        return
    import ray

    from pipeline.digits import write_digits_corpus

    labeled = write_digits_corpus(os.path.join(args.workdir, "digits"), 20, 0.1, 0)["labeled"]
    from core.ray_runtime import worker_runtime_env

    runtime_env = None if args.default_allocator else worker_runtime_env()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if args.student_only:
        student_only(args.student_only, args.steps, spec, labeled)
        ray.shutdown()
        return
    results = [run_size(n, args, teacher, spec, labeled) for n in args.images]
    ray.shutdown()
    print("\n| N | stage | seconds | driver peak MB: own (USS) / RSS | largest Ray process peak MB: own (USS) / RSS "
          "| largest Ray process peak MB: USS less object-store pages |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in results:
        for name, st in r["stages"].items():
            print(f"| {r['n']:,} | {name} | {st['seconds']} | {st['driver_mb']} / {st['driver_rss_mb']} | "
                  f"{st['worker_mb']} / {st['worker_rss_mb']} | {st['worker_no_store_mb']} |")  # fmt: skip
    lo, hi = results[0], results[-1]
    print(f"\nratios N={hi['n']:,} / N={lo['n']:,} ({hi['n'] / lo['n']:.0f}x the images):")
    for name in lo["stages"]:
        a, b = lo["stages"][name], hi["stages"][name]
        time_x, driver_x, ray_x = (b[k] / a[k] for k in ("seconds", "driver_mb", "worker_mb"))
        rss_x = b["worker_rss_mb"] / a["worker_rss_mb"]
        heap_x = b["worker_no_store_mb"] / a["worker_no_store_mb"]
        print(f"  {name}: time {time_x:.2f}x, driver memory {driver_x:.2f}x, largest Ray process memory {ray_x:.2f}x"
              f" (RSS, counting shared object-store pages: {rss_x:.2f}x; USS less the object-store pages in "
              f"it: {heap_x:.2f}x)")  # fmt: skip
    for r in results if args.phash_baseline else []:
        st = r["stages"]
        base, step = st["labeling, phash off"]["seconds"], st["near-duplicates"]["seconds"]
        added = st["labeling"]["seconds"] - base
        print(f"  N={r['n']:,}: hashing in labeling {added:+.1f} s, near-duplicate step {step} s; together "
              f"{(added + step) / base:.1%} of labeling without hashes ({base} s)")  # fmt: skip
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
