"""What every package of the project shares: storage (local paths and ``s3://``, with bounded retries), image
decoding, the checkpoint format and model construction, typed settings, the console and progress display,
and Ray's set-up. It imports nothing from ``labeler``, ``trainer`` or ``pipeline``."""
