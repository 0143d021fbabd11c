"""Teacher consistency (Diff-Pruning's SSIM protocol): identity, monotonicity in added noise,
window choice for tiny images, shape / label checks, and paired generation from the same seeds."""
import warnings

import pytest
import torch
from pytorch_msssim import ssim

from bench.metrics.consistency import ssim_to_teacher, teacher_samples, to_unit, win_size_for


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=16, c=3, side=32, seed=0):
    """Smooth random images in [-1, 1] (blurred noise: structure for SSIM to see)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, side // 4, side // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return (x / x.abs().amax()).clamp(-1, 1)


@pytest.mark.parametrize("c,side", [(3, 32), (1, 8)])
def test_ssim_of_a_set_with_itself_is_one(c, side):
    x = _images(c=c, side=side)
    r = ssim_to_teacher(x, x.clone())
    assert r["n"] == 16 and r["mean"] == pytest.approx(1.0, abs=1e-6) and r["std"] == pytest.approx(0.0, abs=1e-6)
    assert r["mse"] == 0.0


@pytest.mark.parametrize("c,side", [(3, 32), (1, 8)])
def test_ssim_decreases_monotonically_with_noise(c, side):
    x = _images(c=c, side=side)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    means = [ssim_to_teacher(x + s * noise, x)["mean"] for s in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[0] == pytest.approx(1.0) and means[-1] < 0.5


def test_window_sizes():
    assert win_size_for(32, 32) == 11  # pytorch_msssim / Diff-Pruning default
    assert win_size_for(8, 8) == 7     # largest odd window that fits
    assert win_size_for(10, 9) == 9
    assert ssim_to_teacher(_images(c=1, side=8), _images(c=1, side=8, seed=1))["win_size"] == 7
    with pytest.raises(ValueError, match="too small"):
        win_size_for(2, 2)


def test_tiny_images_do_not_degenerate():
    """pytorch_msssim with an 11-px window on 8x8 images silently skips smoothing and returns the
    per-pixel luminance term only: the reason for win_size_for."""
    a = to_unit(_images(n=4, c=1, side=8))
    b = to_unit(_images(n=4, c=1, side=8, seed=1))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        degenerate = ssim(a, b, data_range=1.0, size_average=False)
    assert any("Skipping Gaussian Smoothing" in str(x.message) for x in w)
    c1 = 0.01 ** 2
    luminance = ((2 * a * b + c1) / (a * a + b * b + c1)).flatten(1).mean(1)
    assert torch.allclose(degenerate, luminance, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our choice never triggers the skip
        r = ssim_to_teacher(_images(n=4, c=1, side=8), _images(n=4, c=1, side=8, seed=1))
    assert r["mean"] != pytest.approx(float(degenerate.mean()))


def test_matches_pytorch_msssim_on_unit_images():
    """Same number as compute_ssim.py on the PNGs: [-1, 1] -> uint8 levels / 255, then ssim()."""
    s, t = _images(n=8), _images(n=8, seed=2)
    u8 = lambda x: torch.floor(((x + 1) / 2).clamp(0, 1) * 255 + 0.5) / 255  # save_image + ToTensor
    ref = ssim(u8(s), u8(t), data_range=1.0, size_average=False)
    r = ssim_to_teacher(s, t)
    assert r["mean"] == pytest.approx(ref.mean().item(), abs=1e-6)
    assert r["std"] == pytest.approx(ref.std().item(), abs=1e-6)
    assert ssim_to_teacher(s, t, quantize=False)["mean"] == pytest.approx(
        ssim((s + 1) / 2, (t + 1) / 2, data_range=1.0).item(), abs=1e-6)


def test_shape_and_label_checks():
    x = _images(n=4, c=1, side=8)
    with pytest.raises(ValueError, match="one shape"):
        ssim_to_teacher(x, x[:3])
    with pytest.raises(ValueError, match="one shape"):
        ssim_to_teacher(x[0], x[0])
    with pytest.raises(ValueError, match="win_size"):
        ssim_to_teacher(x, x, win_size=9)
    with pytest.raises(ValueError, match="labels differ"):
        ssim_to_teacher(x, x, student_labels=torch.tensor([0, 1, 2, 3]), teacher_labels=torch.tensor([0, 1, 2, 4]))
    r = ssim_to_teacher(x[:1], x[:1] * 0.5)
    assert r["n"] == 1 and r["std"] == 0.0


def test_teacher_samples_pair_with_the_students():
    """A pruned copy and its teacher, sampled with the same arguments, start from the same noise:
    an unpruned copy reproduces the teacher exactly (SSIM 1), a pruned one does not."""
    import copy

    from bench import surgery
    from bench.api import Plan
    from bench.models import build

    torch.manual_seed(0)
    teacher = build("DiT-T/2", input_size=8, in_channels=1, num_classes=10, process={"kind": "ddpm"})
    for p in teacher.net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    kw = dict(batch=3, sampler="ddim", steps=3)
    t_x, t_y = teacher_samples(teacher, 6, seed0=4, **kw)
    from bench.sample import generate
    same_x, same_y = generate(copy.deepcopy(teacher), 6, 4, **kw)
    assert ssim_to_teacher(same_x, t_x, student_labels=same_y, teacher_labels=t_y)["mean"] == pytest.approx(1.0)
    pruned = surgery.apply(copy.deepcopy(teacher), Plan(granularity="block", keep={"blocks": [0, 1]}))
    p_x, p_y = generate(pruned, 6, 4, **kw)
    r = ssim_to_teacher(p_x, t_x, student_labels=p_y, teacher_labels=t_y)
    assert r["n"] == 6 and r["mean"] < 1.0
