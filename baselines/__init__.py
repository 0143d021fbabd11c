"""Simple depth (block) baselines that pruning papers compare against (methods.md section 8).

Each module's docstring is its method card; each class is a ``bench.api.Method`` reached only
through ``bench/conf/method/<label>.yaml`` (hydra ``instantiate``). All of them are score-only:
they rank whole DiT/SiT blocks (higher score = more important = kept), keep the
``surgery.blocks_to_keep`` best, and never touch weights or shapes.
"""
