"""The suite framework. Never imports methods/ or baselines/ (only hydra instantiate reaches them)."""


def _default(_parent_, _node_):
    from bench.registry import class_default
    return class_default(_parent_, _node_)


def _tagged(tag: str, _root_=None) -> str:
    from bench.registry import sweep_choices
    return sweep_choices(tag, _root_)


def _register_resolvers() -> None:
    """The config tree's two resolvers (bench.registry), registered before hydra reads a config:
    ``${default:}`` (a method's keyword argument at its class default) and ``${tagged:<tag>}`` (an
    experiment sweeps every method whose config is tagged so)."""
    from omegaconf import OmegaConf

    for name, fn in (("default", _default), ("tagged", _tagged)):
        OmegaConf.register_new_resolver(name, fn, replace=True)  # ours, whatever registered the name before


_register_resolvers()
