"""Training learns: a few hundred steps on the real digits, in-process (no Ray), far above chance.

The per-worker pieces TorchTrainer runs (``MemoryFeed`` building batches from the labeled class
folders and from a balanced pseudo-labeled Parquet, ``_Step``, the optimiser and schedule) train a
model here directly. If a feed paired an image with another image's target (an ordering bug in
decoding, repetition by ``copies``, sorting by id, or augmentation), the model could not get
far above chance on held-out digits, and this test fails.
"""

import copy
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from timm.utils import ModelEmaV3

from core.model import ModelSpec, create_model
from pipeline.digits import write_digits_corpus
from trainer.data import LabeledBatches, labeled_classes
from trainer.evaluate import evaluate
from trainer.loop import MemoryFeed, _Step, _train_epoch, _Worker, build_optimizer, lr_factor, seed_everything
from trainer.settings import TrainSettings

SIZE = 16


def _pseudo_parquet(unlabeled_dir, out_file) -> int:
    """The unlabeled digits as a balanced set (the columns ``pipeline.balance`` writes), each row's
    target its true class (one-hot ``probs``); a few rows carry ``copies`` > 1 and the ids are not in
    file order, so repetition and the sort by id are exercised. Returns the rows written."""
    from sklearn.datasets import load_digits

    truth = load_digits().target
    files = sorted(unlabeled_dir.iterdir())[:400]
    index = [int(f.stem.split("_")[1]) for f in files]  # digit_0123.png: row 123 of scikit-learn's set
    labels = truth[index]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))  # written out of id order
    table = pa.table({
        "id": [files[i].name for i in order],
        "path": [str(files[i]) for i in order],
        "image": [files[i].read_bytes() for i in order],
        "label": pa.array(labels[order], pa.int64()),
        "probs": [np.eye(10, dtype=np.float32)[labels[i]].tolist() for i in order],
        "confidence": pa.array(np.ones(len(files)), pa.float32()),
        "copies": pa.array(rng.integers(1, 3, len(files)), pa.int64()),
    })  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(buf.getvalue())
    return len(files)


