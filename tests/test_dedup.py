"""Near-duplicates of evaluation images: the hash, the index, and the exclusion before balancing."""

import base64
import io
import json
import shutil

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.fingerprint import OutputMismatch
from core.images import decode_batch, decode_image
from core.phash import hamming, phash
from labeler.api import LabelOptions, run_labeling
from labeler.dedup import EVAL_REASON, collect_hashes, find_duplicates
from labeler.hash_index import HashIndex
from pipeline.balance import balance_predictions
from pipeline.config import ConfigError, as_config
from pipeline.loop import preflight
from pipeline.stages import start_stage
from tests.helpers import altered_copies, photo_tiles, png_bytes, random_checkpoint, upscaled_digit_pngs
from tests.test_preflight import config, folders, refused

D = 8  # the default dedup.max_distance


def reference_hash(data: bytes) -> int:
    """The imagehash package's pHash of the decoded image: the independent implementation."""
    return int(str(imagehash.phash(decode_image(data))), 16)


def textured(data: bytes) -> bool:
    """Not near-flat (a near-flat image's pHash is noise: benchmarks/dedup_distance.py)."""
    return np.asarray(decode_image(data).convert("L").resize((32, 32))).std() >= 8


def test_the_hash_is_imagehashs_phash():
    images = [b for _, b in upscaled_digit_pngs(8)[::9]] + [b for _, b in upscaled_digit_pngs(32)[::9]]
    images += photo_tiles(48) + [png_bytes((40, 50), "RGB", seed=s) for s in range(20)]
    ours = [phash(decode_image(b)) for b in images]
    assert ours == [reference_hash(b) for b in images]
    assert len(set(ours)) > 0.8 * len(images)  # not a constant (flat sky tiles do share one)


def test_a_flat_image_hashes_the_same_way_every_time():
    """Its AC coefficients are all zero, which floating-point noise would make tiny positives or negatives:
    only the DC bit may be set, whatever the size or mode."""
    flats = [Image.new("L", (20, 20), 128), Image.new("RGB", (30, 17), (255, 255, 255)), Image.new("RGB", (64, 9))]
    assert [phash(img) for img in flats] == [1 << 63, 1 << 63, 0]  # black: even the DC coefficient is 0


def test_decode_batch_carries_each_images_hash():
    good = [png_bytes((24, 24), "RGB", seed=s) for s in range(3)]
    batch = {"id": np.array(["a", "b", "bad", "c"]), "path": np.array(["a", "b", "bad", "c"])}
    batch["bytes"] = np.array([good[0], good[1], b"not an image", good[2]], dtype=object)
    out = decode_batch(batch, image_size=16, crop_pct=1.0, in_chans=3, max_pixels=10**6, phash=True)
    assert list(out["reject_reason"]) == ["", "", "not_an_image", ""]
    expected = [reference_hash(g) for g in good]
    assert [int(out["phash"][i]) for i in (0, 1, 3)] == expected and out["phash"][2] == 0


@pytest.mark.parametrize("refs,max_distance", [(0, 8), (1, 0), (40, 0), (700, 8), (700, 12), (3000, 5), (3000, 20)])
def test_the_index_finds_what_a_pairwise_scan_finds(refs, max_distance):
    rng = np.random.default_rng(refs + max_distance)
    reference = rng.integers(0, 2**64, refs, dtype=np.uint64, endpoint=False)
    reference = np.concatenate([reference, reference[:3]])  # equal references: the first one is reported
    queries = rng.integers(0, 2**64, 2000, dtype=np.uint64, endpoint=False)
    if refs:  # copies of references with 0 .. max_distance + 2 bits flipped
        planted = reference[rng.integers(0, refs, 600)].copy()
        for i in range(len(planted)):
            for bit in rng.choice(64, int(rng.integers(0, max_distance + 3)), replace=False):
                planted[i] ^= np.uint64(1) << np.uint64(bit)
        queries = np.concatenate([queries, planted])
    q, r, d = HashIndex(reference, max_distance).query(queries)
    if not len(reference):
        assert len(q) == 0
        return
    pairwise = hamming(queries[:, None], reference[None, :])
    nearest = pairwise.min(axis=1)
    expected = np.flatnonzero(nearest <= max_distance)
    assert np.array_equal(q, expected) and np.array_equal(d, nearest[expected])
    assert np.array_equal(pairwise[q, r], d)
    first = {h: i for i, h in reversed(list(enumerate(reference)))}
    assert all(r_ == first[reference[r_]] for r_ in r)  # equal references report their first
    if refs >= 700:
        assert len(q) > 300  # the planted copies were found (a test that could fail)


