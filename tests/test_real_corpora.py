"""Real corpora are messy: each input here is built to match a problem people meet.

Decoding must give the pixels an image viewer shows (EXIF orientation, transparency), shards are
read by the webdataset format's rules, and every failure is a named row: rows in = predictions
+ rejections for every input.
"""

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.images import BACKGROUND, decode_image
from core.storage import list_files, local_path, read_bytes
from labeler.api import label_images, run_labeling
from tests.helpers import png_bytes, random_checkpoint

ORIENTATION = 0x0112


def _digit(seed: int, size=(12, 8)) -> np.ndarray:
    """A grey image with a bright stroke, not symmetric, so a rotation changes it."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (size[1], size[0]), dtype=np.uint8)
    arr[1 : size[1] - 1, 2 + seed % 3] = 255
    arr[1, 2 : size[0] - 1] = 255
    return arr


def _encode(img: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kwargs["exif"] = exif
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _stored_rotated(arr: np.ndarray) -> Image.Image:
    """How a phone stores an upright picture it saves with Orientation = 6 (rotate 90 degrees
    clockwise to display): the pixels turned 90 degrees counter-clockwise."""
    return Image.fromarray(arr, "L").convert("RGB").transpose(Image.Transpose.ROTATE_90)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _predictions(out) -> dict:
    table = pq.read_table(os.path.join(out, "predictions")).to_pylist()
    return {r["id"]: r for r in table}


# --- 1. EXIF orientation ------------------------------------------------------------------------


def test_exif_orientation_is_applied_like_a_viewer():
    arr = _digit(0)  # 12 wide, 8 high upright
    stored = _stored_rotated(arr)  # 8 wide, 12 high as stored
    tagged, untagged = _encode(stored, "JPEG", 6), _encode(stored, "JPEG")
    raw = decode_image(untagged)
    upright = decode_image(tagged)
    assert raw.size == (8, 12) and upright.size == (12, 8)
    # the same stored pixels, turned as the tag says (90 degrees clockwise)
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(raw.transpose(Image.Transpose.ROTATE_270)))
    err = np.abs(np.asarray(upright)[..., 0].astype(int) - arr.astype(int)).mean()
    assert err < 8, err  # the upright digit, up to JPEG loss


def test_labeler_and_trainer_see_tagged_images_upright(ray_local, tmp_path):
    """PNG carries EXIF too and is lossless: a tagged rotated PNG must be labeled exactly like
    the upright PNG, and unlike the same rotated pixels without the tag."""
    from trainer.data import load_labeled

    corpus = tmp_path / "corpus" / "3"
    corpus.mkdir(parents=True)
    for i in range(4):
        arr = _digit(i)
        (corpus / f"upright_{i}.png").write_bytes(_encode(Image.fromarray(arr, "L").convert("RGB"), "PNG"))
        (corpus / f"tagged_{i}.png").write_bytes(_encode(_stored_rotated(arr), "PNG", 6))
        (corpus / f"rotated_{i}.png").write_bytes(_encode(_stored_rotated(arr), "PNG"))
    random_checkpoint(str(tmp_path / "ckpt"), image_size=16)
    rows = {r["id"]: r for r in label_images(str(tmp_path / "corpus"), str(tmp_path / "ckpt")).take_all()}
    assert len(rows) == 12 and all(r["reject_reason"] is None for r in rows.values())
    for i in range(4):
        np.testing.assert_array_equal(rows[f"3/tagged_{i}.png"]["probs"], rows[f"3/upright_{i}.png"]["probs"])
        assert not np.array_equal(rows[f"3/tagged_{i}.png"]["probs"], rows[f"3/rotated_{i}.png"]["probs"])
    images = load_labeled(str(tmp_path / "corpus"), ["3"], image_size=16)  # the trainer's and evaluation's reader
    by_id = dict(zip([os.path.basename(i) for i in images.ids], images.images))
    for i in range(4):
        np.testing.assert_array_equal(by_id[f"tagged_{i}.png"], by_id[f"upright_{i}.png"])


# --- 2. Transparency ----------------------------------------------------------------------------


def _alpha_drawing() -> tuple[np.ndarray, np.ndarray]:
    """(RGBA pixels: black RGB everywhere, ink only in alpha; the picture a viewer shows on white)."""
    alpha = _digit(1)
    rgba = np.zeros((*alpha.shape, 4), np.uint8)
    rgba[..., 3] = alpha
    shown = 255 - alpha  # black ink composited over the white background, as 8-bit
    return rgba, shown


def test_rgba_with_the_drawing_in_alpha_is_flattened_onto_white():
    rgba, shown = _alpha_drawing()
    img = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    got = np.asarray(img).astype(int)
    assert BACKGROUND == (255, 255, 255) and img.mode == "RGB"
    assert np.abs(got - shown[..., None]).max() <= 1  # alpha compositing rounds
    assert got.min() == 0 and got.max() == 255  # not a blank image


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_la_and_palette_alpha_are_flattened_too(mode):
    rgba, shown = _alpha_drawing()
    if mode == "LA":
        data = _encode(Image.fromarray(np.stack([rgba[..., 0], rgba[..., 3]], -1), "LA"), "PNG")
    else:  # a palette of 256 black entries whose alpha is the index (PNG tRNS per entry)
        img = Image.fromarray(rgba[..., 3], "P")
        img.putpalette([0, 0, 0] * 256)
        buf = io.BytesIO()
        img.save(buf, format="PNG", transparency=bytes(range(256)))
        data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).mode == mode
    got = np.asarray(decode_image(data)).astype(int)
    assert np.abs(got - shown[..., None]).max() <= 1
    gray = np.asarray(decode_image(data, in_chans=1)).astype(int)
    assert np.abs(gray - shown).max() <= 1


def test_palette_transparency_index_becomes_background():
    arr = np.zeros((6, 6), np.uint8)
    arr[2:4, 2:4] = 1
    img = Image.fromarray(arr, "P")
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)  # index 0 (black) is transparent
    got = np.asarray(decode_image(buf.getvalue()))
    assert (got[0, 0] == BACKGROUND).all() and tuple(got[2, 2]) == (200, 10, 10)


def test_alpha_drawing_is_not_labeled_like_a_blank_image(ray_local, tmp_path):
    rgba, shown = _alpha_drawing()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "alpha.png").write_bytes(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    (corpus / "blank.png").write_bytes(_encode(Image.fromarray(np.zeros_like(shown), "L"), "PNG"))
    (corpus / "shown.png").write_bytes(_encode(Image.fromarray(shown, "L").convert("RGB"), "PNG"))
    random_checkpoint(str(tmp_path / "ckpt"), image_size=16)
    labeled = label_images(str(corpus), str(tmp_path / "ckpt")).take_all()
    assert len(labeled) == 3 and all(r["reject_reason"] is None for r in labeled)  # 3 in, 3 predictions
    rows = {r["id"]: r["probs"] for r in labeled}
    assert not np.allclose(rows["alpha.png"], rows["blank.png"])
    np.testing.assert_allclose(rows["alpha.png"], rows["shown.png"], atol=1e-3)


# --- 3 and 4. WebDataset members, damaged shards --------------------------------------------------


def test_webdataset_members_by_the_format_rules(ray_local, tmp_path):
    """Keys end at the first dot, the format is the extension's last part (any case); a sample
    with no image is one ``no_image`` row; hidden and key-less members belong to no sample."""
    shards = tmp_path / "wds"
    shards.mkdir()
    img = {i: png_bytes(seed=i) for i in range(6)}
    _tar(shards / "left.tar", [("s0001.left.png", img[0]), ("s0001.cls", b"1"), ("s0002.left.png", img[1])])
    _tar(shards / "mixed.tar", [("a0001.jpg", img[2]), ("a0002.png", img[3]), ("a0003.JPEG", img[4])])
    _tar(shards / "odd.tar", [("dir/b01.PNG", img[5]), ("b02.txt", b"caption"), ("._b03.png", b"x"), ("NOTES", b"")])
    _tar(shards / "dot.tar", [("./c01.png", img[0]), ("./c02.jpg", img[1])])  # tar -C dir -cf dot.tar .
    random_checkpoint(str(tmp_path / "ckpt"), image_size=16)
    rows = {r["id"]: r for r in label_images(str(shards), str(tmp_path / "ckpt")).take_all()}
    expected = {
        "left.tar/s0001": None, "left.tar/s0002": None,
        "mixed.tar/a0001": None, "mixed.tar/a0002": None, "mixed.tar/a0003": None,
        "odd.tar/dir/b01": None, "odd.tar/b02": "no_image", "dot.tar/c01": None, "dot.tar/c02": None,
    }  # fmt: skip
    assert {k: r["reject_reason"] for k, r in rows.items()} == expected


def test_a_damaged_shard_keeps_what_is_readable_and_names_the_shard(ray_local, tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    members = [(f"k{i}.png", png_bytes((48, 48), "RGB", seed=i)) for i in range(5)]
    _tar(shards / "good.tar", members)
    _tar(tmp_path / "whole.tar", members)
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third = tar.getmembers()[2]
    whole = (tmp_path / "whole.tar").read_bytes()
    (shards / "cut.tar").write_bytes(whole[: third.offset_data + third.size // 2])  # cut inside member 3
    (shards / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    with tarfile.open(tmp_path / "whole.tar") as tar:
        header_3 = tar.getmembers()[2].offset
    (shards / "edge.tar").write_bytes(whole[:header_3])  # cut exactly at a header: tarfile sees a clean end
    random_checkpoint(str(tmp_path / "ckpt"), image_size=16)
    manifest = run_labeling(str(shards), str(tmp_path / "ckpt"), str(tmp_path / "out"))
    rows = _predictions(tmp_path / "out")
    good = {f"good.tar/k{i}" for i in range(5)} | {"cut.tar/k0", "cut.tar/k1", "edge.tar/k0", "edge.tar/k1"}
    assert {k for k, r in rows.items() if r["reject_reason"] is None} == good
    damaged = {k: r for k, r in rows.items() if r["reject_reason"] == "damaged_shard"}
    assert set(damaged) == {"cut.tar#damaged", "junk.tar#damaged", "edge.tar#damaged"}
    assert damaged["cut.tar#damaged"]["path"].endswith("cut.tar")
    assert manifest["rows"] == len(rows) == 12 and manifest["labeled"] == 9
    assert manifest["reject_reasons"] == {"damaged_shard": 3}
    assert [p.rsplit("/", 1)[-1] for p in manifest["damaged_shards"]] == ["cut.tar", "edge.tar", "junk.tar"]
    rejected = pq.read_table(tmp_path / "out" / "rejected.parquet").to_pylist()
    assert {r["id"] for r in rejected} == set(damaged)


# --- 5. File names that are not UTF-8 -------------------------------------------------------------


def test_a_latin1_file_name_is_labeled_with_a_reversible_id(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(9):
        (corpus / f"good_{i}.png").write_bytes(png_bytes(seed=i))
    latin1 = os.path.join(os.fsencode(str(corpus)), b"r\xe9sum\xe9.png")
    with open(latin1, "wb") as f:
        f.write(png_bytes(seed=42))
    random_checkpoint(str(tmp_path / "ckpt"), image_size=16)
    manifest = run_labeling(str(corpus), str(tmp_path / "ckpt"), str(tmp_path / "out"))
    rows = _predictions(tmp_path / "out")
    assert manifest["rows"] == 10 and manifest["labeled"] == 10 and manifest["rejected"] == 0
    row = rows["r\\xe9sum\\xe9.png"]
    assert row["reject_reason"] is None
    assert os.fsencode(local_path(row["path"])) == latin1  # the escape reverses to the file's bytes
    assert read_bytes(row["path"]) == png_bytes(seed=42)


# --- 6. Hidden files and folders ------------------------------------------------------------------


def test_hidden_folders_are_not_classes_and_hidden_files_not_images(ray_local, tmp_path):
    from trainer.data import labeled_classes, load_labeled

    labeled = tmp_path / "labeled"
    for c in range(10):
        (labeled / str(c)).mkdir(parents=True)
        (labeled / str(c) / "a.png").write_bytes(png_bytes(seed=c))
    (labeled / ".ipynb_checkpoints").mkdir()
    (labeled / ".ipynb_checkpoints" / "a-checkpoint.png").write_bytes(png_bytes(seed=99))
    (labeled / "3" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert labeled_classes(str(labeled)) == [str(c) for c in range(10)]
    images = load_labeled(str(labeled), labeled_classes(str(labeled)), image_size=8)
    assert len(images) == 10 and np.argmax(images.targets, axis=1).tolist() == list(range(10))
    assert [os.path.basename(p) for p in list_files(str(labeled))[1]] == ["a.png"] * 10
    random_checkpoint(str(tmp_path / "ckpt"), image_size=16)
    manifest = run_labeling(str(labeled), str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert manifest["rows"] == 10 and manifest["rejected"] == 0  # .DS_Store is not an unreadable image


def test_a_symbolic_link_loop_lists_each_file_once(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "back")  # a link to an ancestor
    os.symlink(tmp_path / "a" / "b", tmp_path / "a" / "same")  # two names for one folder
    assert [p[len(str(tmp_path)) :] for p in list_files(str(tmp_path))[1]] == ["/a/b/x.png"]


# --- 7. A threshold nothing passes ----------------------------------------------------------------


def test_a_threshold_nothing_passes_stops_after_balancing(ray_local, tmp_path):
    """The loop stops right after balancing with what passed and what to change; no student starts."""
    from pipeline.balance import NothingPassed
    from pipeline.config import load_config
    from pipeline.digits import write_digits_corpus
    from pipeline.loop import run_loop
    from tests.helpers import plant_teacher

    paths = write_digits_corpus(str(tmp_path / "data"), labels_per_class=2, test_fraction=0.05, seed=0)
    run = tmp_path / "run"
    cfg = load_config(
        "digits",
        [f"run_dir={run}", "runlocal=true", "balance.threshold=0.99", f"data.labeled={paths['labeled']}",
         f"data.unlabeled={paths['unlabeled']}", f"data.test={paths['test']}"],
    )  # fmt: skip
    spec = plant_teacher(cfg)  # a weak (random) teacher, as if trained
    assert spec.num_classes == 10
    with pytest.raises(NothingPassed, match=r"0 of 1,\d{3} pseudo labels reached the confidence threshold 0.99"):
        run_loop(cfg)
    manifest = json.loads((run / "round_1" / "labels" / "manifest.json").read_text())
    assert manifest["rows"] == manifest["labeled"] + manifest["rejected"] == len(os.listdir(paths["unlabeled"]))
    assert not (run / "round_1" / "balanced").exists() and not (run / "round_1" / "balance_stats.json").exists()
    assert not (run / "round_1" / "student").exists()
