"""The recipe extras (augment.py, schedule.py): their maths, their determinism, and how they reach the trainer's
settings, the stream and the metrics. End-to-end resume with all of them on is in test_train.py."""
import math

import pytest
import torch

from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms import v2

from distributed_train.augment import BatchMix, RandomResizedCropFlip, class_weights, mean_colour, train_transform
from distributed_train.config import Config, parse_args, resolve
from distributed_train.data import train_loader
from distributed_train.evaluate import evaluate, macro_f1, summarize
from distributed_train.schedule import crop_size_at, parse_progressive
from shard_tools.errors import UsageError
from shard_tools.manifest import Manifest

CPU = torch.device("cpu")


@pytest.mark.parametrize("size,scale", [(112, (0.25, 1.0)), (32, (0.08, 1.0)), (64, (1.0, 1.0))])
def test_crop_and_flip_equal_torchvisions_draw_for_draw(size, scale):
    """RandomResizedCropFlip replaces v2.RandomResizedCrop + v2.RandomHorizontalFlip for speed: the same pixels
    from the same seed, and the generator left where torchvision leaves it. Decoded JPEGs (HWC in memory) and plain
    CHW tensors; shapes that upscale, that are exactly `size`, and so thin that the sampler falls back."""
    torch.manual_seed(0)
    images = [torch.randint(0, 256, shape, dtype=torch.uint8)
              for shape in [(3, 160, 213), (3, 50, 60), (3, size, size), (3, 14, 300), (3, 300, 14)]]
    images += [decode_jpeg(encode_jpeg(image)) for image in images[:2]]
    reference = v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip()])
    ours = RandomResizedCropFlip(size, scale)

    def draw(transform, seed):
        torch.manual_seed(seed)
        out = [transform(image) for image in images for _ in range(6)]
        return out, torch.rand(1)

    for seed in range(3):
        (want, want_next), (got, got_next) = draw(reference, seed), draw(ours, seed)
        assert all(torch.equal(a, b) for a, b in zip(want, got)) and len(want) == len(got)
        assert all(image.unsqueeze(0).is_contiguous(memory_format=torch.channels_last) for image in got), \
            "crops stay channels-last, as the ring's slots hold them"
        assert torch.equal(want_next, got_next), "the generator must be left where torchvision leaves it"


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
def test_auto_augment_policies_change_uint8_crops_and_replay_from_a_seed(policy):
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    plain, augmented = train_transform(32, 0.5), train_transform(32, 0.5, auto_augment=policy)

    def draw(transform, seed):
        torch.manual_seed(seed)
        return torch.stack([transform(image) for _ in range(8)])

    assert draw(augmented, 1).dtype == torch.uint8 and draw(augmented, 1).shape == (8, 3, 32, 32)
    assert torch.equal(draw(augmented, 1), draw(augmented, 1)), "the same seed must give the same images"
    assert not torch.equal(draw(augmented, 1), draw(plain, 1)), f"{policy} changed nothing"


def test_random_erase_fills_with_the_datasets_mean_colour():
    fill = mean_colour([0.2, 0.4, 0.6])
    assert fill == (51, 102, 153)
    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    erased = train_transform(32, 1.0, random_erase=1.0, fill=fill)(image)
    hit = (erased != 255).any(dim=0)
    assert hit.any(), "p=1 must erase a rectangle"
    for c, value in enumerate(fill):
        assert (erased[c][hit] == value).all()


def test_progressive_sizes_step_by_16_and_share_the_epochs_equally():
    assert parse_progressive("160:192") == (160, 192)
    for bad in ("160", "150:192", "192:160", "a:b", "0:16"):
        with pytest.raises(ValueError):
            parse_progressive(bad)
    sizes = [crop_size_at(e, 160, 192, 9) for e in range(9)]
    assert sizes == [160] * 3 + [176] * 3 + [192] * 3
    assert [crop_size_at(e, 48, 80, 2) for e in range(2)] == [48, 64], "fewer epochs than sizes: still ascending"
    assert crop_size_at(5, 64, 64, 10) == 64


def test_progressive_batches_change_size_at_the_planned_epochs(uneven_shards):
    manifest = Manifest.read(str(uneven_shards))
    kw = dict(rank=0, world_size=1, batch_size=4, accum_steps=1, image_size=99, workers=0, seed=0,
              progressive=(16, 48, 3))
    for epoch, size in [(0, 16), (1, 32), (2, 48)]:
        loader, _ = train_loader(manifest, epoch=epoch, **kw)
        images, _, _ = next(iter(loader))
        assert images.shape[-2:] == (size, size), f"epoch {epoch}"