def test_a_distance_outside_the_hash_is_refused():
    with pytest.raises(ValueError, match="0..32"):
        HashIndex(np.zeros(3, np.uint64), 40)
    with pytest.raises(ConfigError, match="dedup.max_distance"):
        as_config({"dedup": {"max_distance": 33}})
    with pytest.raises(ConfigError, match="label.phash"):
        as_config({"label": {"phash": False}})
    as_config({"label": {"phash": False}, "dedup": {"enabled": False}})  # a choice, not an error


def test_changed_dedup_settings_or_test_split_remake_the_balanced_set_only(tmp_path):
    labeled = folders(tmp_path / "labeled", {c: 2 for c in "ab"})
    test = folders(tmp_path / "test", {c: 1 for c in "ab"}, seed=50)
    base = config(tmp_path, labeled, test)
    _, report, stages = preflight(as_config(base))
    assert "dedup: unlabeled images within 8 bits of an evaluation image are excluded (the default)" in report.found
    for stage in stages[:4]:  # teacher, its evaluation, labels, balanced: finished before
        start_stage(stage)
    for name in ("round_0/teacher/final.json", "round_0/teacher/eval.json", "round_1/labels/manifest.json"):
        (tmp_path / "run" / name).write_text("{}")
    (tmp_path / "run" / "round_1" / "balance_stats.json").write_text("{}")
    message = refused({**base, "dedup": {"max_distance": 4}}, OutputMismatch)
    assert "round_1/balanced: dedup.max_distance: 8 -> 4" in message and "round_1/labels:" not in message
    (tmp_path / "test" / "a" / "0.png").write_bytes(png_bytes(seed=77))  # the test split changed
    message = refused(base, OutputMismatch)
    assert "round_1/balanced: dedup.test" in message
    assert "round_1/labels:" not in message


# --- planted copies, through the labeler, the comparison and balancing (Ray) ---------------------------


@pytest.fixture(scope="module")
def planted(ray_local, tmp_path_factory):
    """test/: 12 textured photo tiles (2 classes); labeled/: 4 others; unlabeled/: 5 altered copies of each
    test tile, 16 unrelated tiles, 3 identical copies of one of them and an exact copy of a labeled tile."""
    root = tmp_path_factory.mktemp("dedup")
    tiles = [t for t in photo_tiles(96) if textured(t)]
    test, labeled, unrelated = tiles[:12], tiles[12:16], tiles[16:32]
    files = {}
    for i, tile in enumerate(test):
        files[f"test/{'ab'[i % 2]}/t{i:02d}.png"] = tile
        for kind, data in altered_copies(tile).items():
            files[f"unlabeled/copy_t{i:02d}_{kind}.{'jpg' if kind.startswith('jpeg') else 'png'}"] = data
    for i, tile in enumerate(labeled):
        files[f"labeled/{'ab'[i % 2]}/l{i}.png"] = tile
    for i, tile in enumerate(unrelated):
        files[f"unlabeled/other_{i:02d}.png"] = tile
    for k in range(3):
        files[f"unlabeled/same_{k}.png"] = unrelated[0]
    for k in range(2):
        files[f"unlabeled/twin_{k}.png"] = unrelated[1]
    files["unlabeled/copy_of_labeled.png"] = labeled[0]
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    teacher = root / "teacher"
    random_checkpoint(str(teacher), num_classes=2)
    options = LabelOptions(keep_image_bytes=True)
    run_labeling(str(root / "unlabeled"), str(teacher), str(root / "labels"), options)
    predictions = str(root / "labels" / "predictions")
    sets = {"test": collect_hashes(str(root / "test"))}
    stats = find_duplicates(predictions, sets, str(root / "dedup"), collect_hashes(str(root / "labeled")), D, True)
    balanced = balance_predictions(predictions, str(root), 2, 10_000, 0.0, duplicate=False, dedup=str(root / "dedup"))
    return root, files, stats, balanced


