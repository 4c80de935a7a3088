"""Python API of the labeler: a lazy Ray Dataset of predictions, or a finished job."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import warnings

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from core.checkpoint_import import head_width
from core.cluster import WAIT_NOTICE_S, WAIT_REPEAT_S, cluster_resources, fit_pool, waiting_for, whole_gpu
from core.console import Progress, ProgressChannel
from core.fingerprint import OutputMismatch, differences, file_sha256
from core.images import decode_batch
from core.model import STATE_DICT_SUFFIXES, ModelSpec, check_weights_file, load_spec, weights_file
from core.ray_runtime import started_here, stop_running_datasets
from core.storage import (
    canonical,
    delete_file,
    delete_tree,
    exists,
    filesystem_for,
    join,
    list_files,
    read_json,
    retry_counts,
    write_bytes,
    write_json,
)
from labeler.options import ROW_SETTINGS, LabelOptions
from labeler.predict import Predictor, check_precision
from labeler.sources import detect_format, plan_units, read_source, unit_rows
from labeler.units import UNIT_COLUMN, UNIT_LOG, finished_units

logger = logging.getLogger(__name__)
# Ray Data warns when a write's concurrency exceeds its estimate of the blocks coming in, which it
# makes before a job runs and which is often 1 here; the cap (see _write_watched) is deliberate
warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'Write'", category=UserWarning)

LISTING = "listing.parquet"  # beside predictions/: a folder corpus's listing (labeler.listing)
RECORD = "inputs.json"  # beside predictions/: what made them (labeling_record), checked before reuse


def gpus_per_task(resources: dict[str, float] | None = None) -> int:
    """GPUs to ask for per inference actor or evaluation task: 1 when the cluster has at least one
    whole GPU, else 0 (CPU).

    ``resources``: a ``ray.cluster_resources()`` dict (None: the running cluster's, or the most its
    autoscaler may provide when that is more).
    A total below 1 (a fractional GPU resource, or none) gives 0: a request for one whole GPU could
    never be scheduled there and would wait forever.
    """
    if resources is None:  # on an autoscaling cluster, GPU nodes it may add count (core.cluster)
        return whole_gpu(*cluster_resources())
    return whole_gpu(resources)


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
    """Lazily label every image in ``source`` (folder tree, Parquet, WebDataset or manifest; local or s3://).

    Every input image yields exactly one row: a prediction, or a rejection with a
    ``reject_reason`` (label -1), with the key of its input ``unit`` (labeler.units). Units in
    ``skip_units`` are not read (resume); with ``unit_log``, each read task records its unit's
    row count there. Nothing runs until the dataset is consumed. With ``progress``, the actors
    report the rows they finish (``labeled`` and ``rejected`` counts) to it. ``plan``: the corpus's
    ``labeler.sources.plan_units`` when the caller has listed it already.

    Rows (``labeler.predict.prediction_schema``): ``id``, ``path`` (a URI: ``s3://bucket/key`` for
    S3 corpora), ``label`` int64 (-1 when rejected), ``confidence`` float32 (top probability, 0..1),
    ``probs`` float32 (classes,) or top-k columns (``topk_classes``, fp16 ``topk_probs``,
    ``rest_mass``), ``reject_reason``, ``unit``, ``phash`` int64 (a 64-bit perceptual hash's
    bits, :mod:`core.phash`; null when rejected) with ``phash``, and ``image`` bytes with ``keep_image_bytes``.
    Soft labels are ``softmax(logits / temperature)`` (google-research/noisystudent
    ``predict_label.py``: ``probs ** (1/T)`` renormalised, the same distribution); ``hard`` stores
    one-hot rows.

    Raises:
        ValueError: an unknown ``precision`` or ``format``, or an input without files.
        FileNotFoundError: ``source``, or the checkpoint's ``model.json``, does not exist.
    """
    opts = options or LabelOptions()
    check_precision(opts.precision)  # here too, not only in the actors: fail before any work
    spec = _resolve_spec(checkpoint, spec)
    check_weights_file(weights_file(checkpoint))
    ds = _decoded(read_source(source, opts, frozenset(skip_units), unit_log, plan), spec, opts)
    return _bounded(_predicted(ds, checkpoint, spec, opts, progress), opts)


def _bounded(ds: ray.data.Dataset, opts: LabelOptions) -> ray.data.Dataset:
    """``ds`` with ``opts.object_store_mb`` as the limit of its execution on the object store (its own
    context, not the process's); unchanged when 0.

    Ray Data's own limit is half the object store. On a corpus larger than that, reading and decoding
    run that far ahead of the actors, and the processes that touch the waiting blocks map their pages:
    in ``benchmarks/scale_run.py`` the largest Ray process grew 1.41x (by USS) from 100k to 1M images
    without a limit and 1.14x with 512 MB. The limit is not the default because Ray Data throttles a
    pipeline whose limit holds few blocks: ``benchmarks/read_ahead_limit.py`` (3 MB read blocks) took
    10.1 s without a limit, 8.9 s with 512 MB and 85.1 s with 64 MB (docs/benchmarks.md, "Sharded corpora at scale").
    """
    if opts.object_store_mb > 0:
        ctx = ds.context
        limit = int(opts.object_store_mb * 2**20)
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(object_store_memory=limit)
    return ds


def _decoded(ds: ray.data.Dataset, spec: ModelSpec, opts: LabelOptions) -> ray.data.Dataset:
    """The decode stage: read rows -> uint8 images at the model's size (core.images.decode_batch)."""
    # the actors' CPUs differ from decode_cpus (by default) so Ray Data does not fuse decoding into
    # the actors, where it would run in turn with inference instead of beside it
    return ds.map_batches(
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
            "phash": opts.phash,
        },
    )


def _predicted(
    ds: ray.data.Dataset, checkpoint: str, spec: ModelSpec, opts: LabelOptions, progress: ProgressChannel | None
) -> ray.data.Dataset:
    """The inference stage: a pool of :class:`labeler.predict.Predictor` actors (on GPUs when there are),
    sized by :func:`core.cluster.fit_pool`: it starts with ``num_actors``, keeps at least one (so a lost
    node does not stall it) and grows to ``max_actors``, within what the cluster has or may grow to."""
    now, most = cluster_resources()
    size = fit_pool(
        opts.num_actors,
        opts.max_actors,
        opts.cpus_per_actor,
        opts.num_gpus_per_actor,
        opts.decode_cpus,
        now,
        most,
        fixed=started_here(),
    )
    gpus = size.gpus_per_actor
    logger.info(
        f"labeler: inference pool of {size.initial} actor(s), at least 1, up to {size.maximum} "
        f"({opts.cpus_per_actor:g} CPU, {gpus:g} GPU each)"
    )
    # the dataset's own context (read_datasource copied the process's): set on the current one, it never
    # reached this job and leaked into later ones
    ds.context.wait_for_min_actors_s = opts.wait_for_actors_s
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
            "phash": opts.phash,
            "progress": progress,
        },
        batch_size=opts.batch_size or (GPU_BATCH_SIZE if gpus else CPU_BATCH_SIZE),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, initial_size=size.initial, max_size=size.maximum),
        num_gpus=gpus,
        num_cpus=opts.cpus_per_actor,
        runtime_env=None if gpus else {"env_vars": CPU_INFERENCE_ENV},
    )


