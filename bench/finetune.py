"""The one shared fine-tune loop (the shape of DiT's train.py): every method gets the same steps,
batch, optimizer and EMA. Also trains the default suite's teacher from scratch.

Randomness is a function of (seed, step): step k's batch indices (bench.loader) and its timesteps,
noise and dropped labels (Denoiser.draws, from a generator seeded by (seed, k, NOISE)) are drawn
for the global batch `batch`, whatever the number of processes.

Data parallel (torchrun or a SLURM job of several tasks: bench.dist): every rank holds the model,
its EMA and its optimizer; rank r takes rows [r B/N, (r+1) B/N) of each global batch and of its
draws, DistributedDataParallel averages the gradients (the mean of equal-sized local means is the
global batch's mean), so clipping, AdamW and the EMA see the same numbers on every rank and N = 1
and N = 2 follow the same trajectory up to float summation order. Rank 0 alone writes checkpoints
and logs; a checkpoint holds no per-rank state, so a killed or requeued job resumes on any N.
Progressive callbacks run on every rank with the global mean loss; rank 0's Plan is applied
everywhere (a rank that decided otherwise takes rank 0's callback state).

Resumable: every `ckpt_every` steps the model, EMA, optimizer, the current plan and the callback
state are saved atomically; a killed run restarts from the last checkpoint and, on the same
device, produces bit-identical weights.
Progressive methods return a Plan from their callback; the loop applies it to the model and its
EMA through bench.surgery, then rebuilds the optimizer (the old one points at dead parameters).
Checkpoints list the plans applied so far ("plans", JSON) and a resume replays them in order
(block, width or operator plans); older checkpoints without the list replay their kept blocks.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import dist, surgery
from bench.api import BenchError, Plan
from bench.io import atomic_torch_save, atomic_write_text, read_state
from bench.loader import NOISE, batches, derived_generator
from bench.metrics.cost import resolve_precision, tf32
from bench.models.denoiser import REGIONAL, compile_mode, use_regional
from bench.results import append_log


@dataclass
class FinetuneConfig:
    steps: int = 200               # optimizer steps; the same for every method in a table
    batch: int = 128
    lr: float = 1e-3               # AdamW; DiT uses 1e-4 at batch 256 for XL/2, tiny models take more
    weight_decay: float = 0.0      # DiT: 0
    grad_clip: float = 1.0         # TinyFusion / Diff-Pruning clip at 1.0
    ema_decay: float = 0.999       # DiT: 0.9999 over 400K steps; short runs need less memory
    ema_warmup: bool = True        # decay_t = min(decay, (1+t)/(10+t)) so short runs still average
    ckpt_every: int = 100          # steps between resumable checkpoints
    log_every: int = 50
    distill: float = 0.0           # > 0: weight of the teacher-output MSE (Diff-Pruning KD: 0.7); needs the teacher
    precision: str | None = None   # fp32 | tf32 | bf16 (autocast; fp32 master weights, optimizer, EMA); null: tf32 on CUDA (DiT's train.py), fp32 elsewhere
    compile: bool | str = False    # torch.compile the backbone's forward (recompiled after a progressive surgery);
    #                                "blocks": regional, every block through one compiled call (bench.models.denoiser)
    graph: bool = False            # CUDA: the loss's forward and backward recorded once as CUDA graphs and replayed
    #                                (bench.graphed: the same kernels without the host's launch cost; where it
    #                                applies). How a step runs, not what it computes: not in the run's config hash


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    """ema = decay * ema + (1 - decay) * model, in two multi-tensor kernels (one launch per op for all
    weights, not two per weight: the fine-tune of a small model on a GPU is launch-bound); the same
    arithmetic as the per-weight mul_/add_ it replaces, value for value."""
    with torch.no_grad():
        pe, pm = list(ema.parameters()), [p.detach() for p in model.parameters()]
        torch._foreach_mul_(pe, decay)
        torch._foreach_add_(pe, pm, alpha=1 - decay)


def _make_opt(net, cfg: FinetuneConfig):
    params = [p for p in net.net.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def finetune(net, data, cfg: FinetuneConfig, ckpt_dir: Path, seed: int = 0, callback=None,
             run_dir: Path | None = None, device="cpu", progress=None, teacher=None):
    """Train `net` (a Denoiser, already pruned) for cfg.steps on `data`. Returns the EMA Denoiser.
    Checkpoints go to ckpt_dir/last.pt; the finished EMA weights to ckpt_dir/final.pt.
    `teacher` (the frozen dense Denoiser) is needed when cfg.distill > 0. Under several ranks every
    rank calls this (bench.dist); rank 0 writes. The returned net's `finetune_plans` lists the plans a
    progressive callback applied (JSON, in order; final.pt's "plans")."""
    ckpt_dir = Path(ckpt_dir)
    main, world, rank = dist.is_main(), dist.world(), dist.rank()
    run_dir, progress = (run_dir, progress) if main else (None, None)  # logs and progress bars once
    final = ckpt_dir / "final.pt"
    log = (lambda path, dest: append_log(run_dir, "state_moved_aside", path=str(path), to=str(dest))) if run_dir else None
    # stage done: rebuild the final structure and load the EMA weights (on a copy: a checkpoint that
    # does not fit is moved aside and the fine-tune redone, and `net` must still be the start model)
    if (done := _agreed(final, lambda p: _restore(net, p, ("ema",)), "fine-tune weights", log)) is not None:
        net.net, net.kept_blocks = done.net, done.kept_blocks
        net.net.load_state_dict(done.state["ema"])
        net.finetune_plans = list(done.state.get("plans") or [])
        _restore_callback_log(done.state, run_dir)
        return net
    if cfg.distill > 0 and teacher is None:
        raise BenchError("finetune.distill > 0 needs the dense teacher; the run passes it (bench.run)")
    if cfg.batch % world:
        raise BenchError(f"finetune.batch={cfg.batch} (the global batch) does not split evenly over {world} ranks; "
                         f"use a multiple of {world}")

    net.net.to(device).train()
    ema = copy.deepcopy(net.net).eval().requires_grad_(False)
    opt = _make_opt(net, cfg)
    step = 0
    applied: list[str] = []  # the callback's plans applied so far (JSON), replayed on resume
    last = ckpt_dir / "last.pt"
    resumed = _agreed(last, lambda p: _restore(net, p, ("model", "ema", "opt", "step")), "fine-tune checkpoint", log)
    if resumed is not None:  # resume: structure first (progressive plans), then weights
        state = resumed.state
        applied = list(state.get("plans") or [])
        net.net, net.kept_blocks = resumed.net, resumed.kept_blocks
        net.net.to(device).train()
        ema = copy.deepcopy(net.net).eval().requires_grad_(False)
        net.net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt = _make_opt(net, cfg)
        opt.load_state_dict(state["opt"])
        step = state["step"]
        if callback is not None and state.get("callback") is not None:
            callback.load_state_dict(state["callback"])
        if run_dir:
            append_log(run_dir, "finetune_resume", step=step, world=world)

    if callback is not None and hasattr(callback, "on_start"):
        callback.on_start(net, cfg.steps, str(run_dir) if run_dir else None)
    # on_ema and loss are optional callback members (bench.api.TrainCallback): looked up, not assumed
    if callback is not None and hasattr(callback, "on_ema"):  # the EMA copy gets the callback's forward
        callback.on_ema(ema)                                  # hooks too (gradient-flow soft masks)
    abort_at = int(os.environ.get("BENCH_TEST_ABORT_AT_STEP", "-1"))  # tests: simulate a kill
    prec = resolve_precision(cfg.precision, device)
    rows = (rank * cfg.batch // world, (rank + 1) * cfg.batch // world)  # this rank's part of every batch
    graphed = None
    if cfg.graph:
        from bench import graphed as cuda_graph

        why = cuda_graph.why_not(device, callback, cfg.distill, cfg.compile, net)
        graphed = None if why else cuda_graph.GraphedStep(net, prec)
        if run_dir:
            append_log(run_dir, "finetune_graph", used=why is None, **({"why": why} if why else {}))
    t0 = time.time()
    data_it = batches(data, cfg.batch, None, seed, start=step, steps=cfg.steps, device=device, rank=rank,
                      world=world)  # data.workers, .hflip
    it = range(step, cfg.steps)
    with tf32(prec == "tf32"):
        for step in (progress(it) if progress else it):
            if net.forward_fn is None and (cfg.compile or dist.active()):  # first step, or the structure changed
                net.forward_fn = _forward(net.net, cfg.compile, device)
            loss = _step(net, data_it, cfg, seed, rows, device, prec, callback, teacher, step, graphed)
            _update(net, ema, opt, loss, cfg, step, backward=graphed is None)  # a replayed step ran its backward
            logging = step % cfg.log_every == 0 or step == cfg.steps - 1  # the same on every rank: mean() is collective
            value = dist.mean(loss.detach()) if (logging or callback is not None) else None  # the global batch's
            if logging and run_dir:
                append_log(run_dir, "finetune", step=step, loss=round(value, 6), s=round(time.time() - t0, 2))
            if callback is not None:
                new_plan = _agreed_plan(callback, callback.on_step(step, net, value), step, run_dir)
                if new_plan is not None:
                    net.forward_fn = None  # a compiled / DDP forward of the old structure
                    _apply_progressive(net, ema, new_plan)
                    applied.append(new_plan.to_json())
                    opt = _make_opt(net, cfg)  # old optimizer state points at removed parameters
                    if run_dir:
                        append_log(run_dir, "surgery", step=step, kept_blocks=net.kept_blocks)
            done = step + 1
            if main and done % cfg.ckpt_every == 0 and done < cfg.steps:
                atomic_torch_save({"step": done, "model": net.net.state_dict(), "ema": ema.state_dict(),
                                   "opt": opt.state_dict(), "kept_blocks": net.kept_blocks,
                                   "callback": callback.state_dict() if callback is not None else None,
                                   "plans": applied}, last)
            if done == abort_at:
                os._exit(137)  # like SIGKILL: no cleanup, no final save
    net.forward_fn = None
    if getattr(net.net, "block_fn", None) is not None:
        net.net.block_fn = None  # compile=blocks: eager again after the loop

    net.net.load_state_dict(ema.state_dict())
    net.net.eval()
    net.finetune_plans = list(applied)  # the structure's record (bench.run.STRUCTURE)
    if main:
        atomic_torch_save({"ema": ema.state_dict(), "kept_blocks": net.kept_blocks, "steps": cfg.steps,
                           "plans": applied, "callback_log": _callback_log(callback, run_dir)}, final)
        if last.exists():
            last.unlink()  # the final weights supersede the resume point
    dist.barrier()  # final.pt is there before any rank goes on (a later stage may read it)
    return net


def _callback_log(callback, run_dir) -> dict | None:
    """{name, text} of the callback's log in run_dir (TrainCallback.LOG_NAME), kept with the final weights."""
    name = getattr(callback, "LOG_NAME", "") if callback is not None else ""
    path = Path(run_dir) / name if (name and run_dir) else None
    return {"name": name, "text": path.read_text()} if path is not None and path.is_file() else None


def _restore_callback_log(state: dict, run_dir) -> None:
    """A finished fine-tune found again (its run folder deleted or not carried, the artifacts kept):
    the callback's log comes back from the final weights' copy, so the run's decisions stay on record."""
    kept = state.get("callback_log")
    if kept and run_dir and not (Path(run_dir) / kept["name"]).exists():
        atomic_write_text(Path(run_dir) / kept["name"], kept["text"])


def _forward(backbone, compile: bool | str, device):
    """The training forward: DistributedDataParallel around the backbone when a process group is
    active (gradients averaged over ranks during backward), then torch.compile of that when asked
    (compile(DDP(model)): DDP's optimizer splits the graph at its gradient buckets). compile=blocks
    (regional) instead routes the backbone's blocks through one compiled call (block_fn, which the
    loop clears at its end); a surgery keeps it (the call takes any block)."""
    fwd = backbone
    if dist.active():
        from torch.nn.parallel import DistributedDataParallel
        dev = torch.device(device)
        fwd = DistributedDataParallel(backbone, device_ids=[torch.cuda.current_device()] if dev.type == "cuda" else None)
    if compile_mode(compile) == REGIONAL:
        use_regional(backbone)
        return fwd
    return torch.compile(fwd) if compile else fwd


def _agreed(path: Path, restore, what: str, log):
    """A stored state every rank agrees on: rank 0 reads it (moving a bad file aside: bench.io.read_state)
    and tells the others whether to load it; they never move files."""
    if dist.is_main():
        got = read_state(path, restore, what, log)
        dist.broadcast(got is not None)
        return got
    return restore(path) if dist.broadcast(None) else None


def _agreed_plan(callback, plan: Plan | None, step: int, run_dir) -> Plan | None:
    """Rank 0's Plan, on every rank. Ranks hold the same weights and see the same loss, so they decide
    alike; should one not (float order in a proxy), it takes rank 0's callback state too."""
    if dist.world() == 1:
        return plan
    texts = dist.gather_all(None if plan is None else plan.to_json())
    if any(t != texts[0] for t in texts):
        state = dist.broadcast(callback.state_dict() if dist.is_main() else None)
        if not dist.is_main():
            callback.load_state_dict(state)
        if run_dir:
            append_log(run_dir, "ranks_disagreed", step=step, ranks=[i for i, t in enumerate(texts) if t != texts[0]])
    return None if texts[0] is None else Plan.from_json(texts[0])


def _step(net, data_it, cfg: FinetuneConfig, seed: int, rows: tuple[int, int], device, prec: str, callback,
          teacher, step: int, graphed=None) -> torch.Tensor:
    """This rank's loss of step `step`: its rows of the global batch (bench.loader) and of the batch's
    draws (timesteps, noise, dropped labels: Denoiser.draws from a generator seeded by (seed, step),
    drawn for the whole global batch, so they do not depend on the number of ranks). The forward runs
    under the configured precision (bf16 autocast keeps fp32 weights); `graphed` (bench.graphed) replays
    the recorded forward and backward instead (the gradients are then in place)."""
    x0, y = next(data_it)
    x0, y = x0.to(device), y.to(device)
    draws = net.draws((cfg.batch, *x0.shape[1:]), derived_generator(seed, step, NOISE), device).part(*rows)
    if graphed is not None:
        loss = graphed(x0, y, draws)
    else:
        loss = _eager_loss(net, x0, y, draws, cfg, prec, callback, teacher, device)
    if not torch.isfinite(loss):
        raise BenchError(f"loss is {loss.item()} at fine-tune step {step}; lower finetune.lr "
                         "or check the data (values must be finite, pixels in [-1, 1])")
    return loss


def _eager_loss(net, x0, y, draws, cfg: FinetuneConfig, prec: str, callback, teacher, device) -> torch.Tensor:
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=prec == "bf16"):
        if callback is not None and hasattr(callback, "loss"):  # a method's own recovery loss (TinyFusion masked KD)
            loss = callback.loss(net, x0, y, draws, teacher)
        else:
            loss = net.loss(x0, y, draws=draws, teacher=teacher, distill=cfg.distill)
    return loss


def _update(net, ema, opt, loss: torch.Tensor, cfg: FinetuneConfig, step: int, backward: bool = True) -> None:
    """Backward, clip, optimizer step and EMA update (all in fp32: master weights, AdamW state, EMA).
    backward=False: the gradients are in place already (a replayed CUDA graph wrote them: bench.graphed)."""
    if backward:
        opt.zero_grad(set_to_none=True)
        loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.net.parameters(), cfg.grad_clip)
    opt.step()
    decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
    _ema_update(ema, net.net, decay)


