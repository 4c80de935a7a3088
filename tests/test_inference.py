import pytest
import torch

from core.model import ModelSpec, create_model
from labeler.inference import optimize_for_inference


@pytest.mark.parametrize(
    ("arch", "folded"), [("test_resnet", True), ("test_efficientnet", True), ("resnet10t", True), ("test_vit", False)]
)
def test_optimized_model_gives_the_same_logits(arch, folded):
    """Batch-norm folding + channels_last must not change predictions; models torch.fx cannot
    trace (test_vit) run unfused instead of failing."""
    torch.manual_seed(0)
    size = 32 if arch != "test_vit" else 160
    model = create_model(ModelSpec(arch, [str(i) for i in range(7)], size)).eval()
    with torch.no_grad():  # give the batch norms non-trivial statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, size, size)
    fast, note = optimize_for_inference(model)
    with torch.inference_mode():
        expected, got = model(x), fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert ("not folded" not in note) == folded
    plain_bns = [m for m in fast.modules() if type(m) is torch.nn.BatchNorm2d]  # BatchNormAct2d is left alone
    assert plain_bns == [] or not folded


def test_training_mode_model_is_refused():
    with pytest.raises(ValueError, match="eval"):
        optimize_for_inference(create_model(ModelSpec("test_resnet", ["a", "b"], 16)))


def test_bf16_predictor_on_cpu_is_close_to_fp32(tmp_path):
    """``precision=bf16`` autocasts on CPU too; soft labels stay within bf16 rounding of fp32."""
    import numpy as np

    from core.images import decode_batch
    from labeler.predict import Predictor
    from tests.helpers import png_bytes, random_checkpoint

    random_checkpoint(str(tmp_path / "ckpt"))
    n = 16
    batch = {
        "id": np.array([str(i) for i in range(n)], dtype=object),
        "path": np.array(["x"] * n, dtype=object),
        "bytes": np.array([png_bytes(seed=i) for i in range(n)], dtype=object),
    }
    decoded = decode_batch(batch, image_size=16, crop_pct=1.0, in_chans=3, max_pixels=10**6)
    fp32 = Predictor(str(tmp_path / "ckpt"), precision="fp32")(decoded).to_pydict()
    bf16 = Predictor(str(tmp_path / "ckpt"), precision="bf16")(decoded).to_pydict()
    np.testing.assert_allclose(np.array(bf16["probs"]), np.array(fp32["probs"]), atol=2e-2)
    assert not np.array_equal(np.array(bf16["probs"]), np.array(fp32["probs"]))  # bf16 really ran


def test_unknown_precision_fails_before_any_work(tmp_path):
    from labeler.api import LabelOptions, label_images

    with pytest.raises(ValueError, match="precision"):
        label_images(str(tmp_path), str(tmp_path), LabelOptions(precision="fp8"))