def labeling_record(source: str, checkpoint: str, options: LabelOptions, spec: ModelSpec | None = None) -> dict:
    """What makes a labeling job's rows (``out/inputs.json``): the corpus location, the SHA-256 of the
    checkpoint's weights (the file itself for a bare state dict), the model spec (classes, input size,
    preprocessing) and the :data:`ROW_SETTINGS`. The corpus's files are fingerprinted per unit
    (``labeler.units``).

    Raises:
        FileNotFoundError: no checkpoint (or ``model.json``) there.
    """
    spec = _resolve_spec(checkpoint, spec)
    check_weights_file(weights_file(checkpoint))
    model = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("model_id", "extra")}
    return {
        "source": canonical(source),
        "checkpoint_sha256": file_sha256(weights_file(checkpoint)),
        "model": json.loads(json.dumps(model)),  # tuples as lists, as read back from the file
        "settings": {name: getattr(options, name) for name in ROW_SETTINGS},
    }


def prepare_output(out: str, record: dict, overwrite: bool = False) -> bool:
    """Make ``out`` ready for a labeling job made by ``record`` (:func:`labeling_record`): with
    ``overwrite``, delete what an earlier job wrote there; else check that it was made by the same record.
    Writes the record when there is none. Returns whether an earlier job's output is being resumed.

    Raises:
        OutputMismatch: ``out`` holds output of other inputs (the message lists what changed), or output
            with no record of its inputs; it says how to start fresh.
    """
    written = _written(out)
    if overwrite and (written or exists(join(out, RECORD))):
        for name in ("predictions", UNIT_LOG):
            delete_tree(join(out, name))
        for name in ("manifest.json", "rejected.parquet", LISTING, RECORD):
            delete_file(join(out, name))
        logger.info(f"labeler: --overwrite: deleted the earlier output under {out}")
        written = False
    if written:
        _compare_record(out, record)
        return True
    write_json(join(out, RECORD), record)  # a record alone (a job that failed before writing) is replaced
    return False