def _excluded(root) -> dict:
    rows = pq.read_table(root / "dedup" / "excluded").to_pylist()
    return {r["id"]: r for r in rows}


def test_altered_copies_of_test_images_are_excluded_before_balancing(planted):
    root, files, stats, balanced = planted
    test = {name: reference_hash(data) for name, data in files.items() if name.startswith("test/")}
    corpus = {name[len("unlabeled/") :]: data for name, data in files.items() if name.startswith("unlabeled/")}
    # what a pairwise scan with the independent implementation finds within D
    expected = {
        name for name, data in corpus.items() if min(hamming(reference_hash(data), h) for h in test.values()) <= D
    }
    excluded = _excluded(root)
    assert set(excluded) == expected
    assert all(r["reason"] == EVAL_REASON and r["eval_set"] == "test" and r["distance"] <= D for r in excluded.values())
    assert all(r["eval_path"] == str(root / "test" / r["eval_id"]) for r in excluded.values())
    copies = {n for n in corpus if n.startswith("copy_t")}
    kinds = ("jpeg_q30", "resize_0.5", "resize_2", "crop", "brighten")
    recall = {k: len({n for n in expected if k in n}) / 12 for k in kinds}
    # resizing and brightening a textured tile stay within D; JPEG at q30 and a 2 px crop mostly
    assert recall["resize_0.5"] == recall["resize_2"] == recall["brighten"] == 1.0
    assert recall["jpeg_q30"] >= 0.75 and recall["crop"] >= 0.75, recall
    assert not {n for n in expected if not n.startswith("copy_t")}  # unrelated tiles: no false positive
    # each excluded copy is matched with the test tile it was made from (or one at least as close)
    for name in expected:
        row = excluded[name]
        source = f"test/{'ab'[int(name[6:8]) % 2]}/t{name[6:8]}.png"
        assert row["distance"] <= hamming(reference_hash(corpus[name]), test[source])
    near = stats["near_duplicates_of_eval"]
    assert near["rows"] == len(expected) and near["per_set"] == {"test": len(expected)}
    assert near["eval_images_matched"]["test"] == 12  # every test tile had a copy caught
    assert stats["hashed"] == len(corpus) and stats["eval_images"]["test"] == {"hashed": 12, "unreadable": 0}
    assert len(copies) == 60
    # none of them reached the balanced set, and the stats say so
    ids = set(pq.read_table(root / "balanced", columns=["id"])["id"].to_pylist())
    assert not ids & expected
    assert balanced["dedup"]["excluded"] == stats["excluded"]
    assert sum(c["predictions"] for c in balanced["classes"]) == len(corpus) - stats["excluded"]


def test_duplicates_inside_the_corpus_and_of_labeled_images_are_counted(planted):
    root, files, stats, _ = planted
    assert stats["labeled_duplicates"] == 1  # copy_of_labeled.png: counted, kept
    groups = stats["corpus_duplicates"]
    # other_00.png and same_0..2.png hold the same bytes (copies of jpeg or resized tiles hash apart from each other)
    assert groups["groups"] >= 1 and groups["rows"] >= 4 and groups["excluded"] == groups["rows"] - groups["groups"]
    ids = set(pq.read_table(root / "balanced", columns=["id"])["id"].to_pylist())
    same = {"other_00.png", "same_0.png", "same_1.png", "same_2.png"}
    assert ids & same == {"other_00.png"}  # keep_one_per_group: the smallest id of the group
    assert ids & {"other_01.png", "twin_0.png", "twin_1.png"} == {"other_01.png"}
    assert "copy_of_labeled.png" in ids
    assert stats["excluded"] == stats["near_duplicates_of_eval"]["rows"] + groups["excluded"]


