"""Paper names -> factories (DiT's `DiT_models` dict), and `build()` -> Denoiser.

DiT-{S,B,L,XL}/{2,4,8} and SiT-{S,B,L,XL}/{2,4,8} are the papers' sizes (DiT Table 1); the
`T` (tests), `D8` (embedded default) and `D28` (GPU tier) sizes are ours. Names starting with ``UNet`` or ``DDPM``
build the diffusers U-Net backbone (bench.models.unet.build_unet; its own keyword arguments).
"""
from __future__ import annotations

from bench.api import BenchError
from bench.models.denoiser import Denoiser
from bench.models.dit import DiT_models, SiT_models
from bench.processes import create_process

MODELS = {**DiT_models, **SiT_models}


def build(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
          learn_sigma: bool = True, class_dropout_prob: float = 0.1, hidden_size: int | None = None,
          num_heads: int | None = None, depth: int | None = None, ckpt: str | None = None,
          process: dict | None = None, vae: str | None = None, latent_scale: float | None = None,
          **extra) -> Denoiser:
    """Build a Denoiser. `process` holds the process factory's kwargs (kind: ddpm | flow).
    A `ckpt` in the official layout (or our own fine-tune checkpoints) is loaded strictly.
    `vae` and `latent_scale` belong to scoring (bench.vae decodes latent samples) and are not used
    here; any other key is refused (a misspelt architecture key would otherwise be ignored)."""
    if name.startswith(("UNet", "DDPM")):  # the U-Net backbone (DDPM layout), its own arguments
        from bench.models.unet import build_unet
        _refuse_unknown(name, extra, build_unet)
        return build_unet(name=name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                          learn_sigma=learn_sigma, class_dropout_prob=class_dropout_prob, ckpt=ckpt,
                          process=process, **extra)
    if name not in MODELS:
        raise BenchError(f"model.name={name!r} is unknown; use one of {', '.join(sorted(MODELS))} "
                         "(or UNet-*/DDPM-* for the U-Net)")
    _refuse_unknown(name, extra, None)
    over = {k: v for k, v in dict(hidden_size=hidden_size, num_heads=num_heads, depth=depth).items() if v is not None}
    net = MODELS[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                       learn_sigma=learn_sigma, class_dropout_prob=class_dropout_prob, **over)
    proc_kw = dict(process or {})
    kind = proc_kw.pop("kind", "flow" if name.startswith("SiT") else "ddpm")
    check_process_kwargs(kind, proc_kw)
    if kind == "ddpm":
        proc_kw.setdefault("learn_sigma", learn_sigma)
    proc = create_process(kind, **proc_kw)
    if ckpt:
        from bench.models.checkpoints import load_official
        load_official(net, ckpt, strict=True)
    return Denoiser(net, proc, name, num_classes)


def _refuse_unknown(name: str, extra: dict, factory) -> None:
    """Keys of the model config that neither build() nor the backbone's factory takes."""
    import inspect

    own = set(inspect.signature(factory).parameters) - {"_"} if factory is not None else set()
    unknown = sorted(set(extra) - own)
    if unknown:
        known = sorted(set(inspect.signature(build).parameters) - {"extra"} | own)
        raise BenchError(f"model.{unknown[0]}={extra[unknown[0]]!r}: {name} has no such setting (known: "
                         f"{', '.join(known)}); remove +model.{unknown[0]} or fix its spelling")


def check_process_kwargs(kind: str, kw: dict) -> None:
    """model.process keys against the process class's constructor (a typo is an error, not ignored)."""
    from bench.checks import factory
    from bench.processes import PROCESSES

    factory("model.process", kind, PROCESSES, kw)
