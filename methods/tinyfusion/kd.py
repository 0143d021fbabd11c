"""TinyFusion's masked representation distillation for the recovery fine-tune (arXiv 2412.01199
Sec. 3.3 and Table 5; official `train_masked_kd.py` as summarised in methods.md 7d):

    L = alpha L_KD + (1 - alpha) L_GT + beta_t L_Rep,   alpha = 0.9, beta_t = beta (1 - step/steps)

  L_KD   MSE between the student's and the dense teacher's predictions (eps / velocity) on the same
         x_t, t, labels and label-dropout ids; L_GT the student's own MSE to the target.
  L_Rep  MSE between student and teacher hidden states, each masked to |h - mu| < k sigma (mu,
         sigma per sample over tokens x channels; k = 2, Table 5: 0.1 sigma and no mask diverge),
         averaged over the student's blocks.
Reconstruction choices: (a) the code's KD VLB term (learned variance distilled from the teacher) is
replaced by the student's own VLB at weight 1 (DDPM with learned sigma; the code's two VLB terms
weigh 0.9 + 0.1); (b) a position keeps only where *both* tensors are inside their bands; (c) layer
map `group_end`: the last kept block of each N:M group matches the teacher's output at the end of
that group (D14 from 28 with 1:2: student i <-> teacher 2i+1, the paper's map), any other kept block
its own dense block; `same_block` matches every kept block to its own dense block.
"""
from __future__ import annotations

import torch

from bench.api import BenchError

REP_MAPS = ("group_end", "same_block")


def masked_mse(s: torch.Tensor, t: torch.Tensor, k: float) -> torch.Tensor:
    """Mean squared difference over positions inside both tensors' k-sigma bands (per sample)."""
    def band(x):
        mu = x.mean(dim=(1, 2), keepdim=True)
        sd = x.std(dim=(1, 2), keepdim=True)
        return (x - mu).abs() <= k * sd
    m = (band(s.detach()) & band(t)).to(s.dtype)
    return ((s - t) ** 2 * m).sum() / m.sum().clamp_min(1.0)


class MaskedKD:
    """A fine-tune callback that only supplies the loss (prunes nothing)."""

    needs_teacher = True  # bench.run hands the loop a frozen copy of the dense model

    def __init__(self, group_size: int, alpha: float = 0.9, beta: float = 1e-2, sigma: float = 2.0,
                 rep_map: str = "group_end"):
        if rep_map not in REP_MAPS:
            raise BenchError(f"tinyfusion rep_map={rep_map!r} is unknown; use one of {', '.join(REP_MAPS)}")
        if not 0 <= alpha <= 1 or beta < 0 or sigma <= 0:
            raise BenchError("tinyfusion masked KD needs 0 <= kd_alpha <= 1, rep_beta >= 0, rep_sigma > 0")
        self.group_size, self.alpha, self.beta, self.sigma, self.rep_map = int(group_size), alpha, beta, sigma, rep_map
        self.step, self.total = 0, 1

    # ---- TrainCallback --------------------------------------------------------------------
    def on_start(self, net, total_steps, run_dir):
        self.total = max(1, int(total_steps))

    def on_step(self, step, net, loss):
        self.step = step + 1
        return None

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))

    # ---- the loss ---------------------------------------------------------------------------
    def layer_map(self, kept: list[int], depth: int) -> list[int]:
        """Teacher block whose output each student block (in order) is matched to."""
        if self.rep_map == "same_block":
            return list(kept)
        M, out = self.group_size, []
        for j, d in enumerate(kept):
            last_in_group = j + 1 == len(kept) or kept[j + 1] // M != d // M
            out.append(min((d // M + 1) * M, depth) - 1 if last_in_group else d)
        return out

    def loss(self, net, x0, y, draws, teacher):
        """`draws` (bench.api.Draws): this rank's timesteps, noise and dropped labels of the batch.
        The student runs through ``net(...)`` (the loop's DDP / compiled forward when it has one)."""
        if teacher is None:
            raise BenchError("tinyfusion masked KD needs the dense teacher (bench.run passes it to the fine-tune)")
        n, dev, C = x0.shape[0], x0.device, x0.shape[1]
        t, noise = draws.t, draws.noise
        drop = draws.drop if draws.drop is not None else torch.zeros(n, dtype=torch.long, device=dev)  # both models
        held = {}

        def model_fn(x_t, t_):
            out, hs = net(x_t, t_, y, return_hidden=True, force_drop_ids=drop)
            with torch.no_grad():
                tout, ths = teacher.backbone(x_t, t_, y, return_hidden=True, force_drop_ids=drop)
            held.update(out=out, hs=hs, tout=tout, ths=ths)
            return out

        own = net.process.training_loss(model_fn, x0, t, noise, reduction="none")
        out, tout = held["out"], held["tout"]
        dims = tuple(range(1, x0.ndim))
        kd = (out[:, :C] - tout[:, :C]).pow(2).mean(dim=dims)
        if net.process.kind == "ddpm":
            gt = (noise - out[:, :C]).pow(2).mean(dim=dims)
            vlb = own - gt  # zero without learned sigma
        else:
            gt, vlb = own, torch.zeros_like(own)
        loss = (self.alpha * kd + (1 - self.alpha) * gt + vlb).mean()
        beta_t = self.beta * max(0.0, 1.0 - self.step / self.total)
        if beta_t > 0:
            tmap = self.layer_map(list(net.kept_blocks), len(held["ths"]) - 1)
            rep = sum(masked_mse(held["hs"][j + 1], held["ths"][i + 1], self.sigma) for j, i in enumerate(tmap))
            loss = loss + beta_t * rep / max(1, len(tmap))
        return loss