def _written(out: str) -> bool:
    """Whether a labeling job has written anything under ``out`` besides its record."""
    return any(exists(join(out, name)) for name in ("predictions", UNIT_LOG, "manifest.json"))


FRESH = "write to a new output, or pass --overwrite (labeler) / run with --overwrite (noisy-student) to delete it"


def _compare_record(out: str, record: dict) -> None:
    """Raise :class:`OutputMismatch` unless ``out``'s record of its inputs is ``record``."""
    try:
        before = read_json(join(out, RECORD))
    except (FileNotFoundError, ValueError):
        raise OutputMismatch(
            f"{out} holds predictions with no (readable) record of what made them ({RECORD}: an older version of "
            f"the labeler); to start fresh, {FRESH}"
        ) from None
    if before != record:
        raise OutputMismatch(
            f"{out} holds predictions made from other inputs; what changed: "
            f"{'; '.join(differences(before, record))}. Nothing was relabeled. To start fresh, {FRESH}"
        )


def check_labeling_inputs(
    source: str,
    checkpoint: str,
    out: str,
    options: LabelOptions | None = None,
    spec: ModelSpec | None = None,
    overwrite: bool = False,
) -> tuple | None:
    """What :func:`run_labeling` checks before it starts, without Ray and without writing anything: the
    checkpoint (a real weights file, a readable spec), the corpus (exists, its format, every Parquet
    file's columns) and whether ``out`` may be resumed (made from the same record). Returns the corpus's
    plan (``labeler.sources.plan_units``) for Parquet and WebDataset corpora, to pass to
    :func:`run_labeling` so the footers are not read twice; None for folders and manifests (listed by the job).

    Raises:
        OutputMismatch, ValueError, FileNotFoundError: as :func:`run_labeling`, before any compute.
    """
    opts = options or LabelOptions()
    record = labeling_record(source, checkpoint, opts, spec)
    out = out.rstrip("/")
    if _written(out) and not overwrite:
        _compare_record(out, record)
    if spec is not None and checkpoint.endswith(STATE_DICT_SUFFIXES):  # a bare state dict: does its head fit?
        outputs = head_width(checkpoint, spec.arch, spec.num_classes)
        if outputs is not None and outputs != spec.num_classes:
            raise ValueError(
                f"{checkpoint} has a classifier for {outputs} classes, not {spec.num_classes}; set --num-classes "
                f"{outputs} (and --arch to the architecture it was saved from)"
            )
    fmt = opts.format if opts.format != "auto" else detect_format(source)
    if fmt in ("parquet", "webdataset"):  # footers and names only; a folder is listed once, by the job
        return plan_units(source, opts.format, opts.image_column, opts.id_column, opts.files_per_unit)
    return None