def test_batch_mix_makes_soft_labels_and_replays_each_batch_exactly():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    mix = BatchMix(4, mixup=0.2, cutmix=1.0, seed=3, rank=0)
    x, y = mix(images.clone(), labels, epoch=2, batch=5)
    assert y.shape == (8, 4) and torch.allclose(y.sum(dim=1), torch.ones(8))
    assert not torch.equal(x, images), "the batch was not mixed"
    torch.manual_seed(12345)  # another global random state, as after a restart: the same mix all the same
    x2, y2 = mix(images.clone(), labels, epoch=2, batch=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    others = [mix(images.clone(), labels, epoch=2, batch=b)[1] for b in range(6, 12)]
    assert any(not torch.equal(y, other) for other in others), "every batch mixed the same way"
    # what the loss sees: every row mixes its own label with its neighbour's (torchvision pairs by roll(1)) with
    # one weight for the whole batch
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    weight = y[0, labels[0]]  # labels[0] = 0 and its neighbour's 3 differ
    assert torch.allclose(y, weight * one_hot + (1 - weight) * one_hot.roll(1, 0))


def test_mixup_only_or_cutmix_only():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0)):
        x, y = BatchMix(2, mixup, cutmix, seed=0, rank=1)(images.clone(), labels, 0, 0)
        assert y.shape == (4, 2) and torch.allclose(y.sum(dim=1), torch.ones(4))


def test_class_weights_keep_the_average_loss_scale():
    counts = [100, 25, 4, 0]
    assert class_weights(counts, "none") is None
    for mode, power in (("sqrt", 0.5), ("inverse", 1.0)):
        w = class_weights(counts, mode)
        assert w[3] == 0
        assert math.isclose(float((w * torch.tensor(counts)).sum()) / sum(counts), 1.0, rel_tol=1e-6)
        assert math.isclose(float(w[2] / w[0]), (100 / 4) ** power, rel_tol=1e-5)


def test_balanced_accuracy_and_macro_f1_by_hand():
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # rows: true class; class 2 never occurs
    assert math.isclose(macro_f1(confusion), (6 / 7 + 4 / 5) / 2)
    result = summarize(confusion, loss_sum=0.0, top5_hits=6)
    assert math.isclose(result["balanced_accuracy"], (3 / 4 + 2 / 2) / 2)
    assert math.isclose(result["top1"], 5 / 6)
    assert result["per_class_accuracy"][2] is None


class Mirror(torch.nn.Module):
    """Logits = mean of the left half minus mean of the right half: flipping the image negates them."""

    def forward(self, x):
        half = x.shape[-1] // 2
        score = x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))
        return torch.stack([score, -score, 0.1 * torch.ones_like(score)], dim=1)


def test_tta_flip_averages_the_logits_with_the_mirror_images():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[..., :2] = 255  # bright on the left: class 0 without TTA
    loader = [(images, torch.tensor([0, 0]), ["a", "b"])]
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    plain = evaluate(Mirror(), loader, 3, CPU, mean, std)
    flipped = evaluate(Mirror(), loader, 3, CPU, mean, std, tta="flip")
    assert plain["top1"] == 1.0
    # with the mirror image averaged in, classes 0 and 1 cancel and the constant class 2 wins
    assert flipped["top1"] == 0.0 and flipped["confusion"][0][2] == 2


def test_settings_resolve_the_extras_and_refuse_what_cannot_work(tmp_path):
    def cfg(*flags):
        return parse_args(["--data", "d", "--run-dir", str(tmp_path / "run"), *flags])

    progressive = resolve(cfg("--progressive", "32:64", "--image-size", "99"), device=CPU, world_size=1,
                          local_ranks=1, train_samples=100)
    assert (progressive.image_size, progressive.eval_image_size) == (64, 64), "training ends at MAX; eval at MAX"
    fixres = resolve(cfg("--image-size", "48", "--eval-image-size", "64"), device=CPU, world_size=1, local_ranks=1,
                     train_samples=100)
    assert (fixres.image_size, fixres.eval_image_size) == (48, 64)
    with pytest.raises(SystemExit):
        cfg("--progressive", "30:64")  # argparse's one-line usage error
    bad = Config(data="d", run_dir=str(tmp_path / "run"), progressive="64:32", decode="device",
                 auto_augment="randaugment")
    with pytest.raises(UsageError) as e:
        bad.validate()
    assert "--progressive" in str(e.value) and "use --decode workers" in str(e.value)


def test_mixed_targets_take_label_smoothing_and_class_weights_as_the_loss_defines_them():
    import contextlib

    from distributed_train.train import forward_backward

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, y = torch.randn(4, 6), torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8], [0.5, 0.5, 0.0]])
    weights = torch.tensor([0.5, 1.0, 2.0])
    loss = forward_backward(model, x, y, autocast=contextlib.nullcontext, scaler=torch.amp.GradScaler("cpu",
                            enabled=False), accum_steps=1, sync=True, label_smoothing=0.1, class_weights=weights)
    smoothed = y * 0.9 + 0.1 / 3  # smoothing applies to the mixed targets, as for one-hot ones
    expected = -(weights * smoothed * model(x).log_softmax(dim=1)).sum(dim=1).mean()
    assert torch.allclose(loss, expected.detach(), atol=1e-6)
