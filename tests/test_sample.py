"""Per-sample seeds: a sample depends on its index only, never on batching or on the method."""
import torch

from bench.models import build
from bench.sample import PerSampleNoise, generate, sample_labels


def _net():
    torch.manual_seed(0)
    net = build("DiT-T/2", input_size=8, in_channels=1, num_classes=10, process={"kind": "ddpm", "clip_denoised": True})
    for p in net.net.parameters():  # leave adaLN-Zero so outputs depend on the weights
        torch.nn.init.normal_(p, std=0.02)
    return net


def test_samples_do_not_depend_on_batch_size():
    net = _net()
    a, ya = generate(net, 12, seed0=5, batch=12, sampler="ddpm", steps=4, cfg_scale=1.5)
    b, yb = generate(net, 12, seed0=5, batch=5, sampler="ddpm", steps=4, cfg_scale=1.5)
    assert torch.equal(ya, yb) and torch.allclose(a, b, atol=1e-5)


def test_a_subset_of_seeds_gives_the_same_samples():
    net = _net()
    full, _ = generate(net, 8, seed0=0, batch=8, sampler="ddim", steps=3)
    tail, _ = generate(net, 4, seed0=4, batch=4, sampler="ddim", steps=3)
    assert torch.allclose(full[4:], tail, atol=1e-5)


def test_noise_streams_are_per_sample_and_reproducible():
    x = torch.empty(3, 1, 2, 2)
    n1, n2 = PerSampleNoise([1, 2, 3]), PerSampleNoise([3])
    r1 = n1(x)
    assert torch.equal(r1[2], n2(x[:1])[0])
    assert not torch.equal(r1[0], r1[1])


def test_label_modes():
    assert sample_labels(list(range(12)), 10, "balanced").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    r = sample_labels(list(range(200)), 10, "random")
    assert torch.equal(r, sample_labels(list(range(200)), 10, "random")) and len(set(r.tolist())) == 10


def test_flow_model_samples_too():
    torch.manual_seed(0)
    net = build("SiT-T/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, process={"kind": "flow"})
    for sampler in ("euler", "heun", "sde"):
        x, _ = generate(net, 4, sampler=sampler, steps=3, cfg_scale=2.0)
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def _sit():
    torch.manual_seed(0)
    net = build("SiT-T/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, process={"kind": "flow"})
    for p in net.net.parameters():  # leave adaLN-Zero so the velocity depends on the weights
        torch.nn.init.normal_(p, std=0.02)
    return net


def _count_forwards(net):
    """Backbone forwards per call of generate's batches, counted by a hook (independent of bench.sample)."""
    calls = []
    net.net.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    return calls


def test_dopri5_nfe_is_measured_per_sample():
    net = _sit()
    calls = _count_forwards(net)
    x, _ = generate(net, 6, sampler="dopri5", steps=1, cfg_scale=1.5, batch=4)   # batches of 4 and 2
    assert torch.isfinite(x).all() and x.nfe.shape == (6,)
    # every forward evaluates [cond; null] rows: 8 rows per call in batch 1, then 4 in batch 2
    first, second = calls.count(8), calls.count(4)
    assert first + second == len(calls) and first > 6 and second > 6
    assert x.nfe.tolist() == [2.0 * first] * 4 + [2.0 * second] * 2
    # the row's number: the mean over samples
    from bench.sample import mean_nfe
    assert mean_nfe(x.nfe) == (round((8 * first + 4 * second) / 6, 2) if (8 * first + 4 * second) % 6 else
                               (8 * first + 4 * second) // 6)


def test_fixed_step_nfe_is_the_nominal_count():
    """The measured count of every fixed-step sampler is the process's nominal one (x2 under CFG)."""
    from bench.sample import mean_nfe

    for net, samplers in ((_sit(), ("euler", "heun", "sde", "sde_heun")), (_net(), ("ddpm", "ddim"))):
        calls = _count_forwards(net)
        for sampler in samplers:
            calls.clear()
            x, _ = generate(net, 3, sampler=sampler, steps=5, cfg_scale=1.5)
            nominal = net.process.nfe(sampler, 5) * 2
            assert len(calls) * 2 == nominal and mean_nfe(x.nfe) == nominal and type(mean_nfe(x.nfe)) is int


def test_shards_keep_the_measured_nfe(tmp_path):
    """Shards store each sample's count, so the row's nfe holds after a resume and over ranks."""
    from bench.shards import SampleShards

    net = _sit()
    shards = SampleShards(tmp_path, 5, seed0=0, shard_size=3)
    assert shards.nfe() is None
    parts = [generate(net, hi - lo, seed0=lo, sampler="dopri5", steps=1, batch=3) for lo, hi in shards.ranges()]
    for (lo, hi), (x, y) in zip(shards.ranges(), parts):
        shards.write(lo, hi, x, y)
    total = sum(float(x.nfe.sum()) for x, _ in parts)
    expected = round(total / 5, 2) if total % 5 else int(total // 5)
    assert SampleShards.open(tmp_path).nfe() == expected > 0
    samples, labels = shards.load_all()
    assert torch.equal(samples, torch.cat([x for x, _ in parts]))
    # shards drawn without a count (before counts were kept) give the caller's default
    old = SampleShards(tmp_path / "old", 2, seed0=0)
    old.write(0, 2, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert old.nfe() is None and (old.nfe() or 25) == 25