def run_labeling(
    source: str,
    checkpoint: str,
    out: str,
    options: LabelOptions | None = None,
    spec: ModelSpec | None = None,
    overwrite: bool = False,
    plan: tuple | None = None,
) -> dict:
    """Label ``source`` into Parquet under ``out/predictions/unit=<key>/`` and write ``out/manifest.json``.

    Running it again with the same ``out`` resumes by input unit (labeler.units): finished units
    are kept as written, anything else is redone whole, so no row is written twice or lost; a finished
    job is returned as it is (its manifest). Resuming needs the same inputs: ``out/inputs.json``
    (:func:`labeling_record`: corpus, checkpoint digest, model, row settings) and every finished unit's
    files must match, else :class:`OutputMismatch` says what changed. ``overwrite``: delete what an
    earlier job wrote under ``out`` first. A folder corpus is listed anew into ``out/listing.parquet``
    on each run (labeler.listing). ``out`` is a local folder or an ``s3://`` prefix. Returns the
    manifest: counts (``rows``, ``labeled``, ``rejected``, ``reject_reasons``), ``seconds`` (wall
    time), ``images_per_s``, ``units``, ``resumed_from`` (images already labeled before this call) and
    ``storage_retries`` (S3 requests this process retried during the job, ``core.storage.retry_counts``).
    ``plan``: the corpus's :func:`labeler.sources.plan_units` when the caller has listed it (with the same
    options; its listing must stay where it is), so it is not listed again.

    Raises:
        LabelingStalled: no output for ``options.stall_timeout_s`` seconds (a pool that cannot start).
        OutputMismatch: ``out`` holds output of other inputs (a ``ValueError``).
        ValueError, FileNotFoundError: as :func:`label_images`.
    """
    start, started = time.time(), time.monotonic()
    retried = sum(retry_counts().values())  # the manifest's storage_retries: this process's, during this job
    opts = options or LabelOptions()
    out = out.rstrip("/")
    listing = join(out, LISTING)
    prepare_output(out, labeling_record(source, checkpoint, opts, spec), overwrite)
    plan = plan or plan_units(source, opts.format, opts.image_column, opts.id_column, opts.files_per_unit, listing)
    fmt, units, _ = plan
    done, resumed = finished_units(out, units)
    if len(done) == len(units) and exists(join(out, "manifest.json")):
        logger.info(f"labeler: {out} is complete ({len(units)} input units, all of them the same inputs); reused")
        return read_json(join(out, "manifest.json"))
    if done:
        logger.info(f"labeler: resuming, {len(done)} of {len(units)} input units ({resumed} images) already labeled")
    total = unit_rows(fmt, units)
    channel, display = ProgressChannel.create(), None
    first_resumed = resumed
    try:
        for attempt in range(NODE_LOSS_RETRIES + 1):
            if len(done) == len(units):
                break
            ds = label_images(source, checkpoint, opts, spec, frozenset(done), join(out, UNIT_LOG), channel, plan)
            if display is None:
                display = Progress("labeling", total=total, unit="img", initial=resumed if total else 0)
            writers = max(2, opts.max_actors or opts.num_actors)  # a writer per inference actor keeps pace
            try:
                actor = (
                    opts.cpus_per_actor,
                    gpus_per_task() if opts.num_gpus_per_actor is None else opts.num_gpus_per_actor,
                )
                _write_watched(
                    ds, join(out, "predictions"), opts.stall_timeout_s, channel, display, writers=writers, actor=actor
                )
                break
            except StalledAfterNodeLoss as err:
                if attempt == NODE_LOSS_RETRIES or not _stop_running_datasets(err.writer):
                    raise
                done, resumed = finished_units(out, units)  # what the stopped job left unfinished is redone whole
                logger.warning(
                    f"labeler: {err} Stopped it; resuming on the nodes that are left ({len(done)} of {len(units)} "
                    f"input units finished, {resumed} images)"
                )
                if total:
                    display.update(resumed)
        manifest = summarize_predictions(join(out, "predictions"), join(out, "rejected.parquet"))
        if display is not None:
            # the last line: the whole job's rate (the actors' last counts arrive with the manifest, not before)
            display.restart_clock(display.initial, since=started)
            display.update(
                manifest["rows"] if total else manifest["rows"] - first_resumed, rejected=manifest["rejected"]
            )
    finally:
        if display is not None:
            display.close()
        channel.shutdown()
    resumed = first_resumed
    manifest["storage_retries"] = sum(retry_counts().values()) - retried
    return _write_manifest(manifest, out, source, checkpoint, time.time() - start, len(units), resumed)


