"""Diff-ES schedule search: integer sparsity levels per stage under a trajectory-average budget,
evolved by level-switch mutation with elitist survivor selection (EvoPress-style).

Provenance: Diff-ES (arXiv 2603.05105), official code `dit/evo_search.py` as summarised in
methods.md 6c [V]: an individual is a vector of levels L_s in [0, H], one per stage; the initial
population mixes fixed patterns (front, back, middle, ramp_up, ramp_down, zigzag, ends) with random
gamma-shaped allocations projected onto the budget; each generation keeps the best
`survivors` and adds `offspring` children made by level-switch mutation (move m <= max_levels
units from stage i to stage j; number of moves min(U{1..M}, U{1..M})); fitness is cached per
level vector. Written here from that description, not from the code.

Our generalisation (the code fixes sum_s L_s = target * S, which equals a budget only when every
stage weighs the same): the budget is on the trajectory-average cost,

    feasible(L):  C(L) = sum_s w_s cost(L_s) <= keep          (w_s = stage share of sampler NFEs)
    tight(L):     no single level can be given back: C(L) + w_s (cost(L_s - 1) - cost(L_s)) > keep
                  for every s with L_s > 0, so a plan spends its budget (within one unit)

and a child that a level switch leaves infeasible or slack is repaired by random single-level
steps (add levels while infeasible, give back while not tight). With equal weights and a cost
linear in the level, feasible + tight is exactly the code's fixed level sum and repair never acts.
Patterns are projected by D'Hondt (largest shape_s / (L_s + 1) first) until feasible, then
tightened. The flat pattern (every stage the same level) is added to the paper's seven.
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable, Sequence

from bench.api import BenchError

EPS = 1e-9
PATTERNS = ("flat", "front", "back", "middle", "ends", "ramp_up", "ramp_down", "zigzag")


def pattern_shape(name: str, S: int, rng: random.Random | None = None) -> list[float]:
    """Positive weights over stages 0..S-1 (stage 0 = least noise, u ascending): where levels go."""
    x = [s / (S - 1) if S > 1 else 0.5 for s in range(S)]
    if name == "flat":
        return [1.0] * S
    if name == "front":          # concentrated on the first stages
        return [4.0 ** -s for s in range(S)]
    if name == "back":           # concentrated on the last stages
        return [4.0 ** -(S - 1 - s) for s in range(S)]
    if name == "middle":
        return [math.exp(-((v - 0.5) / 0.25) ** 2) + 1e-3 for v in x]
    if name == "ends":
        return [1.0 - math.exp(-((v - 0.5) / 0.25) ** 2) + 1e-3 for v in x]
    if name == "ramp_up":
        return [0.1 + v for v in x]
    if name == "ramp_down":
        return [1.1 - v for v in x]
    if name == "zigzag":
        return [1.0 if s % 2 == 0 else 0.25 for s in range(S)]
    if name == "random":         # gamma(1) draws = a uniform point on the simplex
        return [rng.gammavariate(1.0, 1.0) + 1e-6 for _ in range(S)]
    raise BenchError(f"unknown initial pattern {name!r}; use {', '.join(PATTERNS)} (and n_random for random ones)")


class LevelSpace:
    """Levels 0..max_level per stage, cost(level) as a fraction of the dense model, stage weights."""

    def __init__(self, weights: Sequence[float], cost: Sequence[float], keep: float):
        self.w = [float(v) for v in weights]
        self.cost = [float(c) for c in cost]  # cost[level], non-increasing
        self.keep = float(keep)
        self.S, self.max_level = len(self.w), len(self.cost) - 1
        if any(b > a + EPS for a, b in zip(self.cost, self.cost[1:])):
            raise BenchError("a backend's cost must not grow with the level")
        if self.total([self.max_level] * self.S) > self.keep + EPS:
            raise BenchError(f"the budget keep={self.keep} cannot be met even at the highest level of every stage "
                             f"(trajectory cost {self.total([self.max_level] * self.S):.4f}); raise budget.keep")

    def total(self, L) -> float:
        return sum(w * self.cost[l] for w, l in zip(self.w, L))

    def feasible(self, L) -> bool:
        return self.total(L) <= self.keep + EPS

    def slack(self, L) -> list[int]:
        """Stages that could give one level back and stay feasible."""
        c = self.total(L)
        return [s for s in range(self.S) if L[s] > 0
                and c + self.w[s] * (self.cost[L[s] - 1] - self.cost[L[s]]) <= self.keep + EPS]

    def project(self, shape: Sequence[float]) -> tuple[int, ...]:
        """Deterministic: D'Hondt allocation proportional to shape until feasible, then tighten."""
        L = [0] * self.S
        while not self.feasible(L):
            cands = [s for s in range(self.S) if L[s] < self.max_level]
            s = max(cands, key=lambda s: (shape[s] / (L[s] + 1), -s))
            L[s] += 1
        while slack := self.slack(L):
            s = min(slack, key=lambda s: (shape[s] / L[s], s))
            L[s] -= 1
        return tuple(L)

    def repair(self, L: list[int], rng: random.Random) -> tuple[int, ...]:
        while not self.feasible(L):
            L[rng.choice([s for s in range(self.S) if L[s] < self.max_level])] += 1
        while slack := self.slack(L):
            L[rng.choice(slack)] -= 1
        return tuple(L)

    def mutate(self, parent: Sequence[int], rng: random.Random, max_levels: int, n_valid: int) -> tuple[int, ...]:
        """Level switch: min(U{1..M}, U{1..M}) moves of m <= max_levels levels from stage i to j."""
        L = list(parent)
        moves = min(rng.randint(1, n_valid), rng.randint(1, n_valid))
        for _ in range(moves):
            src = [s for s in range(self.S) if L[s] > 0]
            if not src:
                break
            i = rng.choice(src)
            dst = [s for s in range(self.S) if s != i and L[s] < self.max_level]
            if not dst:
                continue
            j = rng.choice(dst)
            m = rng.randint(1, max(1, min(max_levels, L[i], self.max_level - L[j])))
            L[i] -= m
            L[j] += m
        return self.repair(L, rng)


