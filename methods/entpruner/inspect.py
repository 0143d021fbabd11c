"""What EntPruner's CED measures on a trained teacher (method card R1, R3-R5).

    python -m methods.entpruner.inspect [--out DIR] [--outputs prediction,x0,samples]
        [--variants class/gaussian_lw,bin/knn,...] <hydra overrides of bench.run>
    BENCH_ARTIFACTS=/path/to/artifacts python -m methods.entpruner.inspect --out results/gpu/tier/ced_inspect \\
        experiment=gpu_tier device=cpu

The run config is composed as bench.run composes it (method=entpruner unless the overrides name another
EntPruner config); the data, the cached teacher and the calibration probes come from bench.checks,
bench.run.teacher and bench.data.calibration. A teacher is never trained here: a missing checkpoint stops
with the fix. The forwards (the full model, then each block bypassed) run once per outputs kind (x0 is
derived from the prediction forwards, ced.implied_x0); every variant (condition x estimator) then scores
them. Per variant:
  H       the full model's entropy, the p(g)-weighted mean over the conditioning groups (nats), with d, the
          dimension the estimator sees (after its PCA to n-1 when d >= n), the entropy of N(0, I) of that
          dimension (d/2 log 2 pi e) and of the isotropic Gaussian of the same total variance
          (d/2 log(2 pi e tr S / d)), and H_noise_draw, what the same estimator (its PCA included) gives on a
          seeded N(0, I) draw of the outputs' shape (n x raw d): is H just "noise of that size"?
  LW      the Ledoit-Wolf shrinkage intensity over the groups (gaussian / ledoit_wolf), of the full model and
          over the ablations: where it is 1 the covariance is replaced by its isotropic target, and where it is 1
          for both, CED_i = |sum_g p(g) d_g/2 log(tr S_-i,g / tr S_g)|;
  CED     over blocks, the blocks a one-shot CED plan removes at keep 0.75 / 0.5 of the blocks (EntPruner.plan:
          bench.surgery.keep_top of CED), and Spearman correlations with the default variant's CED (the
          method config's settings), with block index, with the share of total variance each ablation
          changes (|tr S_-i - tr S| / tr S, within groups, in output space) and with iso_ced, the CED of the
          isotropic Gaussians of the same total variances (the "ratio of total variances" reading).
Writes <out>/ced_inspect.json (everything, with the config, teacher sha256, versions and wall seconds) and
<out>/ced_inspect.md (a table per outputs kind and findings computed from the numbers).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from bench.api import BenchError, Budget
from bench.surgery import blocks_to_keep, keep_top
from methods.entpruner import units as U
from methods.entpruner.ced import CONDITIONS, OUTPUTS, ablated_outputs, ced_from_outputs, combine, \
    conditioning_groups, implied_x0, model_outputs
from methods.entpruner.entropy import LOG_2PI_E, ledoit_wolf

ESTIMATORS = {"gaussian_lw": ("gaussian", "ledoit_wolf"), "gaussian_none": ("gaussian", "none"),
              "diagonal": ("diagonal", None), "knn": ("knn", None)}  # None: the estimator has no shrinkage
KEEPS = (0.75, 0.5)  # fractions of the blocks a one-shot plan keeps (the GPU tier's budgets)
NAME = "ced_inspect"


def _log(msg: str):
    print(f"[ced-inspect] {msg}", file=sys.stderr, flush=True)


def estimator_name(estimator: str, shrinkage: str) -> str:
    return {"gaussian": f"gaussian_{'lw' if shrinkage == 'ledoit_wolf' else shrinkage}"}.get(estimator, estimator)


# --------------------------------------------------------------------------------------------
# Config, teacher, probes: bench.run's own functions
# --------------------------------------------------------------------------------------------

def compose_run(overrides: list[str]) -> dict:
    """The resolved run config of `python -m bench.run <overrides>` (method=entpruner unless named)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    if not any(o.split("=", 1)[0].lstrip("+~") == "method" for o in overrides):
        overrides = ["method=entpruner", *overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="bench.conf", version_base="1.3"):
            c = compose("run", overrides=list(overrides), return_hydra_config=True)
        name = c.hydra.runtime.choices["method"]
        with open_dict(c):
            del c["hydra"]
        d = OmegaConf.to_container(c, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise BenchError(f"{' '.join(str(e).split())} (check the overrides: key=value, +key=value to add a key)") \
            from None
    finally:
        GlobalHydra.instance().clear()
    d["method_name"] = name
    return d


def load(cfg: dict):
    """(EntPruner, teacher on cfg.device in eval mode, calibration probes, teacher record). Never trains."""
    from bench import checks
    from bench.data import calibration
    from bench.io import sha256_file
    from bench.run import make_method, teacher, teacher_dir
    from methods.entpruner import EntPruner

    budget = checks.check(cfg)
    method = make_method(cfg)
    if not isinstance(method, EntPruner):
        raise BenchError(f"method={cfg['method_name']} is not EntPruner; use method=entpruner (or entpruner_oneshot)")
    ckpt = Path(cfg["model"]["ckpt"]) if cfg["model"].get("ckpt") else teacher_dir(cfg) / "final.pt"
    if not ckpt.is_file():
        raise BenchError(f"no teacher at {ckpt}, and this command never trains one: bring it there (GPU tier: "
                         "python -m bench.gpu.tier import-teacher data/tier-teacher), train it with python -m bench.run "
                         "<the same overrides> method=dense, or point BENCH_ARTIFACTS / paths.artifacts at the "
                         "artifacts that hold it")
    data = checks.check_inputs(cfg, budget, method)
    net, _ = teacher(cfg, data, cfg["device"])  # on the device, in eval mode
    c = cfg["calib"]
    calib = calibration(data, c["n"], c["seed"], c["bins"]).to(cfg["device"])
    return method, net, calib, {"path": str(ckpt), "sha256": sha256_file(ckpt), "config": cfg["teacher"]}


# --------------------------------------------------------------------------------------------
# Forwards once per outputs kind, then every variant
# --------------------------------------------------------------------------------------------

def forwards(net, calib, outputs: str, kw: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(full model's outputs, outputs with each unit bypassed): ced.model_outputs / ced.ablated_outputs."""
    t0, ref, ablated = time.perf_counter(), model_outputs(net, calib, outputs, **kw), []
    for i, out in enumerate(ablated_outputs(net, calib, outputs=outputs, **kw)):
        ablated.append(out)
        _log(f"{outputs}: unit {i + 1}/{len(U.labels(net))} bypassed, {time.perf_counter() - t0:.0f} s")
    return ref, ablated


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (scipy), None when either side is constant."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def removals(net, ced: list[float]) -> dict[str, list]:
    """The units a one-shot CED plan removes at each of KEEPS (EntPruner.plan with schedule=oneshot);
    {} for the U-Net, whose budgets are in MACs or params."""
    if U.kind_of(net) != U.BLOCKS:
        return {}
    labels, out = U.labels(net), {}
    for keep in KEEPS:
        kept = set(keep_top(ced, blocks_to_keep(net, Budget("blocks", keep))))
        out[str(keep)] = [labels[i] for i in range(len(ced)) if i not in kept]
    return out


def _spread(g, out: torch.Tensor) -> tuple[int, float]:
    """(dimension, total variance tr S) of a group's outputs where its estimator sees them (after its PCA)."""
    z = g.project(out[g.idx].to(torch.float64))
    return z.shape[1], float(z.var(0, unbiased=False).sum())


def score_variant(ref, ablated, calib, net, condition: str, reduce: str, est: dict) -> dict:
    """CED of one variant (a condition, an estimator's settings `est`) and what its H is made of."""
    r = ced_from_outputs(ref, ablated, calib, condition=condition, reduce=reduce, **est)
    groups = conditioning_groups(ref, calib, condition, **est)
    sizes = [len(g.idx) for g in groups]
    w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    mean = lambda xs: float((w * torch.tensor(xs, dtype=torch.float64)).sum())  # noqa: E731  (p(g), as H)
    iso = lambda g, d, tv: 0.5 * d * (LOG_2PI_E + math.log(tv / d + g.floor))  # noqa: E731  (the estimator's floor)
    draw = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h_draw = mean([g.h_full for g in conditioning_groups(draw, calib, condition, **est)])  # the same groups
    dims, tvs = zip(*(_spread(g, ref) for g in groups))
    h_iso = [iso(g, d, tv) for g, d, tv in zip(groups, dims, tvs)]
    iso_ced = [combine(sizes, h_iso, [iso(g, *_spread(g, out)) for g in groups], reduce)[2] for out in ablated]
    raw = lambda out: mean([float(out[g.idx].to(torch.float64).var(0, unbiased=False).sum()) for g in groups])  # noqa: E731
    tr = raw(ref)
    share = [abs(raw(out) - tr) / tr for out in ablated]
    lw_of = lambda out: [ledoit_wolf(g.project(out[g.idx].to(torch.float64)))[1] for g in groups]  # noqa: E731
    lw, lw_abl = None, None
    if (est["estimator"], est["shrinkage"]) == ("gaussian", "ledoit_wolf"):
        lw, per_ablation = lw_of(ref), [lw_of(out) for out in ablated]
        lw_abl = {"mean": sum(map(mean, per_ablation)) / len(per_ablation), "min": min(map(min, per_ablation)),
                  "max": max(map(max, per_ablation))}
    return {"condition": condition, "estimator": est["estimator"], "groups": len(groups),
            "shrinkage": est["shrinkage"] if est["estimator"] == "gaussian" else None,  # the others have none
            "H": r["H"], "H_iso": mean(h_iso), "H_noise": mean([0.5 * d * LOG_2PI_E for d in dims]),
            "H_noise_draw": h_draw,
            "dim": {"mean": mean(dims), "min": min(dims), "max": max(dims)},
            "lw_intensity": {"mean": mean(lw), "min": min(lw), "max": max(lw)} if lw else None,
            "lw_intensity_ablated": lw_abl,
            "ced": r["ced"], "H_ablated": r["H_ablated"], "iso_ced": iso_ced, "variance_share": share,
            "removed": removals(net, r["ced"]),
            "spearman": {"block_index": spearman(r["ced"], list(range(len(r["ced"])))),
                         "variance_share": spearman(r["ced"], share), "iso_ced": spearman(r["ced"], iso_ced)}}


def inspect(overrides: list[str], kinds: list[str], variants: list[str] | None = None, command: str = "") -> dict:
    """Everything ced_inspect.json holds (module docstring)."""
    from bench.metrics.cost import device_name
    from bench.results import git_info, library_versions
    from methods.entpruner import _DTYPES

    t_start = time.perf_counter()
    cfg = compose_run(overrides)
    m, net, calib, teacher = load(cfg)
    default = {"outputs": m.outputs, "condition": m.condition, "estimator": m.estimator, "shrinkage": m.shrinkage,
               "name": f"{m.condition}/{estimator_name(m.estimator, m.shrinkage)}"}
    kw = dict(batch_size=m.batch_size, amp_dtype=_DTYPES[m.dtype], sample_steps=m.sample_steps,
              sample_seed=m.sample_seed)
    names = variants or [f"{c}/{e}" for c in CONDITIONS for e in ESTIMATORS]
    kinds = [k for k in OUTPUTS if k in kinds or k == default["outputs"]]
    blocks = U.kind_of(net) == U.BLOCKS
    report = {"command": command, "overrides": overrides,
              "method": {"name": cfg["method_name"], "settings": m.settings(), "default_variant": default},
              "model": cfg["model"], "data": cfg["data"], "calib": cfg["calib"], "teacher": teacher,
              "device": cfg["device"], "device_name": device_name(cfg["device"]), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "versions": library_versions(),
              "git": dict(zip(("sha", "dirty"), git_info())), "units": U.labels(net),
              "keeps": {str(k): blocks_to_keep(net, Budget("blocks", k)) for k in KEEPS} if blocks else {},
              "kinds": {}, "not_run": {}}
    pred = None
    for kind in kinds:
        t0 = time.perf_counter()
        if kind == "samples":
            ref, ablated = forwards(net, calib, kind, kw)
        else:  # x0 is the clean image the prediction implies: the same forwards
            if pred is None:
                pred = forwards(net, calib, "prediction", kw)
                report["prediction_forwards_s"] = round(time.perf_counter() - t0, 1)
            ref, ablated = pred if kind == "prediction" else \
                (implied_x0(net, calib, pred[0]), [implied_x0(net, calib, o) for o in pred[1]])
        t_fw = time.perf_counter() - t0
        wanted = names + ([default["name"]] if kind == default["outputs"] and default["name"] not in names else [])
        out = {}
        for name in wanted:
            cond, est = name.split("/")
            estimator, shrinkage = ESTIMATORS[est]
            out[name] = score_variant(ref, ablated, calib, net, cond, m.reduce,
                                      dict(estimator=estimator, shrinkage=shrinkage or m.shrinkage, pca=m.pca,
                                           knn_k=m.knn_k, eps_floor=m.eps_floor))
        report["kinds"][kind] = {"probes": len(calib), "dim": int(ref.shape[1]), "variants": out,
                                 "forwards_of": "prediction" if kind == "x0" else kind,
                                 "seconds": {"forwards": round(t_fw, 1),
                                             "scores": round(time.perf_counter() - t0 - t_fw, 1)}}
        _log(f"{kind}: {len(out)} variants scored, {time.perf_counter() - t0:.0f} s")
    base = report["kinds"][default["outputs"]]["variants"][default["name"]]["ced"]
    for k in report["kinds"].values():
        for v in k["variants"].values():
            v["spearman"]["default"] = spearman(v["ced"], base)
    if "samples" not in kinds and "prediction_forwards_s" in report:
        report["not_run"]["samples"] = {
            "why": "not in --outputs", "projected_forwards_s": round(m.sample_steps * report["prediction_forwards_s"], 1),
            "how": f"sample_steps ({m.sample_steps}) x the prediction forwards measured here"}
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    return report


# --------------------------------------------------------------------------------------------
# ced_inspect.md: a table per outputs kind, then findings computed from the numbers
# --------------------------------------------------------------------------------------------

def fmt(x, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def fmt_dim(v: dict) -> str:
    d = v["dim"]
    return str(d["min"]) if d["min"] == d["max"] else f"{d['min']}-{d['max']}"


def fmt_blocks(blocks) -> str:
    return ",".join(map(str, blocks)) if blocks is not None else "-"


def _trend(rho) -> str:
    if rho is None:
        return "CED constant over blocks"
    if rho <= -0.5:
        return "later blocks score lower"
    if rho >= 0.5:
        return "earlier blocks score lower"
    return "no strong depth trend: |rho| < 0.5"


def findings(r: dict) -> list[str]:
    """Plain statements computed from the numbers (no claim is written in advance)."""
    out, dflt = [], r["method"]["default_variant"]
    for kind, k in r["kinds"].items():
        vs = k["variants"]
        name = dflt["name"] if dflt["name"] in vs else next(iter(vs))
        v, sp = vs[name], vs[name]["spearman"]
        gap = v["H"] - v["H_noise"]
        s = (f"**{kind}**, {name}: H = {v['H']:.2f} nats at d = {fmt_dim(v)}; N(0, I) of that dimension has "
             f"{v['H_noise']:.2f} (H minus that: {gap:+.2f} nats, {100 * gap / abs(v['H_noise']):+.1f} %), the isotropic "
             f"Gaussian of the same total variance {v['H_iso']:.2f} (H minus that: {v['H'] - v['H_iso']:+.2f}), the same "
             f"estimator on N(0, I) noise of the outputs' shape {v['H_noise_draw']:.2f} (H minus that: "
             f"{v['H'] - v['H_noise_draw']:+.2f}, {100 * (v['H'] - v['H_noise_draw']) / abs(v['H_noise_draw']):+.1f} %).")
        if lw := v["lw_intensity"]:
            la = v["lw_intensity_ablated"]
            s += (f" Ledoit-Wolf intensity {lw['mean']:.3f} (range {lw['min']:.3f}-{lw['max']:.3f}; with a block "
                  f"bypassed {la['min']:.3f}-{la['max']:.3f})")
            full = min(lw["min"], la["min"]) >= 0.999
            s += (": every covariance, full and ablated, is replaced by its isotropic target, so this CED is a log "
                  "ratio of total variances" if full else f": the shrunk covariance of the full model keeps "
                  f"{1 - lw['mean']:.2f} of the sample covariance on average") + "."
        s += (f" Spearman of its CED with the isotropic-Gaussian CED {fmt(sp['iso_ced'])}, with the share of total "
              f"variance each ablation changes {fmt(sp['variance_share'])}, with block index {fmt(sp['block_index'])} "
              f"({_trend(sp['block_index'])}).")
        rhos = sorted((x["spearman"]["default"], n) for n, x in vs.items()
                      if x["spearman"]["default"] is not None and (kind, n) != (dflt["outputs"], dflt["name"]))
        if rhos:
            s += (f" Spearman of the other variants of outputs={kind} with the default variant (outputs={dflt['outputs']} "
                  f"{dflt['name']}): {rhos[0][0]:.2f} ({rhos[0][1]}) to {rhos[-1][0]:.2f} ({rhos[-1][1]}).")
        base = r["kinds"][dflt["outputs"]]["variants"][dflt["name"]]["removed"]
        for keep in r["keeps"]:
            other = [n for n, x in vs.items() if x["removed"][keep] != base[keep]]
            if len(other) == len(vs):
                s += f" At keep {keep} none of its {len(vs)} variants removes the default's blocks."
            else:
                s += (f" At keep {keep}, {len(vs) - len(other)} of its {len(vs)} variants remove the default's blocks"
                      + (f"; the others: {', '.join(other)}." if other else "."))
        out.append(s)
    for keep, n_keep in r["keeps"].items():
        sets = removal_sets(r, keep)
        base = tuple(r["kinds"][dflt["outputs"]]["variants"][dflt["name"]]["removed"][keep])
        out.append(f"At keep {keep} ({n_keep} of {len(r['units'])} blocks kept) the {sum(map(len, sets.values()))} "
                   f"variants give {len(sets)} distinct removal set(s); {len(sets[base])} of them give the default's "
                   f"({fmt_blocks(base)}).")
    return out


def removal_sets(r: dict, keep: str) -> dict[tuple, list[str]]:
    """Distinct removal sets at `keep` -> the variants ("<outputs> <condition>/<estimator>") that give them."""
    sets: dict[tuple, list[str]] = {}
    for kind, k in r["kinds"].items():
        for name, v in k["variants"].items():
            sets.setdefault(tuple(v["removed"][keep]), []).append(f"{kind} {name}")
    return dict(sorted(sets.items(), key=lambda kv: -len(kv[1])))


def markdown(r: dict) -> str:
    t, c = r["teacher"], r["calib"]
    lines = [f"# What EntPruner's CED measures on the {r['model']['name']} teacher ({r['data']['name']})", "",
             f"`{r['command']}`", "",
             f"Teacher sha256 {t['sha256'][:16]}..., {c['n']} calibration probes (seed {c['seed']}, {c['bins']} noise "
             f"bins), method {r['method']['name']} (default variant: outputs={r['method']['default_variant']['outputs']} "
             f"{r['method']['default_variant']['name']}), {r['device_name']}, torch {r['torch']}, git {r['git']['sha']}"
             f"{' (dirty)' if r['git']['dirty'] else ''}; wall {r['wall_s']:.0f} s. Everything: ced_inspect.json.", "",
             "H: the full model's entropy, the p(g)-weighted mean over the conditioning groups, in nats; d: the "
             "dimension the estimator sees (its PCA to n-1 when d >= n); iso: the isotropic Gaussian of the same d and "
             "total variance; N(0,I): d/2 log(2 pi e); noise draw: H of the same estimator (its PCA included) on a seeded "
             "N(0, I) draw of the outputs' shape; LW: Ledoit-Wolf intensity, mean [min, max] over the groups (LW "
             "ablated: over the groups and the ablations); "
             "removed: the blocks a one-shot CED plan drops (lowest CED) at keep 0.75 / 0.5 of the blocks; rho: "
             "Spearman of the variant's CED with the default variant's, with block index, with the share of total "
             "variance each ablation changes (|tr S_-i - tr S| / tr S) and with the CED of the isotropic Gaussians of "
             "the same total variances.", ""]
    keeps = list(r["keeps"])
    for kind, k in r["kinds"].items():
        sec = k["seconds"]
        src = " (the prediction's)" if k["forwards_of"] != kind else ""
        lines += [f"## outputs={kind}", "",
                  f"{k['probes']} probes, {k['dim']} values each; forwards{src} {sec['forwards']:.0f} s, scoring "
                  f"{sec['scores']:.0f} s.", "",
                  "| variant | d | H | iso | N(0,I) | noise draw | LW | LW ablated | "
                  + " | ".join(f"removed @{x}" for x in keeps) + " | rho default | rho block | rho var share | rho iso CED |",
                  "|" + "---|" * (12 + len(keeps))]
        for name, v in k["variants"].items():
            lw, la, sp = v["lw_intensity"], v["lw_intensity_ablated"], v["spearman"]
            lw_s = f"{lw['mean']:.3f} [{lw['min']:.3f}, {lw['max']:.3f}]" if lw else "-"
            la_s = f"{la['mean']:.3f} [{la['min']:.3f}, {la['max']:.3f}]" if la else "-"
            lines.append(f"| {name} | {fmt_dim(v)} | {fmt(v['H'])} | {fmt(v['H_iso'])} | {fmt(v['H_noise'])} | "
                         f"{fmt(v['H_noise_draw'])} | {lw_s} | {la_s} | "
                         + " | ".join(fmt_blocks(v["removed"].get(x)) for x in keeps)
                         + f" | {fmt(sp['default'])} | {fmt(sp['block_index'])} | {fmt(sp['variance_share'])} | "
                           f"{fmt(sp['iso_ced'])} |")
        v = k["variants"].get(r["method"]["default_variant"]["name"])
        if v:
            lines += ["", f"CED by block ({r['method']['default_variant']['name']}): "
                      + ", ".join(f"{u}: {c:.3g}" for u, c in zip(r["units"], v["ced"]))]
        lines.append("")
    for keep in keeps:
        lines += [f"## Removal sets at keep {keep}", "", "| removed | variants |", "|---|---|"]
        lines += [f"| {fmt_blocks(b)} | {', '.join(names)} |" for b, names in removal_sets(r, keep).items()]
        lines.append("")
    for kind, why in r["not_run"].items():
        lines += [f"outputs={kind}: not run ({why['why']}); its forwards would take about "
                  f"{why['projected_forwards_s']:.0f} s ({why['projected_forwards_s'] / 60:.0f} min) here: {why['how']}.", ""]
    lines += ["## Findings", "", *[f"- {s}" for s in findings(r)], ""]
    return "\n".join(lines)


def _names(text: str | None, options, flag: str) -> list[str] | None:
    if text is None:
        return None
    names = [x for x in text.split(",") if x]
    if bad := [x for x in names if x not in options]:
        raise BenchError(f"{flag}: {', '.join(bad)} unknown; use {', '.join(options)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m methods.entpruner.inspect",
                                 description="What EntPruner's CED measures on the teacher: <out>/ced_inspect.json, .md")
    ap.add_argument("--out", default="results/ced_inspect", help="output folder")
    ap.add_argument("--outputs", default=",".join(OUTPUTS), help=f"outputs kinds, comma-separated ({', '.join(OUTPUTS)})")
    ap.add_argument("--variants", default=None,
                    help=f"condition/estimator, comma-separated (conditions {', '.join(CONDITIONS)}; estimators "
                         f"{', '.join(ESTIMATORS)}); default every pair")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, as for python -m bench.run")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    from bench.io import atomic_write_text, os_error_message
    try:
        kinds = _names(a.outputs, OUTPUTS, "--outputs")
        variants = _names(a.variants, [f"{c}/{e}" for c in CONDITIONS for e in ESTIMATORS], "--variants")
        r = inspect(a.overrides, kinds, variants, command=" ".join([ap.prog, *argv]))
        out = Path(a.out)
        atomic_write_text(out / f"{NAME}.json", json.dumps(r, indent=1) + "\n")
        atomic_write_text(out / f"{NAME}.md", markdown(r))
    except (BenchError, OSError) as e:
        print(f"error: {e if isinstance(e, BenchError) else os_error_message(e)}", file=sys.stderr)
        return 2
    print(f"{out / NAME}.json, .md ({r['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
