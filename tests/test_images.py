import numpy as np
import pytest
from PIL import Image

from core.images import RejectedImage, decode_image, resize_center_crop
from tests.helpers import png_bytes


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_modes_are_converted_to_rgb(mode):
    img = decode_image(png_bytes((10, 7), mode))
    assert img.mode == "RGB" and img.size == (10, 7)


@pytest.mark.parametrize(
    "data,reason",
    [(b"", "empty"), (b"garbage", "not_an_image"), (png_bytes((64, 64), "RGB")[:150], "truncated")],
)
def test_bad_bytes_are_rejected_with_reason(data, reason):
    with pytest.raises(RejectedImage) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_pixel_limit():
    with pytest.raises(RejectedImage) as err:
        decode_image(png_bytes((50, 50)), max_pixels=100)
    assert err.value.reason == "too_large"


def test_resize_center_crop_shape_and_content():
    img = Image.fromarray(np.arange(16 * 8, dtype=np.uint8).reshape(8, 16), "L").convert("RGB")
    out = resize_center_crop(img, 4)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    left = resize_center_crop(Image.new("RGB", (20, 10), (255, 0, 0)), 10, crop_pct=0.5)
    assert left.shape == (10, 10, 3) and (left[..., 0] == 255).all()


def test_labeler_and_trainer_reject_each_bad_file_alike(tmp_path):
    """One decode step (core.images.decode_into) for labeling and training: the same reject reason per file."""
    from core.images import decode_batch
    from tests.helpers import write_bad_and_good_folder
    from trainer.data import _decode_many

    expected = write_bad_and_good_folder(str(tmp_path))
    names = sorted(expected)
    paths = [str(tmp_path / n) for n in names]
    batch = {
        "id": np.array(names, dtype=object),
        "path": np.array(paths, dtype=object),
        "bytes": np.array([(tmp_path / n).read_bytes() for n in names], dtype=object),
    }
    labeled = decode_batch(batch, image_size=16, crop_pct=1.0, in_chans=3, max_pixels=10**6)
    images, trained = _decode_many(paths, 16, 3)
    assert [r or None for r in labeled["reject_reason"]] == trained == [expected[n] for n in names]
    np.testing.assert_array_equal(labeled["image"], images)
