import random

import numpy as np
import pytest
import torch

from core.model import ModelSpec, create_model
from trainer.evaluate import evaluate, recalibrate_batchnorm
from trainer.loop import Cycler, epoch_seed, lr_factor
from trainer.noise import augment_batch, randaugment, smooth, soft_cross_entropy
from trainer.settings import TrainSettings


def test_soft_cross_entropy_equals_hard_ce_for_one_hot():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 1, 2, 2])
    onehot = torch.nn.functional.one_hot(y, 4).float()
    assert soft_cross_entropy(logits, onehot).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item()
    )
    sm = smooth(onehot, 0.1)
    assert soft_cross_entropy(logits, sm).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-5
    )


def test_lr_schedule_warms_up_then_decays():
    s = TrainSettings(epochs=10, warmup_epochs=2)
    f = [lr_factor(i, 10, s) for i in range(100)]
    assert f[0] == pytest.approx(0.05) and f[19] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[20:], f[21:])) and f[-1] < 0.01


def test_cycler_shards_are_disjoint_and_cover_everything():
    a, b = Cycler(10, 5, 0, 2, seed=1), Cycler(10, 5, 1, 2, seed=1)
    first, second = set(a.next().tolist()), set(b.next().tolist())
    assert first.isdisjoint(second) and first | second == set(range(10))


@pytest.mark.parametrize("n, batch, world", [(10, 3, 1), (10, 4, 3), (7, 16, 2), (5, 5, 5)])
def test_a_cycler_seeks_to_where_an_unbroken_one_is(n, batch, world):
    """A resumed run's feed starts where the unbroken run's feed would be, round ends included."""
    for rank in range(world):
        unbroken = Cycler(n, batch, rank, world, seed=3)
        for k in range(12):
            resumed = Cycler(n, batch, rank, world, seed=3)
            resumed.seek(k * batch)
            assert resumed.next().tolist() == unbroken.next().tolist(), (rank, k)


def test_epoch_seeds_differ_by_epoch_rank_and_seed_and_fit_every_rng():
    seeds = {epoch_seed(seed, rank, epoch) for seed in (0, 1, -3) for rank in range(4) for epoch in range(50)}
    assert len(seeds) == 3 * 4 * 50 and all(0 <= s < 2**63 for s in seeds)
    assert epoch_seed(7, 1, 3) == epoch_seed(7, 1, 3)  # a function of the three alone


def test_a_worker_without_images_is_refused():
    with pytest.raises(ValueError, match="3 images cannot be shared by 4 training workers"):
        Cycler(3, 2, rank=3, world=4, seed=0)


def test_randaugment_changes_images_and_can_be_switched_off():
    imgs = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    off = augment_batch(imgs, randaugment(0, 9, 16), (0.5,) * 3, (0.5,) * 3)
    random.seed(0)  # timm's RandAugment draws from Python's RNG (2 in 300 unseeded draws left all 4 unchanged)
    on = augment_batch(imgs, randaugment(2, 15, 16), (0.5,) * 3, (0.5,) * 3)
    assert off.shape == on.shape == (4, 3, 16, 16)
    assert not torch.allclose(off, on)


def test_bn_recalibration_matches_clean_statistics():
    from core.images import normalize

    spec = ModelSpec("test_resnet", ["a", "b"], 16, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = create_model(spec).eval()
    conv, bn = model.conv1[0], model.conv1[1]
    bn.running_mean.fill_(5.0)
    imgs = np.random.default_rng(0).integers(0, 255, (32, 16, 16, 3), dtype=np.uint8)
    recalibrate_batchnorm(model, imgs, spec, "cpu", batch=16)
    with torch.no_grad():
        clean_mean = conv(normalize(imgs, spec.mean, spec.std)).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, clean_mean, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training


def test_evaluate_counts_top1():
    from trainer.data import ImageSet

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).repeat(len(x), 1)

    spec = ModelSpec("x", ["a", "b"], 4)
    data = ImageSet(np.zeros((4, 4, 4, 3), np.uint8), np.eye(2, dtype=np.float32)[[0, 0, 0, 1]], ["1", "2", "3", "4"])
    assert evaluate(Fixed(), data, spec, "cpu")["test_top1"] == 0.75


def test_parquet_labeled_set(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers import png_bytes
    from trainer.data import labeled_classes, load_labeled

    images = [png_bytes(seed=i) for i in range(4)] + [b"broken"]
    struct = pa.array([{"bytes": b, "path": None} for b in images])  # as Hugging Face datasets write images
    pq.write_table(pa.table({"image": struct, "label": ["cat", "dog", "cat", "dog", "cat"]}), tmp_path / "a.parquet")
    assert labeled_classes(str(tmp_path)) == ["cat", "dog"]
    data = load_labeled(str(tmp_path), ["cat", "dog"], 8)
    assert data.images.shape == (4, 8, 8, 3)  # the broken image is skipped
    assert data.targets.argmax(1).tolist() == [0, 1, 0, 1]
    ints = tmp_path / "ints"
    ints.mkdir()
    pq.write_table(pa.table({"image": images[:3], "label": [0, 2, 2]}), ints / "b.parquet")
    assert labeled_classes(str(ints)) == ["0", "1", "2"]
    assert load_labeled(str(ints), ["0", "1", "2"], 8).targets.argmax(1).tolist() == [0, 2, 2]
    with pytest.raises(ValueError, match="does not know"):
        load_labeled(str(tmp_path), ["cat"], 8)


def test_one_target_rule_for_both_feeds():
    """Labeled and hard pseudo targets are smoothed by label_smoothing; soft pseudo targets never are."""
    from trainer.data import one_hot
    from trainer.noise import target_smoothing

    assert target_smoothing(0.1, pseudo=False, hard=False) == 0.1
    assert target_smoothing(0.1, pseudo=True, hard=True) == 0.1
    assert target_smoothing(0.1, pseudo=True, hard=False) == 0.0
    y = one_hot(np.array([2, 0]), 4)
    assert y.dtype == np.float32 and y.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
    np.testing.assert_allclose(smooth(y, 0.1), smooth(torch.from_numpy(y), 0.1).numpy())
    np.testing.assert_allclose(smooth(y, 0.1)[0], [0.025, 0.025, 0.925, 0.025])
    with pytest.raises(IndexError):
        one_hot(np.array([4]), 4)