def _write_manifest(
    manifest: dict, out: str, source: str, checkpoint: str, seconds: float, units: int, resumed: int
) -> dict:
    """``manifest`` with the run's inputs, time and rate, written to ``out/manifest.json`` and logged."""
    manifest.update({"source": source, "checkpoint": checkpoint, "seconds": round(seconds, 2)})
    manifest.update(units=units, resumed_from=resumed)
    manifest["images_per_s"] = round((manifest["rows"] - resumed) / max(seconds, 1e-9), 1)
    write_bytes(join(out, "manifest.json"), json.dumps(manifest, indent=2).encode())
    logger.info(
        f"labeled {manifest['labeled']} images, rejected {manifest['rejected']} "
        f"({manifest['reject_reasons']}) in {manifest['seconds']} s: {manifest['images_per_s']} images/s"
    )
    return manifest


# what to change when labeling stalls; names the settings as the labeler CLI and a noisy-student config spell them
STALL_HINT = (
    "Usually the actor pool and the read/decode tasks cannot all be scheduled: give actors fewer CPUs "
    "(--cpus-per-actor for the labeler, label.cpus_per_actor in a noisy-student config), use fewer actors "
    "(--num-actors, label.num_actors), or add nodes; raise the stall timeout (--stall-timeout-s, "
    "label.stall_timeout_s) if the job is just slow."
)


class LabelingStalled(RuntimeError):
    """No new output for ``stall_timeout_s``: the pipeline is stuck, not slow."""


class StalledAfterNodeLoss(LabelingStalled):
    """A node left the cluster and labeling made no progress for ``NODE_LOSS_GRACE_S`` after it.
    ``writer``: the thread still running the stuck job's write."""

    def __init__(self, message: str, writer: threading.Thread | None = None):
        super().__init__(message)
        self.writer = writer


# After a node is lost, Ray restarts its inference actors elsewhere, and a restarted actor can take the
# CPUs the read tasks need on the nodes left, so nothing is read again (seen on a simulated cluster in
# about one run of three: tests/test_cluster_faults.py). run_labeling then stops the job and resumes it
# in the same call, with a pool fitted to the nodes left (core.cluster); finished units are kept.
NODE_LOSS_GRACE_S = 45.0
NODE_LOSS_RETRIES = 2


def _alive_nodes() -> set[str] | None:
    """The ids of the cluster's live nodes; None when Ray cannot say (the watchdog then skips a poll)."""
    try:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    except Exception:  # noqa: BLE001 - a control-plane hiccup must not end the job from its watchdog
        logger.debug("labeler: could not list the cluster's nodes", exc_info=True)
        return None


def _stop_running_datasets(writer: threading.Thread | None, timeout_s: float = 120.0) -> bool:
    """Force-stop every Ray Data execution of this process (:func:`core.ray_runtime.stop_running_datasets`)
    and wait for ``writer`` (the stuck job's write thread) to end. Returns whether it did: only then may the
    job's unfinished units be deleted and redone, else two jobs would write the same units."""
    executors = stop_running_datasets(timeout_s)
    if writer is not None:
        writer.join(timeout_s)
    stopped = executors > 0 and (writer is None or not writer.is_alive())
    if not stopped:
        logger.warning("labeler: the stalled job could not be stopped here; run the same command again to resume")
    return stopped


def _write_watched(
    ds: ray.data.Dataset,
    predictions: str,
    stall_timeout_s: float,
    channel: ProgressChannel | None = None,
    display: Progress | None = None,
    poll_s: float = 10.0,
    writers: int = 2,
    actor: tuple[float, float] | None = None,
) -> None:
    """``write_parquet`` (at most ``writers`` write tasks at a time) with a progress display (fed by
    ``channel``) and a no-progress watchdog.

    A pool that can never be scheduled (say, actors holding every CPU so reads never run)
    otherwise hangs silently forever; this raises instead. The job's Ray cluster must then be
    shut down (the CLI exits) to stop the stuck dataset. ``actor``: (CPUs, GPUs) of one inference
    actor; while no batch has been labeled, what the cluster lacks for one is logged every minute
    (:func:`core.cluster.waiting_for`). A node lost mid-job is logged, and raises
    :class:`StalledAfterNodeLoss` when nothing moves for ``NODE_LOSS_GRACE_S`` after it.
    """
    fs, path = filesystem_for(predictions)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            # no CPU reserved for writing: Ray Data gives its CPUs to the upstream operators first, so a
            # writer asking for one ran only once reading and decoding were done, and each unit's rows
            # reached storage at the end of the job (writing Parquet is light next to inference). With
            # no CPU to count, Ray Data would not bound the concurrent writers (each a worker process):
            # `writers` does; they may also run on a head node started with --num-cpus=0
            ds.write_parquet(
                path,
                filesystem=fs,
                partition_cols=[UNIT_COLUMN],
                ray_remote_args={"num_cpus": 0},
                concurrency=writers,
            )
        except BaseException as err:  # re-raised in the caller's thread
            errors.append(err)

    writer = threading.Thread(target=write, name="labeler-write", daemon=True)
    start = time.time()
    before = len(list_files(predictions)[1])
    writer.start()
    try:
        _watch(writer, predictions, stall_timeout_s, channel, display, poll_s, actor, start, before)
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C or SIGTERM (core.ray_runtime.Stopped): stop Ray Data's threads before Ray shuts down at
        # exit, or one of them calls into the shut-down Ray and the process dies with status 1
        stop_running_datasets(15.0)
        raise
    if errors:
        raise errors[0]


