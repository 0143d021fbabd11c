"""TinyFusion's masked representation distillation for the recovery fine-tune (arXiv 2412.01199
Sec. 3.3 and Table 5; official ``train_masked_kd.py`` and ``GaussianDiffusion.training_losses_kd_rep``
of VainF/TinyFusion@a147de7, methods.md 7d), per sample, averaged over the batch:

    L = alpha (L_KD + VB_KD) + (1 - alpha) (L_GT + VB) + beta_t L_Rep,   alpha = 0.9, beta_t = beta (1 - step/steps)

  L_KD   mean over the prediction's elements of (student - teacher)^2 (eps / velocity), the teacher on
         the same x_t, t, labels and label-dropout ids; L_GT the student's own MSE to the target.
  VB_KD  DDPM with learned sigma: KL(p_teacher(x_{t-1} | x_t) || p_student(x_{t-1} | x_t)) in bits,
         the student's mean from its *detached* eps (only its variance learns from it), the decoder NLL
         of x_0 at t = 0 (the code's ``_vb_terms_bpd_kd``); VB the student's own VLB term (Improved DDPM).
  L_Rep  the mean over the matched blocks of mean_flat((mask_s * h_s - mask_t * h_t)^2), every position
         counted, each tensor zeroed outside its own band |h - mu| < k sigma (mu, sigma per sample over
         tokens x channels, unbiased variance; k = 2, Table 5: 0.1 sigma and no mask diverge).
``kd_rule="official"`` [default] is that formula. ``kd_rule="both_bands"`` is this adapter's version 1,
written before the code was read: the squared difference only where *both* tensors are inside
their bands, normalised by the count of those positions, and the student's own VLB at weight 1 in
place of 0.9 VB_KD + 0.1 VB. Layer map ``group_end``: the last kept block of each N:M group matches
the teacher's output at the end of that group (D14 from 28 with 1:2: student i <-> teacher 2i+1, the
paper's map), any other kept block its own dense block; ``same_block`` matches every kept block to
its own dense block. Not reproduced: the code decays beta once per epoch (beta (1 - epoch/(epochs-1)));
here it decays linearly per step; flow models (SiT) have no VB terms.
"""
from __future__ import annotations

import math

import torch

from bench.api import BenchError

REP_MAPS = ("group_end", "same_block")
KD_RULES = ("official", "both_bands")


def band(x: torch.Tensor, k: float) -> torch.Tensor:
    """|x - mu| < k sigma per sample over tokens x channels, sigma from the unbiased variance
    (``th.var_mean(feature, dim=[1, 2])`` in training_losses_kd_rep)."""
    var, mu = torch.var_mean(x, dim=(1, 2), keepdim=True)
    return (x - mu).abs() < k * var.sqrt()


def official_masked_mse(s: torch.Tensor, t: torch.Tensor, k: float) -> torch.Tensor:
    """TinyFusion's masked feature loss, per sample: mean over every position of
    (mask_s * s - mask_t * t)^2, each tensor masked by its own k-sigma band."""
    ms, mt = band(s.detach(), k).to(s.dtype), band(t, k).to(t.dtype)
    return (ms * s - mt * t).pow(2).flatten(1).mean(1)


def vb_kd(process, student_out: torch.Tensor, teacher_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
          t: torch.Tensor) -> torch.Tensor:
    """TinyFusion's ``_vb_terms_bpd_kd`` per sample, in bits: KL(N(mu_T, var_T) || N(mu_S, var_S)) of the
    reverse steps p(x_{t-1} | x_t) of teacher and student (the student's eps detached, its variance
    channels not), mean over elements; at t = 0 the student's decoder NLL of x0."""
    from bench.processes.ddpm import discretized_gaussian_log_likelihood, normal_kl

    C = x0.shape[1]
    frozen_s = torch.cat([student_out[:, :C].detach(), student_out[:, C:]], dim=1)
    mean_s, _, logvar_s, _ = process._p_mean_variance(frozen_s, x_t, t, process.base, clip=False)
    with torch.no_grad():
        mean_t, _, logvar_t, _ = process._p_mean_variance(teacher_out.detach(), x_t, t, process.base, clip=False)
    dims = tuple(range(1, x0.ndim))
    kl = normal_kl(mean_t, logvar_t, mean_s, logvar_s).mean(dim=dims) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean_s, 0.5 * logvar_s).mean(dim=dims) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def masked_mse(s: torch.Tensor, t: torch.Tensor, k: float) -> torch.Tensor:
    """kd_rule=both_bands (version 1): mean squared difference over the positions inside *both*
    tensors' k-sigma bands, over the batch."""
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
                 rep_map: str = "group_end", rule: str = "official"):
        if rep_map not in REP_MAPS:
            raise BenchError(f"tinyfusion rep_map={rep_map!r} is unknown; use one of {', '.join(REP_MAPS)}")
        if rule not in KD_RULES:
            raise BenchError(f"tinyfusion kd_rule={rule!r} is unknown; use one of {', '.join(KD_RULES)}")
        self.rule = rule
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
            held.update(out=out, hs=hs, tout=tout, ths=ths, x_t=x_t)
            return out

        own = net.process.training_loss(model_fn, x0, t, noise, reduction="none")   # L_GT (+ VB)
        out, tout = held["out"], held["tout"]
        dims = tuple(range(1, x0.ndim))
        kd = (out[:, :C] - tout[:, :C]).pow(2).mean(dim=dims)
        learned = net.process.kind == "ddpm" and out.shape[1] > C and getattr(net.process, "learn_sigma", False)
        if self.rule == "official":
            kd_vb = vb_kd(net.process, out, tout, x0, held["x_t"], t) if learned else torch.zeros_like(kd)
            per = self.alpha * (kd + kd_vb) + (1 - self.alpha) * own
        else:   # both_bands (version 1): the student's own VLB at weight 1
            gt = (noise - out[:, :C]).pow(2).mean(dim=dims) if net.process.kind == "ddpm" else own
            per = self.alpha * kd + (1 - self.alpha) * gt + (own - gt)
        loss = per.mean()
        beta_t = self.beta * max(0.0, 1.0 - self.step / self.total)
        if beta_t > 0:
            tmap = self.layer_map(list(net.kept_blocks), len(held["ths"]) - 1)
            pairs = [(held["hs"][j + 1], held["ths"][i + 1]) for j, i in enumerate(tmap)]
            if self.rule == "official":   # per sample, averaged over the matched blocks, then over the batch
                rep = (sum(official_masked_mse(a, b, self.sigma) for a, b in pairs) / max(1, len(pairs))).mean()
            else:
                rep = sum(masked_mse(a, b, self.sigma) for a, b in pairs) / max(1, len(pairs))
            loss = loss + beta_t * rep
        return loss