def evolve(space: LevelSpace, fitness: Callable[[tuple[int, ...]], float], *, patterns: Sequence[str],
           n_random: int, survivors: int, offspring: int, generations: int, max_levels: int, n_valid: int,
           seed: int, log: Callable[[dict], None] | None = None) -> dict:
    """Elitist evolution; returns best levels/fitness, the per-generation log and every evaluation."""
    rng = random.Random(seed)
    cache: dict[tuple[int, ...], float] = {}
    named: list[tuple[str, tuple[int, ...]]] = []  # the initial population (duplicates dropped)
    for k, name in enumerate(list(patterns) + ["random"] * int(n_random)):
        L = space.project(pattern_shape(name, space.S, rng))
        if all(L != M for _, M in named):
            named.append((name if name != "random" else f"random{k - len(patterns)}", L))
    pool = [L for _, L in named]
    history = []
    t0 = time.perf_counter()
    for gen in range(generations + 1):
        new = [L for L in pool if L not in cache]
        for L in new:
            cache[L] = float(fitness(L))
        ranked = sorted(set(pool), key=lambda L: (-cache[L], L))
        keep = ranked[:survivors]
        vals = [cache[L] for L in pool]
        rec = {"gen": gen, "best_fitness": cache[keep[0]], "best_levels": list(keep[0]),
               "mean_fitness": sum(vals) / len(vals), "pool": len(pool), "new_evaluations": len(new),
               "evaluated": len(cache), "seconds": round(time.perf_counter() - t0, 3)}
        history.append(rec)
        if log is not None:
            log(rec)
        if gen == generations:
            break
        children, tries = [], 0
        while len(children) < offspring and tries < 50 * offspring:
            tries += 1
            child = space.mutate(rng.choice(keep), rng, max_levels, n_valid)
            if child in children or child in keep:
                continue
            if child in cache and tries < 25 * offspring:  # prefer unseen schedules while they can be found
                continue
            children.append(child)
        pool = keep + children
    best = history[-1]
    return {"levels": tuple(best["best_levels"]), "fitness": best["best_fitness"], "history": history,
            "initial": [{"pattern": name, "levels": list(L), "fitness": cache[L]} for name, L in named],
            "evaluations": [[list(L), v] for L, v in sorted(cache.items(), key=lambda kv: -kv[1])]}
