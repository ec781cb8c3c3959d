"""Exact bit allocation: pick one quantization format per tensor under a byte budget.

This is a multiple-choice knapsack problem.  Every tensor ``t`` has a list of
:class:`Option` s (format name, bytes as stored in the output file, predicted loss
increase).  :func:`solve` chooses exactly one option per tensor so that the summed
bytes fit in ``budget_bytes`` and the summed predicted loss is minimal.

Two exact solvers are available:

* ``"highs-milp"`` (the default, ``method="auto"``): a 0/1 integer programme solved by
  HiGHS through :func:`scipy.optimize.milp` with ``mip_rel_gap=0``.
* ``"dp"``: a dynamic programme over bytes (divided by their gcd) for small instances;
  it refuses, with a :class:`~tasa_edge.errors.TasaError`, when its table would be too
  large.

Optional ``groups`` (lists of tensor names) force several tensors to take the same
format, e.g. tied embeddings or the parts of a fused tensor.  A group is solved as one
item whose options are the formats common to all members (bytes and losses summed),
which keeps both solvers exact.

Before solving, options that are dominated (another option of the same tensor is no
larger and no worse) are dropped; this never changes the optimum.  The returned
solution is checked (one option per tensor, groups honoured, within budget) and its
bytes and loss are recomputed from the options, never taken from a solver objective.

:func:`pareto` solves a sweep of budgets (size -> predicted loss) and
:func:`budget_from_bpw` turns an average bits-per-weight target into a byte budget.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from functools import reduce
from typing import Iterable, Mapping, Sequence

import numpy as np

from tasa_edge.errors import TasaError

__all__ = ["Option", "Allocation", "Resource", "solve", "pareto", "budget_from_bpw", "bytes_range"]

#: Largest dynamic-programme table (items x capacity cells) :func:`solve` will build.
DP_MAX_CELLS = 50_000_000

# The MILP objective is rescaled so that the largest (offset-removed) coefficient is
# this value.  HiGHS stops at an absolute gap of 1e-6 (scipy cannot change that), so a
# large scale makes that gap negligible next to the losses that matter.
_MILP_OBJECTIVE_SCALE = 1e6
_MILP_MAX_RETRIES = 5
# Re-solve after pruning only if it shrinks the objective range by this factor or more.
_MILP_RESCALE_GAIN = 100.0
_MILP_MAX_ROUNDS = 4


@dataclass(frozen=True)
class Option:
    """One way to store a tensor.

    fmt:    format name (unique within one tensor's options), e.g. ``"Q4_K"``.
    nbytes: bytes the tensor takes in the output file in this format (integer >= 0).
    loss:   predicted loss increase when the tensor is stored in this format (finite,
            >= 0).
    """

    fmt: str
    nbytes: int
    loss: float


@dataclass
class Allocation:
    """The result of :func:`solve`.

    choice:       tensor name -> chosen format, in the order of the ``options`` mapping.
    nbytes:       total bytes of the chosen options (<= budget_bytes).
    loss:         total predicted loss of the chosen options (summed from the options).
    budget_bytes: the budget that was asked for.
    solver:       ``"highs-milp"`` or ``"dp"``.
    optimal:      True when the solver proved optimality (False only when a MILP time
                  limit was hit, or HiGHS' tolerances forced a slightly tightened budget).
    """

    choice: dict[str, str]
    nbytes: int
    loss: float
    budget_bytes: int
    solver: str
    optimal: bool
    #: resource name -> total of the chosen options (only with ``resources``)
    used: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Resource:
    """An extra linear constraint of the allocation: ``sum cost[tensor][fmt] <= limit`` over the
    chosen options (predicted decode or prefill time of a device profile).

    cost:  tensor name -> format -> cost (finite, >= 0); every option must have one.
    limit: the most the chosen options may add up to.
    """

    name: str
    cost: Mapping[str, Mapping[str, float]]
    limit: float


# --------------------------------------------------------------------------- helpers


@dataclass
class _Item:
    """A tensor, or a group of tensors that must share one format."""

    tensors: tuple[str, ...]
    fmts: list[str]  # Pareto-frontier options, bytes ascending / loss strictly descending
    nbytes: list[int]
    loss: list[float]


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise TasaError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TasaError(f"{what} must be an integer, got {value!r}") from None


def _validate(options: Mapping[str, Sequence[Option]]) -> dict[str, dict[str, tuple[int, float]]]:
    """Check the input; return tensor -> {fmt: (nbytes, loss)} preserving order."""
    if not isinstance(options, Mapping):
        raise TasaError("options must be a mapping of tensor name -> list of Option")
    table: dict[str, dict[str, tuple[int, float]]] = {}
    for name, opts in options.items():
        opts = list(opts)
        if not opts:
            raise TasaError(f"tensor {name!r} has no format options")
        per: dict[str, tuple[int, float]] = {}
        for o in opts:
            try:
                fmt, nb, loss = o.fmt, o.nbytes, o.loss
            except AttributeError:
                raise TasaError(f"tensor {name!r}: option {o!r} is not an Option") from None
            nb = _as_int(nb, f"tensor {name!r} format {fmt!r}: nbytes")
            if nb < 0:
                raise TasaError(f"tensor {name!r} format {fmt!r}: negative nbytes {nb}")
            try:
                loss = float(loss)
            except (TypeError, ValueError):
                raise TasaError(f"tensor {name!r} format {fmt!r}: loss {loss!r} is not a number") from None
            if not math.isfinite(loss):
                raise TasaError(f"tensor {name!r} format {fmt!r}: loss is {loss} (must be finite)")
            if loss < 0:
                raise TasaError(f"tensor {name!r} format {fmt!r}: negative predicted loss {loss!r}")
            if fmt in per:
                raise TasaError(f"tensor {name!r} lists format {fmt!r} more than once")
            per[fmt] = (nb, loss)
        table[name] = per
    return table


def _merge_groups(table, groups) -> list[tuple[str, ...]]:
    """Union-find over ``groups``; return the components (every tensor appears once)."""
    parent = {name: name for name in table}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in groups or ():
        if isinstance(group, str):
            raise TasaError(f"groups must be lists of tensor names, got the string {group!r}")
        members = list(group)
        for m in members:
            if m not in parent:
                raise TasaError(f"group {members!r} names tensor {m!r}, which has no options")
        for m in members[1:]:
            ra, rb = find(members[0]), find(m)
            if ra != rb:
                parent[rb] = ra
    comps: dict[str, list[str]] = {}
    for name in table:  # keeps the options order
        comps.setdefault(find(name), []).append(name)
    return [tuple(c) for c in comps.values()]


def _build_items(table, groups) -> list[_Item]:
    items = []
    for tensors in _merge_groups(table, groups):
        first = table[tensors[0]]
        common = [f for f in first if all(f in table[t] for t in tensors[1:])]
        if not common:
            raise TasaError(f"tensors {list(tensors)!r} must share a format but have none in common")
        cand = []
        for idx, f in enumerate(common):
            nb = sum(table[t][f][0] for t in tensors)
            loss = math.fsum(table[t][f][1] for t in tensors)
            cand.append((nb, loss, idx, f))
        # Drop dominated options: keep a strictly improving loss as bytes grow.
        cand.sort()
        fmts, nbs, losses = [], [], []
        for nb, loss, _, f in cand:
            if not losses or loss < losses[-1]:
                fmts.append(f)
                nbs.append(nb)
                losses.append(loss)
        items.append(_Item(tensors, fmts, nbs, losses))
    return items


def _finish(table, items, picks, budget, solver, optimal) -> Allocation:
    """Turn per-item picks into an Allocation, verifying it against the raw options."""
    by_tensor: dict[str, str] = {}
    for item, k in zip(items, picks):
        for t in item.tensors:
            by_tensor[t] = item.fmts[k]
    choice = {t: by_tensor[t] for t in table}  # options order; KeyError = bug
    for t, f in choice.items():
        if f not in table[t]:
            raise AssertionError(f"allocation picked unknown format {f!r} for {t!r}")
    for item in items:
        if len({choice[t] for t in item.tensors}) != 1:
            raise AssertionError(f"allocation broke group {item.tensors!r}")
    nbytes = sum(table[t][f][0] for t, f in choice.items())
    loss = math.fsum(table[t][f][1] for t, f in choice.items())
    if nbytes > budget:
        raise AssertionError(f"allocation uses {nbytes} bytes, over the budget of {budget}")
    return Allocation(choice, nbytes, loss, budget, solver, optimal)


def _infeasible(budget: int, min_bytes: int) -> TasaError:
    return TasaError(
        f"budget of {budget} bytes is infeasible: the smallest achievable size is "
        f"{min_bytes} bytes ({min_bytes - budget} bytes over)"
    )


# --------------------------------------------------------------------------- solvers


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send whatever native code writes to file descriptor 1 to descriptor 2 meanwhile."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield  # no usable descriptor 1 (embedded interpreter): nothing to redirect
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve_dp(items: list[_Item], budget: int) -> list[int]:
    """Exact DP over (excess) bytes / gcd.  Returns the chosen option index per item."""
    base = sum(it.nbytes[0] for it in items)
    excess = [[nb - it.nbytes[0] for nb in it.nbytes] for it in items]
    g = reduce(math.gcd, (w for ws in excess for w in ws), 0)
    if g == 0:  # every item has a single option
        return [0] * len(items)
    cap = (budget - base) // g
    cap = min(cap, sum(ws[-1] for ws in excess) // g)  # more room than that is useless
    multi = [i for i, ws in enumerate(excess) if len(ws) > 1]
    cells = len(multi) * (cap + 1)
    if cells > DP_MAX_CELLS:
        raise TasaError(
            f"dp solver refused: its table would have {cells:,} cells "
            f"({len(multi)} tensors x {cap + 1:,} byte steps of {g} bytes), over the "
            f"{DP_MAX_CELLS:,} limit; use method='highs-milp'"
        )
    picks = [0] * len(items)
    # best[c] = least excess loss with at most c units of excess bytes.
    best = np.zeros(cap + 1)
    kmax = max(len(excess[i]) for i in multi)
    arg = np.zeros((len(multi), cap + 1), dtype=np.int8 if kmax < 127 else np.int32)
    for row, i in enumerate(multi):
        w = [x // g for x in excess[i]]
        # Losses in excess of the item's least loss: sums of non-negative terms, so no
        # cancellation when one tensor's losses dwarf another's.
        lmin = items[i].loss[-1]
        new = best + (items[i].loss[0] - lmin)  # option 0 has zero excess bytes
        choice = arg[row]
        for k in range(1, len(w)):
            wk = w[k]
            if wk > cap:
                break  # bytes ascend along the frontier
            cand = best[: cap + 1 - wk] + (items[i].loss[k] - lmin)
            better = cand < new[wk:]
            new[wk:][better] = cand[better]
            choice[wk:][better] = k
        best = new
    c = cap
    for row in range(len(multi) - 1, -1, -1):
        i = multi[row]
        k = int(arg[row, c])
        picks[i] = k
        c -= excess[i][k] // g
    return picks


def _milp_round(items: list[_Item], first: list[int], budget: int, time_limit) -> tuple[list[int], bool]:
    """One HiGHS solve over options ``first[i]:`` of each item.  Returns (picks, optimal)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    picks = list(first)
    multi = [i for i, it in enumerate(items) if len(it.fmts) - first[i] > 1]
    if not multi:
        return picks, True
    base = sum(it.nbytes[first[i]] for i, it in enumerate(items))
    col_item, col_k, excess_b, excess_l = [], [], [], []
    for row, i in enumerate(multi):
        it = items[i]
        for k in range(first[i], len(it.fmts)):
            col_item.append(row)
            col_k.append(k)
            excess_b.append(it.nbytes[k] - it.nbytes[first[i]])
            excess_l.append(it.loss[k] - it.loss[-1])  # >= 0; the per-item offset is constant
    g = reduce(math.gcd, excess_b, 0) or 1
    w = np.array([b // g for b in excess_b], dtype=np.float64)
    lmax = max(excess_l)
    c = np.array(excess_l) * (_MILP_OBJECTIVE_SCALE / lmax if lmax > 0 else 1.0)
    n, m = len(c), len(multi)
    col_item_a = np.array(col_item)
    a = csr_matrix(
        (
            np.concatenate([np.ones(n), w]),
            (np.concatenate([col_item_a, np.full(n, m)]), np.concatenate([np.arange(n), np.arange(n)])),
        ),
        shape=(m + 1, n),
    )
    opts = {"mip_rel_gap": 0.0, "presolve": True, "disp": False}
    if time_limit is not None:
        opts["time_limit"] = float(time_limit)
    starts = np.searchsorted(col_item_a, np.arange(m))
    sizes = np.diff(np.append(starts, n))

    cap = (budget - base) // g
    optimal = True
    for _ in range(_MILP_MAX_RETRIES):
        if cap < 0:
            break
        with _stdout_to_stderr():  # HiGHS' C++ code may print past disp=False; stdout is for results
            res = milp(
                c,
                integrality=np.ones(n),
                bounds=Bounds(0, 1),
                constraints=LinearConstraint(a, np.append(np.ones(m), -np.inf), np.append(np.ones(m), float(cap))),
                options=opts,
            )
        if res.x is None:
            if res.status == 1:
                raise TasaError(f"highs-milp found no solution within the time limit ({time_limit} s)")
            raise TasaError(f"highs-milp failed: {res.message}")
        if res.status != 0:
            optimal = False  # time / node limit: best solution found so far
        used = 0
        for row, i in enumerate(multi):
            j = starts[row] + int(np.argmax(res.x[starts[row] : starts[row] + sizes[row]]))
            picks[i] = col_k[j]
            used += excess_b[j] // g
        over = used - cap
        if over <= 0:
            return picks, optimal
        # HiGHS accepted a within-tolerance point that rounds over budget: tighten, retry.
        cap -= over
        optimal = False
    raise TasaError("highs-milp could not return a solution within the budget (numerical trouble)")


def _solve_milp(items: list[_Item], budget: int, time_limit) -> tuple[list[int], bool]:
    """Exact MILP with loss-bound pruning so that tiny losses are not lost to tolerances.

    HiGHS works to absolute tolerances (1e-6 gap, 1e-7 feasibility) on the scaled
    objective, so when one tensor's losses dwarf the rest, the small ones blur.  After a
    solve with true excess loss ``v`` (loss above every tensor's own minimum), no better
    solution can use an option whose own excess exceeds ``v``; those options are dropped
    (exact), the objective is rescaled to the remaining range and the MILP re-solved.
    """
    excess = [[l - it.loss[-1] for l in it.loss] for it in items]
    first = [0] * len(items)
    deadline = None if time_limit is None else time.monotonic() + float(time_limit)
    best_picks, best_v, optimal = None, math.inf, True
    for _ in range(_MILP_MAX_ROUNDS):
        left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
        picks, opt = _milp_round(items, first, budget, left)
        optimal = optimal and opt
        v = math.fsum(excess[i][k] for i, k in enumerate(picks))
        if v < best_v:
            best_picks, best_v = picks, v
        if not opt or best_v == 0:
            break
        old_lmax = max(excess[i][f] for i, f in enumerate(first))
        new_first = [next(k for k, e in enumerate(ex) if e <= best_v) for ex in excess]
        new_lmax = max(excess[i][f] for i, f in enumerate(new_first))
        if new_lmax * _MILP_RESCALE_GAIN > old_lmax:
            break  # the objective range would barely shrink: precision is already fine
        first = new_first
    return best_picks, optimal


# --------------------------------------------------------------------------- public API


def bytes_range(options: Mapping[str, Sequence[Option]], *, groups=None) -> tuple[int, int]:
    """Return ``(smallest achievable bytes, bytes of the least-loss choice)``.

    Budgets below the first value are infeasible; budgets at or above the second give
    the least possible loss, so a :func:`pareto` sweep only needs budgets in between.
    """
    items = _build_items(_validate(options), groups)
    return sum(it.nbytes[0] for it in items), sum(it.nbytes[-1] for it in items)


def solve(
    options: Mapping[str, Sequence[Option]],
    budget_bytes: int,
    *,
    groups: Iterable[Sequence[str]] | None = None,
    method: str = "auto",
    time_limit: float | None = None,
    resources: Sequence[Resource] = (),
) -> Allocation:
    """Choose one option per tensor minimising total predicted loss within ``budget_bytes``.

    options:      tensor name -> its options (format names unique per tensor).
    budget_bytes: the most bytes the chosen options may add up to.
    groups:       optional lists of tensor names that must all take the same format.
    method:       ``"auto"`` (= ``"highs-milp"``), ``"highs-milp"`` or ``"dp"``.
    time_limit:   seconds for the MILP solver (ignored by ``"dp"``); when it runs out the
                  best solution found is returned with ``optimal=False``.
    resources:    extra constraints (:class:`Resource`: predicted decode / prefill time), rows
                  of the same exact MILP; ``Allocation.used`` reports their totals.

    Raises :class:`TasaError` on bad input, on an infeasible budget (the message states
    the smallest achievable size), or when the DP table would be too large.
    """
    if method not in ("auto", "highs-milp", "dp"):
        raise TasaError(f"unknown allocation method {method!r} (use 'auto', 'highs-milp' or 'dp')")
    budget = _as_int(budget_bytes, "budget_bytes")
    if time_limit is not None and not (float(time_limit) > 0):
        raise TasaError(f"time_limit must be positive, got {time_limit!r}")
    table = _validate(options)
    if resources:
        if method == "dp":
            raise TasaError("the dp solver takes no resource constraints; use method='highs-milp'")
        return _solve_with_resources(table, groups, budget, list(resources), time_limit)
    items = _build_items(table, groups)
    solver = "dp" if method == "dp" else "highs-milp"

    min_bytes = sum(it.nbytes[0] for it in items)
    if min_bytes > budget:
        raise _infeasible(budget, min_bytes)
    if sum(it.nbytes[-1] for it in items) <= budget:
        # Every item can take its least-loss option: trivially optimal.
        return _finish(table, items, [len(it.fmts) - 1 for it in items], budget, solver, True)

    if solver == "dp":
        picks, optimal = _solve_dp(items, budget), True
    else:
        picks, optimal = _solve_milp(items, budget, time_limit)
    return _finish(table, items, picks, budget, solver, optimal)


def _resource_table(table, resources) -> list[dict[str, dict[str, float]]]:
    out = []
    for r in resources:
        if not isinstance(r, Resource):
            raise TasaError(f"resources must be Resource objects, got {r!r}")
        lim = float(r.limit)
        if not math.isfinite(lim) or lim < 0:
            raise TasaError(f"{r.name}: limit must be a finite number >= 0, got {r.limit!r}")
        per = {}
        for t, opts in table.items():
            row = r.cost.get(t)
            if row is None:
                raise TasaError(f"{r.name}: no cost for tensor {t!r}")
            per[t] = {}
            for f in opts:
                if f not in row:
                    raise TasaError(f"{r.name}: no cost for tensor {t!r} in format {f!r}")
                c = float(row[f])
                if not math.isfinite(c) or c < 0:
                    raise TasaError(f"{r.name}: cost of {t!r} in {f!r} is {c} (must be finite, >= 0)")
                per[t][f] = c
        out.append(per)
    return out


def _solve_with_resources(table, groups, budget: int, resources, time_limit) -> Allocation:
    """Exact MILP with the byte row and one row per resource (no 2-D dominance pruning: an option
    is dropped only when another is no larger, no worse and no costlier in every resource)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    costs = _resource_table(table, resources)
    items, cvec = [], []
    for tensors in _merge_groups(table, groups):
        common = [f for f in table[tensors[0]] if all(f in table[t] for t in tensors[1:])]
        if not common:
            raise TasaError(f"tensors {list(tensors)!r} must share a format but have none in common")
        cand = []
        for f in common:
            vec = (sum(table[t][f][0] for t in tensors), math.fsum(table[t][f][1] for t in tensors),
                   *(math.fsum(c[t][f] for t in tensors) for c in costs))
            cand.append((vec, f))
        keep = []
        for i, (v, f) in enumerate(cand):
            dominated = any(all(a <= b for a, b in zip(w, v)) and (w != v or j < i) for j, (w, _) in enumerate(cand) if j != i)
            if not dominated:
                keep.append((v, f))
        keep.sort(key=lambda x: (x[0][0], -x[0][1]))
        items.append(_Item(tensors, [f for _, f in keep], [v[0] for v, _ in keep], [v[1] for v, _ in keep]))
        cvec.append([v[2:] for v, _ in keep])
    min_bytes = sum(min(it.nbytes) for it in items)
    if min_bytes > budget:
        raise _infeasible(budget, min_bytes)
    for j, r in enumerate(resources):
        least = math.fsum(min(cv[j] for cv in cs) for cs in cvec)
        if least > r.limit:
            raise TasaError(f"{r.name} limit {r.limit:.6g} is infeasible: the least possible is {least:.6g}")
    # columns
    col_item, col_k, b_ex, l_ex, c_ex = [], [], [], [], [[] for _ in resources]
    bmin = [min(it.nbytes) for it in items]
    lmin = [min(it.loss) for it in items]
    cmin = [[min(cv[j] for cv in cs) for j in range(len(resources))] for cs in cvec]
    for i, it in enumerate(items):
        for k in range(len(it.fmts)):
            col_item.append(i)
            col_k.append(k)
            b_ex.append(it.nbytes[k] - bmin[i])
            l_ex.append(it.loss[k] - lmin[i])
            for j in range(len(resources)):
                c_ex[j].append(cvec[i][k][j] - cmin[i][j])
    n, m = len(col_item), len(items)
    g = reduce(math.gcd, b_ex, 0) or 1
    lmax = max(l_ex) if l_ex else 0.0
    obj = np.array(l_ex) * (_MILP_OBJECTIVE_SCALE / lmax if lmax > 0 else 1.0)
    cap_b = float((budget - sum(bmin)) // g)
    caps = [float(r.limit) - math.fsum(cmin[i][j] for i in range(m)) for j, r in enumerate(resources)]
    rows_data = [np.ones(n), np.array(b_ex, dtype=np.float64) / g]
    scale = []
    for j in range(len(resources)):
        s_j = caps[j] if caps[j] > 0 else 1.0
        scale.append(s_j)
        rows_data.append(np.array(c_ex[j]) / s_j)
    ci = np.array(col_item)
    row_idx = np.concatenate([ci, np.full(n, m)] + [np.full(n, m + 1 + j) for j in range(len(resources))])
    a = csr_matrix((np.concatenate(rows_data), (row_idx, np.tile(np.arange(n), len(rows_data)))),
                   shape=(m + 1 + len(resources), n))
    opts = {"mip_rel_gap": 0.0, "presolve": True, "disp": False}
    if time_limit is not None:
        opts["time_limit"] = float(time_limit)
    starts = np.searchsorted(ci, np.arange(m))
    sizes = np.diff(np.append(starts, n))
    ub = [cap_b] + [caps[j] / scale[j] for j in range(len(resources))]
    optimal = True
    for _ in range(_MILP_MAX_RETRIES):
        with _stdout_to_stderr():
            res = milp(obj, integrality=np.ones(n), bounds=Bounds(0, 1),
                       constraints=LinearConstraint(a, np.append(np.ones(m), np.full(1 + len(resources), -np.inf)),
                                                    np.append(np.ones(m), ub)), options=opts)
        if res.x is None:
            if res.status == 1:
                raise TasaError(f"highs-milp found no solution within the time limit ({time_limit} s)")
            if res.status == 2:
                raise TasaError("no plan meets the byte budget and the " + " and ".join(r.name for r in resources)
                                + " limits together (each is feasible alone): relax one")
            raise TasaError(f"highs-milp failed: {res.message}")
        if res.status != 0:
            optimal = False
        picks = [int(np.argmax(res.x[starts[i]: starts[i] + sizes[i]])) for i in range(m)]
        used_b = sum(items[i].nbytes[k] for i, k in enumerate(picks))
        used_c = [math.fsum(cvec[i][k][j] for i, k in enumerate(picks)) for j in range(len(resources))]
        over = []
        if used_b > budget:
            ub[0] -= math.ceil((used_b - budget) / g)
            over.append(0)
        for j, r in enumerate(resources):
            if used_c[j] > r.limit:
                ub[1 + j] -= (used_c[j] - r.limit) / scale[j] * 1.01 + 1e-9
                over.append(1 + j)
        if not over:
            alloc = _finish(table, items, picks, budget, "highs-milp", optimal)
            alloc.used = {r.name: used_c[j] for j, r in enumerate(resources)}
            return alloc
        optimal = False    # HiGHS accepted a within-tolerance point over a limit: tighten, retry
    raise TasaError("highs-milp could not return a solution within the limits (numerical trouble)")


def pareto(options: Mapping[str, Sequence[Option]], budgets: Sequence[int], **kw) -> list[Allocation]:
    """Solve every budget in ``budgets`` (keyword arguments go to :func:`solve`).

    Returns one :class:`Allocation` per budget, in the order given; with exact solves the
    loss never increases as the budget grows.  Any infeasible budget raises TasaError
    (see :func:`bytes_range` for the useful range).
    """
    return [solve(options, b, **kw) for b in budgets]


def budget_from_bpw(bpw: float, n_weights: int, fixed_bytes: int = 0) -> int:
    """Byte budget for the allocated tensors from an average bits-per-weight target.

    The whole model (``n_weights`` weights, counting the tensors outside the allocation
    too) may take ``floor(bpw * n_weights / 8)`` bytes; ``fixed_bytes`` (tensors not in the
    allocation) are subtracted from that.  ``bpw`` is read as the decimal it prints as, so
    ``4.1`` means exactly 41/10.  Raises TasaError when the result would be negative.
    """
    try:
        bpw_f = float(bpw)
    except (TypeError, ValueError):
        raise TasaError(f"bits per weight must be a number, got {bpw!r}") from None
    if not (math.isfinite(bpw_f) and bpw_f > 0):
        raise TasaError(f"bits per weight must be a positive number, got {bpw!r}")
    n = _as_int(n_weights, "n_weights")
    fixed = _as_int(fixed_bytes, "fixed_bytes")
    if n <= 0:
        raise TasaError(f"n_weights must be positive, got {n}")
    if fixed < 0:
        raise TasaError(f"fixed_bytes must be >= 0, got {fixed}")
    total = math.floor(Fraction(repr(bpw_f)) * n / 8)
    budget = total - fixed
    if budget < 0:
        raise TasaError(
            f"{bpw_f} bits/weight over {n} weights allows {total} bytes, less than the "
            f"{fixed} bytes of tensors outside the allocation"
        )
    return budget