def _watch(
    writer: threading.Thread,
    predictions: str,
    stall_timeout_s: float,
    channel: ProgressChannel | None,
    display: Progress | None,
    poll_s: float,
    actor: tuple[float, float] | None,
    start: float,
    before: int,
) -> None:
    """:func:`_write_watched`'s loop: progress, the no-progress watchdog, lost nodes, what actors wait for."""
    last_change, files = start, before
    labeled = rejected = 0
    base = display.n if display is not None else 0
    last_poll, clock_started = start, False
    nodes, lost_at, told = _alive_nodes() or set(), None, 0.0
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
            if lost_at is not None and last_change - lost_at > NODE_LOSS_GRACE_S:
                lost_at = None  # still going a while after a loss: the loss is behind it
        elif actor is not None and not clock_started:
            told = _say_what_is_missing(actor, start, told)
        if display is not None:
            display.update(base + labeled + rejected, rejected=rejected)
        now = time.time()
        if now - last_poll < poll_s and writer.is_alive():
            continue
        last_poll, count = now, len(list_files(predictions)[1])
        if count != files:
            files, last_change = count, now
            logger.debug(f"labeler: {files - before} output files written in {now - start:.0f} s")
        nodes, lost = _watch_nodes(nodes)
        lost_at = now if lost else lost_at
        idle = now - max(lost_at or now, last_change)
        if lost_at is not None and writer.is_alive() and idle > NODE_LOSS_GRACE_S:
            raise StalledAfterNodeLoss(
                f"a node left the cluster and labeling has made no progress for {idle:.0f} s.", writer
            )
        if writer.is_alive() and now - last_change > stall_timeout_s:
            raise LabelingStalled(
                f"labeling made no progress for {now - last_change:.0f} s (no labeled batch, no new file under "
                f"{predictions}). " + STALL_HINT
            )


def _say_what_is_missing(actor: tuple[float, float], start: float, told: float) -> float:
    """Log what the cluster lacks for one inference actor, when the job has waited ``WAIT_NOTICE_S`` and
    said nothing for ``WAIT_REPEAT_S``; returns when it last said so."""
    now = time.time()
    if now - start < WAIT_NOTICE_S or now - told < WAIT_REPEAT_S or started_here():
        return told  # a local cluster this process started: the pool was fitted to it, a wait there is brief
    try:
        note = waiting_for("inference actors", 1, *actor)
    except Exception:  # noqa: BLE001 - a control-plane hiccup must not end the job from its watchdog
        logger.debug("labeler: could not read the cluster's resources", exc_info=True)
        return told
    if note:
        logger.warning(f"labeler: {note}")
        return now
    return told


def _watch_nodes(nodes: set[str]) -> tuple[set[str], bool]:
    """(the live nodes now, whether one of ``nodes`` is gone), saying so when one is. Nodes that join
    are watched from then on; the totals of resources are not compared, as an autoscaling cluster's
    grow and shrink."""
    now = _alive_nodes()
    if now is None:
        return nodes, False
    gone = nodes - now
    if gone:
        logger.warning(
            f"labeler: {len(gone)} node(s) left the cluster ({len(now)} left); the units they were labeling are "
            "redone, the finished ones are kept"
        )
    return now, bool(gone)


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