def _train_and_evaluate(paths: dict, pseudo: str | None, ratio: int, batch: int) -> tuple[list[float], float, float]:
    """300 steps (6 epochs of 50) of test_resnet at 16 px from ``MemoryFeed``; (losses, held-out top-1
    before, after)."""
    torch.manual_seed(0)
    seed_everything(0)
    classes = labeled_classes(paths["labeled"])
    spec = ModelSpec("test_resnet", classes, SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    s = TrainSettings(
        batch_size=batch, ratio=ratio, epochs=6, steps_per_epoch=50, lr=0.05, warmup_epochs=1, randaugment_ops=2,
        randaugment_magnitude=5, num_workers=1, seed=0, random_resized_crop=False, hflip=False,  # as digits.yaml
    )  # fmt: skip
    feed = MemoryFeed({"labeled": paths["labeled"], "pseudo": pseudo, "hard": False}, s, spec, 0, 1, 0)
    model = create_model(spec, s.drop_rate, s.drop_path_rate)
    opt = build_optimizer(model, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, feed.steps, s))
    step = _Step(model, opt, sched, None, s, torch.device("cpu"))
    held_out = LabeledBatches(paths["test"], classes, SIZE)
    before = evaluate(model, held_out, spec, "cpu")["test_top1"]
    losses = []
    for _ in range(s.epochs):
        model.train()
        losses += [step(x, y) for x, y in feed.epoch()]
    feed.recalibrate(model, "cpu")
    return losses, before, evaluate(model, held_out, spec, "cpu")["test_top1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("learns")
    paths = write_digits_corpus(str(root / "data"), labels_per_class=30, test_fraction=0.3, seed=0)
    paths["balanced"] = str(root / "balanced")
    _pseudo_parquet(root / "data" / "unlabeled", root / "balanced" / "part-0.parquet")
    return paths


@pytest.mark.timeout(300)
def test_a_few_hundred_labeled_steps_learn_the_digits(digits):
    """The labeled feed alone (class folders -> one-hot targets): 300 steps of 32 images."""
    torch.set_num_threads(2)
    losses, before, after = _train_and_evaluate(digits, None, ratio=0, batch=32)
    assert len(losses) == 300 and np.mean(losses[-50:]) < np.mean(losses[:50])
    assert before < 0.3  # an untrained model is near chance (0.1)
    assert after > 0.85, f"held-out top-1 {after:.3f} after 300 labeled steps (chance is 0.1)"


@pytest.mark.timeout(300)
def test_pseudo_labeled_rows_carry_their_own_targets(digits):
    """The pseudo-labeled feed (balanced Parquet: bytes, soft targets, copies, sorted by id) gives
    three quarters of every step: were its targets another row's, held-out accuracy would collapse."""
    torch.set_num_threads(2)
    losses, _, after = _train_and_evaluate(digits, digits["balanced"], ratio=3, batch=8)
    assert len(losses) == 300
    assert after > 0.85, f"held-out top-1 {after:.3f} after 300 steps of 8 labeled + 24 pseudo (chance is 0.1)"


def _worker(paths: dict, s: TrainSettings, spec: ModelSpec, start_epoch: int, state: dict | None) -> _Worker:
    """What ``trainer.loop._setup`` builds for one worker, from ``state`` (a checkpoint's) when given."""
    feed = MemoryFeed({"labeled": paths["labeled"], "pseudo": paths["balanced"], "hard": False}, s, spec, 0, 1,
                      start_epoch)  # fmt: skip
    torch.manual_seed(start_epoch + 7)  # a resumed worker's fresh model starts elsewhere; its state replaces it
    model = create_model(spec, s.drop_rate, s.drop_path_rate)
    opt = build_optimizer(model, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, feed.steps, s))
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    ema = ModelEmaV3(model, decay=s.ema_decay, use_warmup=True)
    if state:
        ema.load_state_dict(state["ema"])
    step = _Step(model, opt, sched, ema, s, torch.device("cpu"))
    return _Worker(s, spec, 0, 1, torch.device("cpu"), "[t]", feed, model, model, ema, opt, sched, step,
                   start_epoch, [], [], False, None, 64, None, None)  # fmt: skip


def test_a_resumed_run_trains_the_epochs_an_unbroken_run_trains(digits):
    """Resumed from the state after epoch 2 (weights, optimiser, schedule, EMA), epochs 3 and 4 draw the same
    batches, augmentation, dropout and stochastic depth as in the unbroken run: on the CPU the weights and
    the EMA weights come out bit for bit the same, so a training restart (a lost node, a storage fault) does
    not make another teacher."""
    torch.set_num_threads(2)
    spec = ModelSpec("test_resnet", labeled_classes(digits["labeled"]), SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    s = TrainSettings(batch_size=8, ratio=2, epochs=4, steps_per_epoch=5, lr=0.05, warmup_epochs=1, randaugment_ops=2,
                      drop_rate=0.3, drop_path_rate=0.2, ema_decay=0.9, num_workers=1, seed=5)  # fmt: skip
    unbroken = _worker(digits, s, spec, 0, None)
    for epoch in range(4):
        _train_epoch(unbroken, epoch)
        if epoch == 1:
            parts = {"model": unbroken.model, "optimizer": unbroken.opt, "scheduler": unbroken.sched,
                     "ema": unbroken.ema}  # fmt: skip
            state = {k: copy.deepcopy(v.state_dict()) for k, v in parts.items()}
    resumed = _worker(digits, s, spec, 2, state)
    for epoch in (2, 3):
        _train_epoch(resumed, epoch)
    for part in ("model", "ema"):
        weights = getattr(unbroken, part).state_dict()
        for (name, a), b in zip(weights.items(), getattr(resumed, part).state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{part} {name} differs after the resume"
