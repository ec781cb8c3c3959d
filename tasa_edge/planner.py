"""From an analysis to a bit plan: exact allocation of formats under a size budget.

Inter-layer (which blocks get more bits) and intra-layer (which tensors of a block get more
bits) allocation are the same problem here: one multiple-choice knapsack over every quantizable
tensor, solved exactly (``tasa_edge.allocate``), minimising the summed predicted loss.
"""

from __future__ import annotations

from .allocate import Allocation, Option, budget_from_bpw, bytes_range, pareto, solve
from .errors import TasaError
from .imatrix import imatrix_ref
from .model import ModelSource
from .plan import BitPlan, count_formats, model_block, plan_nbytes
from .results import Analysis

MODES = ("tasa", "ppl", "task")


def scores_for(an: Analysis, mode: str, lam: float | None = None) -> tuple[dict, float]:
    if mode not in MODES:
        raise TasaError(f"--mode must be one of {', '.join(MODES)}")
    lam_used = {"tasa": an.lam if lam is None else lam, "ppl": 0.0, "task": 1.0}[mode]
    if not 0.0 <= lam_used <= 1.0:
        raise TasaError(f"--lambda must be within [0, 1], got {lam_used}")
    return an.scores(lam_used), lam_used


def options_for(an: Analysis, scores: dict) -> dict[str, list[Option]]:
    return {
        name: [Option(f, int(an.table.bytes[name][f]), max(0.0, float(v))) for f, v in row.items()]
        for name, row in scores.items()
    }


def fixed_bytes(src: ModelSource) -> int:
    """Bytes of tensors outside the allocation (norms and other 1-D tensors, kept F32)."""
    return sum(4 * t.n_elements for t in src.tensors.values() if not t.quantizable)


def budget_bytes(src: ModelSource, *, bpw: float | None = None, nbytes: int | None = None) -> int:
    if (bpw is None) == (nbytes is None):
        raise TasaError("give exactly one budget: --bpw or --bytes")
    if bpw is not None:
        if bpw <= 0:
            raise TasaError(f"--bpw must be positive, got {bpw}")
        return budget_from_bpw(bpw, src.n_params, fixed_bytes(src))
    if nbytes <= 0:
        raise TasaError(f"--bytes must be positive, got {nbytes}")
    return int(nbytes) - fixed_bytes(src)


def make_plan(an: Analysis, src: ModelSource, *, bpw: float | None = None, nbytes: int | None = None,
              mode: str = "tasa", lam: float | None = None) -> BitPlan:
    if an.model["fingerprint"] != src.fingerprint:
        raise TasaError(f"analysis is for {an.model.get('name')} ({an.model['fingerprint']}), not {src.name} ({src.fingerprint})")
    scores, lam_used = scores_for(an, mode, lam)
    opts = options_for(an, scores)
    budget = budget_bytes(src, bpw=bpw, nbytes=nbytes)
    alloc = solve(opts, budget)
    return plan_from_allocation(an, src, alloc, scores, mode, lam_used, {"bpw": bpw} if bpw is not None else {"bytes": int(nbytes)})


def plan_from_allocation(an: Analysis, src: ModelSource, alloc: Allocation, scores: dict, mode: str,
                         lam: float, budget: dict) -> BitPlan:
    spec = an.target
    plan = BitPlan(
        spec.name,
        model_block(src),
        dict(alloc.choice),
        budget=budget,
        provenance={
            "method": f"{mode} ({'perplexity only' if mode == 'ppl' else 'reasoning only' if mode == 'task' else 'TASA aggregate'})",
            "lambda": lam,
            "normalisation": "each source divided by its total predicted loss at the reference format",
            "calibration": {**an.mixture.chosen.summary(), "beta": an.mixture.beta},
            "imatrix": an.imatrix_path if spec.uses_imatrix else None,
            "solver": alloc.solver,
            "optimal": alloc.optimal,
            "scores": {n: scores[n][f] for n, f in alloc.choice.items()},
        },
    )
    plan.imatrix = _scored_imatrix(an) if spec.uses_imatrix else None
    plan.imatrix_recorded = True
    plan.predicted["loss"] = alloc.loss
    plan.stamp(src)
    size = plan_nbytes(plan, src)
    if budget.get("bpw") is not None and size["bpw"] > budget["bpw"] + 1e-9:
        raise TasaError(f"internal: plan bpw {size['bpw']:.4f} exceeds budget {budget['bpw']}")
    return plan


def sweep(an: Analysis, src: ModelSource, *, mode: str = "tasa", lam: float | None = None, points: int = 12) -> list[dict]:
    """Pareto curve: file bytes -> minimal predicted loss, over the feasible budget range."""
    scores, lam_used = scores_for(an, mode, lam)
    opts = options_for(an, scores)
    lo, hi = bytes_range(opts)
    budgets = sorted({int(lo + (hi - lo) * i / max(1, points - 1)) for i in range(points)})
    fixed = fixed_bytes(src)
    out = []
    for a in pareto(opts, budgets):
        total = a.nbytes + fixed
        out.append({"budget_bytes": a.budget_bytes + fixed, "bytes": total, "bpw": 8.0 * total / src.n_params,
                    "loss": a.loss, "types": count_formats(a.choice.values())})
    return out


def _scored_imatrix(an: Analysis) -> dict | None:
    """The identity of the imatrix the analysis scored with (hashed now for analyses written
    before the hash was recorded)."""
    im = an.imatrix
    if im is None or im.get("sha256"):
        return im
    return imatrix_ref(im["path"])