def test_the_labeler_alone_writes_the_same_comparison_and_a_report(planted, tmp_path):
    from labeler.cli import main

    root, _, stats, _ = planted
    out = tmp_path / "dedup"
    args = ["dedup", "--input", str(root / "unlabeled"), "--eval", f"test={root / 'test'}", "--output", str(out)]
    assert main(args) == 0
    alone = json.loads((out / "dedup_stats.json").read_text())
    assert alone["near_duplicates_of_eval"] == stats["near_duplicates_of_eval"]
    assert set(pq.read_table(out / "excluded")["id"].to_pylist()) == set(_excluded(root))
    page = (out / "report.html").read_text()
    assert "Near-duplicates of evaluation images" in page and page.count("class='pair'") == 16
    pairs = json.loads((out / "pairs.json").read_text())
    assert [p["distance"] for p in pairs] == sorted(p["distance"] for p in pairs)
    for p in pairs:  # both images of a pair are shown
        for src in (p["eval_image"], p["image"]):
            assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size[0] > 0
    assert main(args) == 2  # an output that is there is not overwritten silently
    (tmp_path / "empty").mkdir()  # an evaluation set with nothing in it is named before the corpus is hashed
    bad = ["dedup", "--input", str(root / "unlabeled"), "--eval", f"blank={tmp_path / 'empty'}", "--output"]
    assert main([*bad, str(tmp_path / "d2")]) == 2 and not (tmp_path / "d2" / "hashes").exists()
    assert main([*args, "--overwrite", "--input", str(root / "labels")]) == 0  # a labeler output: its hashes
    assert not (out / "hashes").exists()
    again = json.loads((out / "dedup_stats.json").read_text())
    assert again["near_duplicates_of_eval"] == stats["near_duplicates_of_eval"]


def test_duplicate_groups_are_the_same_in_many_buckets(planted, tmp_path):
    """Grouping runs a task per hash bucket: cut into many small buckets, it finds the same groups and excludes
    the same rows as in one."""
    root, _, stats, _ = planted
    predictions = str(root / "labels" / "predictions")
    sets = {"test": collect_hashes(str(root / "test"))}
    many = find_duplicates(predictions, sets, str(tmp_path / "d"), None, D, True, bucket_rows=7)
    assert stats["corpus_duplicates"]["buckets"] == 1 and many["corpus_duplicates"]["buckets"] == 12  # 82 rows / 7
    assert {**many["corpus_duplicates"], "buckets": 1} == stats["corpus_duplicates"]
    assert many["corpus_duplicates"]["groups"] >= 2
    one = {r["id"] for r in pq.read_table(root / "dedup" / "corpus_groups").to_pylist()}
    assert {r["id"] for r in pq.read_table(tmp_path / "d" / "corpus_groups").to_pylist()} == one


def _predictions(folder, hashes) -> str:
    folder.mkdir(parents=True)
    table = pa.table({"id": [f"r{i}" for i in range(len(hashes))], "path": ["p"] * len(hashes), "phash": hashes})
    pq.write_table(table, folder / "part-0.parquet")
    return str(folder)


def test_what_cannot_be_compared_is_refused_before_any_task(tmp_path):
    unreadable = {"test": pa.table({"id": ["a"], "path": ["a"], "phash": pa.array([None], pa.int64())})}
    predictions = _predictions(tmp_path / "p", pa.array([1, 2], pa.int64()))
    with pytest.raises(ValueError, match="'test' has no readable image"):
        find_duplicates(predictions, unreadable, str(tmp_path / "d"))
    no_hashes = tmp_path / "old"
    no_hashes.mkdir()
    pq.write_table(pa.table({"id": ["a"], "path": ["a"]}), no_hashes / "part-0.parquet")
    with pytest.raises(ValueError, match="no phash column.*label.phash"):
        find_duplicates(str(no_hashes), unreadable, str(tmp_path / "d"))
    # exclusions made over other predictions are refused by balancing, before it reads anything
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dedup_stats.json").write_text(json.dumps({"predictions": str(tmp_path / "elsewhere")}))
    with pytest.raises(ValueError, match="not of .*Run labeler dedup"):
        balance_predictions(predictions, str(tmp_path / "b"), 2, 5, dedup=str(tmp_path / "d"))


def test_the_labeler_dedup_command_refuses_bad_arguments_before_ray(tmp_path, capsys):
    from labeler.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes())
    assert main(["dedup", "--input", str(folder), "--eval", "test", "--output", str(tmp_path / "o")]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["dedup", "--input", str(folder), "--eval", f"t={tmp_path / 'nope'}", "--output", "o"]) == 2
    assert "does not exist" in capsys.readouterr().err
    shutil.rmtree(folder)
