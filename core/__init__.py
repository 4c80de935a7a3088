"""What every package of the project shares: storage (local paths and ``s3://``, with bounded retries), image
decoding, the checkpoint format and model construction, typed settings, the console and progress display,
and Ray's set-up. It imports nothing from ``labeler``, ``trainer`` or ``pipeline`` (``lint-imports`` checks).

Its public names are what those packages use, imported on first use (PEP 562 ``__getattr__``), so
``import core`` stays light (no torch, no Ray). Import them from their modules (``from core.storage import
join``); this list is the contract ``tests/test_public_api.py`` holds the other packages to.
"""

from __future__ import annotations

from core.lazy import lazy_exports

# defining module -> its public names
_EXPORTS = {
    "core.checkpoint_import": (
        "head_width",
        "import_checkpoint",
        "text_order_warning",
        "text_ordered_numbers",
    ),
    "core.cluster": (
        "WAIT_NOTICE_S",
        "WAIT_REPEAT_S",
        "cluster_resources",
        "fit_pool",
        "waiting_for",
        "whole_gpu",
    ),
    "core.console": (
        "Progress",
        "ProgressChannel",
        "configure_console",
        "log_file",
        "quiet_ray",
        "verbose",
    ),
    "core.fingerprint": (
        "OutputMismatch",
        "differences",
        "file_sha256",
        "record_digest",
        "stamp",
        "tree_fingerprint",
    ),
    "core.images": (
        "DEFAULT_MAX_PIXELS",
        "IMAGE_EXTENSIONS",
        "READ_REASONS",
        "RejectedImage",
        "SHARD_SUFFIXES",
        "decode_batch",
        "decode_image",
        "decode_into",
        "image_bytes",
        "is_container",
        "normalize",
        "read_failure",
        "read_reason",
        "thumbnail",
    ),
    "core.lazy": ("lazy_exports",),
    "core.model": (
        "ModelSpec",
        "SPEC_FILE",
        "STATE_DICT_SUFFIXES",
        "WEIGHTS_FILE",
        "check_weights_file",
        "count_parameters",
        "create_model",
        "load_checkpoint",
        "load_spec",
        "model_preprocessing",
        "save_checkpoint",
        "weights_file",
    ),
    "core.phash": (
        "BITS",
        "SIDE",
        "hamming",
        "hash_input",
        "phash_many",
        "stored",
        "unsigned",
    ),
    "core.ray_runtime": (
        "keeps_sigterm_status",
        "start_or_join_ray",
        "started_here",
        "stop_running_datasets",
    ),
    "core.settings": (
        "add_arguments",
        "check_choices",
        "choices_of",
        "field_default",
        "from_args",
        "setting",
    ),
    "core.storage": (
        "S3RequestFailed",
        "S3_MAX_ATTEMPTS",
        "absolute",
        "canonical",
        "count_retries",
        "delete_file",
        "delete_tree",
        "escape_name",
        "exists",
        "filesystem_for",
        "is_hidden",
        "is_s3",
        "iter_tables",
        "join",
        "list_dirs",
        "list_files",
        "local_path",
        "read_bytes",
        "read_json",
        "retried",
        "retry_counts",
        "s3_endpoint_and_region",
        "uri_of",
        "write_bytes",
        "write_json",
    ),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
