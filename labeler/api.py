"""Python API of the labeler: a lazy Ray Dataset of predictions, or a finished job."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from labeler.images import DEFAULT_MAX_PIXELS, decode_batch
from labeler.model import ModelSpec, load_spec
from labeler.predict import Predictor, check_precision
from labeler.progress import Progress, ProgressChannel
from labeler.sources import plan_units, read_source
from labeler.storage import filesystem_for, join, list_files, write_bytes
from labeler.units import UNIT_COLUMN, UNIT_LOG, finished_units

logger = logging.getLogger(__name__)

GPU_BATCH_SIZE = 256
# On CPU, large batches are slower: efficientnet_b0 at 224 px on 2 cores ran at 57-85 images/s with
# batches of 16 and 39-41 with 64 or 128 (activations outgrow the caches and memory is re-faulted each call)
CPU_BATCH_SIZE = 16
# glibc malloc in a CPU inference actor: every forward pass frees and re-allocates activations of
# tens of MB; by default those are fresh mmaps (page faults: most of the time went to the kernel),
# and Ray Data calls the model from a worker thread, whose arena cannot hold them at all. One arena
# that keeps its memory makes them reuse it: efficientnet_b0 at 224 px in a thread on 2 cores went
# from 46-61 to 72-98 images/s, kernel time from 7.7 s to 1.0-1.1 s (benchmarks/labeler_throughput.py
# has the end-to-end effect). The actor's resident memory then stays at its peak.
CPU_INFERENCE_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(2**32),
    "MALLOC_TRIM_THRESHOLD_": str(2**32),
}


@dataclass
class LabelOptions:
    """Execution options; the defaults suit a laptop and scale up by setting them."""

    batch_size: int | None = None  # per inference call; None: 256 on GPU actors, 16 on CPU (see CPU_BATCH_SIZE)
    num_actors: int = 1
    max_actors: int | None = None
    num_gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    decode_cpus: float = 0.5  # per read task and per decode task, which run beside the inference actors
    threads_per_actor: int | None = None  # CPU inference threads per actor; None: the node's cores
    temperature: float = 1.0
    hard: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast)
    optimize: bool = True  # fold batch norms into convolutions + channels_last (same fp32 results, faster)
    wait_for_actors_s: float = 0.0  # 0: read and decode while actors start (a pool that never starts: stall_timeout_s)
    stall_timeout_s: float = 900.0  # fail when no output file appears for this long (a stalled pool)
    format: str = "auto"  # auto | folder | parquet | webdataset | manifest (a .txt of URIs is detected)
    image_column: str = "image"  # Parquet inputs
    id_column: str | None = None  # Parquet inputs; None = file + content hash
    topk: int = 0  # 0: store the full distribution; k: top-k classes + fp16 probabilities + remaining mass
    files_per_unit: int = 1000  # folder and manifest inputs: entries per read task, the unit of resume
    # keep each labeled image's encoded bytes in the predictions (column ``image``), so the balanced set
    # is a self-contained training set whatever the corpus format (no reads back into .tar shards);
    # only for predictions with confidence >= image_bytes_min_confidence (the balancing threshold)
    keep_image_bytes: bool = False
    image_bytes_min_confidence: float = 0.0


def _resolve_spec(checkpoint: str, spec: ModelSpec | None) -> ModelSpec:
    return spec if spec is not None else load_spec(checkpoint)


def label_images(
    source: str,
    checkpoint: str,
    options: LabelOptions | None = None,
    spec: ModelSpec | None = None,
    skip_units: frozenset = frozenset(),
    unit_log: str | None = None,
    progress: ProgressChannel | None = None,
    plan=None,
) -> ray.data.Dataset:
    """Lazily label every image in ``source`` (folder tree, Parquet or WebDataset; local or s3://).

    Every input image yields exactly one row: a prediction, or a rejection with a
    ``reject_reason`` (label -1), with the key of its input ``unit`` (labeler.units). Units in
    ``skip_units`` are not read (resume); with ``unit_log``, each read task records its unit's
    row count there. Nothing runs until the dataset is consumed. With ``progress``, the actors
    report the rows they finish (``labeled`` and ``rejected`` counts) to it. ``plan``: the corpus's
    ``labeler.sources.plan_units`` when the caller has listed it already.
    """
    opts = options or LabelOptions()
    check_precision(opts.precision)  # here too, not only in the actors: fail before any work
    spec = _resolve_spec(checkpoint, spec)
    # the actors' CPUs differ from decode_cpus (by default) so Ray Data does not fuse decoding into
    # the actors, where it would run in turn with inference instead of beside it
    ds = read_source(source, opts, frozenset(skip_units), unit_log, plan)
    ds = ds.map_batches(
        decode_batch,
        batch_size=64,
        batch_format="numpy",
        num_cpus=opts.decode_cpus,
        fn_kwargs={
            "image_size": spec.image_size,
            "crop_pct": spec.crop_pct,
            "interpolation": spec.interpolation,
            "in_chans": spec.in_chans,
            "max_pixels": opts.max_pixels,
            "keep_bytes": opts.keep_image_bytes,
        },
    )
    gpus = opts.num_gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = opts.wait_for_actors_s
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "spec": dataclasses.asdict(spec),
            "temperature": opts.temperature,
            "hard": opts.hard,
            "topk": opts.topk,
            "threads": opts.threads_per_actor,
            "optimize": opts.optimize,
            "precision": opts.precision,
            "keep_image_bytes": opts.keep_image_bytes,
            "image_bytes_min_confidence": opts.image_bytes_min_confidence,
            "progress": progress,
        },
        batch_size=opts.batch_size or (GPU_BATCH_SIZE if gpus else CPU_BATCH_SIZE),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=opts.num_actors, max_size=opts.max_actors or opts.num_actors),
        num_gpus=gpus,
        num_cpus=opts.cpus_per_actor,
        runtime_env=None if gpus else {"env_vars": CPU_INFERENCE_ENV},
    )


def run_labeling(
    source: str, checkpoint: str, out: str, options: LabelOptions | None = None, spec: ModelSpec | None = None
) -> dict:
    """Label ``source`` into Parquet under ``out/predictions/unit=<key>/`` and write ``out/manifest.json``.

    Running it again with the same ``out`` resumes by input unit (labeler.units): finished units
    are kept as written, anything else is redone whole, so no row is written twice or lost.
    """
    start, started = time.time(), time.monotonic()
    opts = options or LabelOptions()
    out = out.rstrip("/")
    plan = plan_units(source, opts.format, opts.image_column, opts.id_column, opts.files_per_unit)
    fmt, units, _ = plan
    done, resumed = finished_units(out, units)
    if done:
        logger.info(f"labeler: resuming, {len(done)} of {len(units)} input units ({resumed} images) already labeled")
    # a total only where the listing gives it (counting Parquet rows or tar members would mean reading them)
    total = sum(len(u.paths) for u in units) if fmt == "folder" else None
    channel, display = ProgressChannel.create(), None
    try:
        if len(done) < len(units):
            ds = label_images(source, checkpoint, opts, spec, frozenset(done), join(out, UNIT_LOG), channel, plan)
            display = Progress("labeling", total=total, unit="img", initial=resumed if total else 0)
            _write_watched(ds, out + "/predictions", opts.stall_timeout_s, channel, display)
        manifest = summarize_predictions(out + "/predictions", out + "/rejected.parquet")
        if display is not None:
            # the last line: the whole job's rate (the actors' last counts arrive with the manifest, not before)
            display.restart_clock(display.initial, since=started)
            display.update(manifest["rows"] if total else manifest["rows"] - resumed, rejected=manifest["rejected"])
    finally:
        if display is not None:
            display.close()
        channel.shutdown()
    seconds = time.time() - start
    manifest.update({"source": source, "checkpoint": checkpoint, "seconds": round(seconds, 2)})
    manifest.update(units=len(units), resumed_from=resumed)
    manifest["images_per_s"] = round((manifest["rows"] - resumed) / max(seconds, 1e-9), 1)
    write_bytes(out + "/manifest.json", json.dumps(manifest, indent=2).encode())
    logger.info(
        f"labeled {manifest['labeled']} images, rejected {manifest['rejected']} "
        f"({manifest['reject_reasons']}) in {manifest['seconds']} s: {manifest['images_per_s']} images/s"
    )
    return manifest


class LabelingStalled(RuntimeError):
    """No new output for ``stall_timeout_s``: the pipeline is stuck, not slow."""


def _write_watched(
    ds: ray.data.Dataset,
    predictions: str,
    stall_timeout_s: float,
    channel: ProgressChannel | None = None,
    display: Progress | None = None,
    poll_s: float = 10.0,
) -> None:
    """``write_parquet`` with a progress display (fed by ``channel``) and a no-progress watchdog.

    A pool that can never be scheduled (say, actors holding every CPU so reads never run)
    otherwise hangs silently forever; this raises instead. The job's Ray cluster must then be
    shut down (the CLI exits) to stop the stuck dataset.
    """
    fs, path = filesystem_for(predictions)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            ds.write_parquet(path, filesystem=fs, partition_cols=[UNIT_COLUMN])
        except BaseException as err:  # re-raised in the caller's thread
            errors.append(err)

    writer = threading.Thread(target=write, name="labeler-write", daemon=True)
    start = last_change = time.time()
    before = files = len(list_files(predictions)[1])
    writer.start()
    labeled = rejected = 0
    base = display.n if display is not None else 0
    last_poll, clock_started = start, False
    while writer.is_alive():
        writer.join(timeout=1.0 if display is not None else poll_s)
        events = channel.drain() if channel is not None else []
        if events and display is not None and not clock_started:  # rate and ETA from the first batch on
            display.restart_clock(base)
            clock_started = True
        for event in events:
            labeled, rejected = labeled + event.get("labeled", 0), rejected + event.get("rejected", 0)
        if events:
            last_change = time.time()  # rows are being labeled: slow, not stalled
        if display is not None:
            display.update(base + labeled + rejected, rejected=rejected)
        now = time.time()
        if now - last_poll < poll_s and writer.is_alive():
            continue
        last_poll, count = now, len(list_files(predictions)[1])
        if count != files:
            files, last_change = count, now
            logger.debug(f"labeler: {files - before} output files written in {now - start:.0f} s")
        elif writer.is_alive() and now - last_change > stall_timeout_s:
            raise LabelingStalled(
                f"labeling made no progress for {now - last_change:.0f} s (no labeled batch, no new file under "
                f"{predictions}). "
                "Usually the actor pool and the read/decode tasks cannot all be scheduled: give actors fewer "
                "CPUs (cpus_per_actor), use fewer actors, or add nodes; raise stall_timeout_s if the job is just slow."
            )
    if errors:
        raise errors[0]


def summarize_predictions(predictions: str, rejected_out: str | None = None) -> dict:
    """Counts from the written predictions, in one streaming pass over them, file by file.

    With ``rejected_out``, the rejected images (id, path, reject_reason) are written there too.
    ``damaged_shards`` names the WebDataset shards that were cut off or corrupt (their readable
    samples are labeled; one ``damaged_shard`` row stands for the rest).
    """
    from collections import Counter

    schema = pa.schema([("id", pa.string()), ("path", pa.string()), ("reject_reason", pa.string())])
    fs, files = list_files(predictions)
    rows, reasons, per_class, damaged = 0, Counter(), Counter(), set()  # damaged: shards, few
    writer = sink = None
    if rejected_out:
        ofs, opath = filesystem_for(rejected_out)
        sink = ofs.open_output_stream(opath)
        writer = pq.ParquetWriter(sink, schema)
    try:
        for f in files:
            t = pq.read_table(f, filesystem=fs, columns=["id", "path", "reject_reason", "label"])
            rows += t.num_rows
            bad = pc.is_valid(t["reject_reason"])
            reasons.update(pc.filter(t["reject_reason"], bad).to_pylist())
            per_class.update(pc.filter(t["label"], pc.invert(bad)).to_pylist())
            damaged.update(pc.filter(t["path"], pc.equal(t["reject_reason"], "damaged_shard")).to_pylist())
            if writer:
                writer.write_table(t.filter(bad).select(schema.names).cast(schema))
    finally:
        if writer:
            writer.close()
            sink.close()
    rejected = sum(reasons.values())
    return {
        "rows": rows,
        "labeled": rows - rejected,
        "rejected": rejected,
        "reject_reasons": dict(sorted(reasons.items())),
        "damaged_shards": sorted(damaged),
        "per_class": {int(k): v for k, v in sorted(per_class.items())},
    }