@dataclass
class _Restored:
    net: torch.nn.Module   # the backbone in the checkpoint's structure, its weights loaded
    kept_blocks: list[int]
    state: dict


def _restore(net, path: Path, keys: tuple[str, ...]) -> _Restored:
    """Read a checkpoint and bring a copy of `net` to its structure with its weights; raises when the
    file is cut short or does not fit (then bench.io.read_state moves it aside and the loop redoes it)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or any(k not in state for k in keys + ("kept_blocks",)):
        raise ValueError(f"missing keys: {[k for k in keys + ('kept_blocks',) if k not in state]}")
    shadow = copy.copy(net)
    shadow.net, shadow.kept_blocks = copy.deepcopy(net.net), list(net.kept_blocks)
    _replay(shadow, state["kept_blocks"], state.get("plans"))
    for k in ("model", "ema"):  # every stored weight set must fit the structure (the caller loads them)
        if k in keys:
            shadow.net.load_state_dict(state[k])
    return _Restored(shadow.net, list(shadow.kept_blocks), state)


def _replay(net, kept_blocks: list[int], plans: list[str] | None = None):
    """Bring `net` to the structure recorded in a checkpoint: replay the callback's plans in order
    (any plan: blocks, width, operators); checkpoints without "plans" (older ones) record only the
    block structure, a subset of the current one."""
    for text in plans or []:
        surgery.apply(net, Plan.from_json(text))
    if list(kept_blocks) != list(net.kept_blocks):
        if plans:
            raise BenchError(f"replaying the checkpoint's plans gives blocks {net.kept_blocks}, the checkpoint "
                             f"says {list(kept_blocks)}; delete the fine-tune checkpoint and rerun")
        surgery.apply(net, Plan(granularity="block", keep={"blocks": list(kept_blocks)}))


def _apply_progressive(net, ema, plan: Plan):
    """Apply a callback's plan to the model and its EMA (the EMA keeps its averages)."""
    shadow = copy.copy(net)
    shadow.net = ema
    shadow.kept_blocks = list(net.kept_blocks)
    surgery.apply(net, plan)
    surgery.apply(shadow, plan)
