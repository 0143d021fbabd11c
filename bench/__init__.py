"""The suite framework. Never imports methods/ or baselines/ (only hydra instantiate reaches them)."""


def _default(_parent_, _node_):
    from bench.registry import class_default
    return class_default(_parent_, _node_)


def _tagged(tag: str, _root_=None) -> str:
    from bench.registry import sweep_choices
    return sweep_choices(tag, _root_)


def _tasks(tasks, gpus) -> int:
    """SLURM tasks per node: as set, else one per GPU (data parallel: one rank per GPU), else one."""
    return int(tasks) if tasks is not None else int(gpus) if gpus else 1


def _register_resolvers() -> None:
    """The config tree's resolvers, registered before hydra reads a config: ``${default:}`` (a
    method's keyword argument at its class default) and ``${tagged:<tag>}`` (an experiment sweeps
    every method whose config is tagged so), both bench.registry; ``${tasks_per_node:tasks,gpus}``
    (conf/cluster/slurm.yaml)."""
    from omegaconf import OmegaConf

    for name, fn in (("default", _default), ("tagged", _tagged), ("tasks_per_node", _tasks)):
        OmegaConf.register_new_resolver(name, fn, replace=True)  # ours, whatever registered the name before


_register_resolvers()
