"""From an analysis to a bit plan: exact allocation of formats under a size budget.

Inter-layer (which blocks get more bits) and intra-layer (which tensors of a block get more
bits) allocation are the same problem here: one multiple-choice knapsack over every quantizable
tensor, solved exactly (``tasa_edge.allocate``), minimising the summed predicted loss.

Pins (``plan --tensor-type PATTERN=TYPE``, ``--output-tensor-type``, ``--token-embedding-type``)
are constraints of that same problem: a pinned tensor's option set is reduced to its one pinned
format, so the solver stays exact over the remaining tensors (see :class:`Pins`, :func:`apply_pins`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from . import formats
from .allocate import Allocation, Option, Resource, budget_from_bpw, bytes_range, solve
from .costmodel import KernelProfile, kv_cache_bytes
from .errors import TasaError
from .imatrix import imatrix_ref
from .jsonio import safe_regex
from .model import ModelSource
from .plan import BitPlan, count_formats, model_block, plan_nbytes
from .results import Analysis

MODES = ("tasa", "ppl", "task")


# ---------------------------------------------------------------------------- pins
TOKEN_EMBD = ("token_embd.weight", "per_layer_token_embd.weight")   # llama.cpp's TOKEN_EMBD category
OUTPUT = "output.weight"                                             # llama.cpp's OUTPUT category


@dataclass(frozen=True)
class Pins:
    """Formats fixed by the user, with llama-quantize's semantics (``tools/quantize/quantize.cpp``
    and ``src/llama-quant.cpp`` of the vendored llama.cpp):

    * ``tensor_types``: ``(pattern, type)`` pairs of ``--tensor-type PATTERN=TYPE``, in the order
      given. A pattern is lower-cased (as quantize.cpp does) and *searched* in the tensor name
      (``std::regex_search``: ``attn_v`` pins every ``blk.N.attn_v.weight``); the **first**
      matching pattern wins.
    * ``token_embd``: ``--token-embedding-type``: ``token_embd.weight`` (and
      ``per_layer_token_embd.weight`` unless a ``--tensor-type`` pattern names it); it wins over
      ``--tensor-type``, as in llama.cpp.
    * ``output``: ``--output-tensor-type``: ``output.weight``, winning over ``--tensor-type``. On a
      model with tied embeddings (no ``output.weight``: the LM head is ``token_embd.weight``)
      llama.cpp gives ``token_embd.weight`` the output type unless ``--token-embedding-type`` or a
      ``--tensor-type`` pattern already names it; so does the planner.

    Unlike llama-quantize, a pin never falls back silently: a type that does not fit the tensor's
    shape, a pattern or flag that pins no tensor, is a one-line error.
    """

    tensor_types: tuple[tuple[str, str], ...] = ()
    output: str | None = None
    token_embd: str | None = None

    def __bool__(self) -> bool:
        return bool(self.tensor_types) or self.output is not None or self.token_embd is not None

    @classmethod
    def from_cli(cls, tensor_types=(), output: str | None = None, token_embd: str | None = None) -> "Pins":
        """``PATTERN=TYPE`` strings (split at the first ``=``, as quantize.cpp) and the two flags."""
        pairs = []
        for arg in tensor_types or ():
            pat, sep, typ = arg.partition("=")
            if not sep:
                raise TasaError(f"--tensor-type {arg!r}: expected PATTERN=TYPE")
            if not pat:
                raise TasaError(f"--tensor-type {arg!r}: missing tensor name pattern")
            if not typ.strip():
                raise TasaError(f"--tensor-type {arg!r}: missing quantization type")
            pairs.append((pat.lower(), typ.strip()))
        return cls(tuple(pairs), output, token_embd)

    def to_dict(self, spec: formats.Target) -> dict:
        """The pins as given, type names canonical (``q8_0`` -> ``Q8_0``)."""
        def canon(t):
            return None if t is None else spec.parse(t)

        return {"tensor_type": [[p, canon(t)] for p, t in self.tensor_types], "output_tensor_type": canon(self.output),
                "token_embedding_type": canon(self.token_embd)}


def resolve_pins(pins: Pins, src: ModelSource, spec: formats.Target) -> dict[str, str]:
    """Tensor name -> pinned format (canonical name) for ``src``'s quantizable tensors.

    One-line TasaError for an unknown type, a bad regex, a type that does not fit a pinned
    tensor's shape, a pattern or flag that pins no tensor."""
    names = [t.name for t in src.quantizable]
    rules = []
    for pat, typ in pins.tensor_types:
        try:
            rx = safe_regex(pat, f"--tensor-type {pat}={typ}")
        except re.error as exc:
            raise TasaError(f"--tensor-type {pat}={typ}: bad regex {pat!r}: {exc}") from None
        rules.append((pat, rx, spec.parse(typ)))
    out: dict[str, str] = {}
    why: dict[str, str] = {}
    took = [0] * len(rules)
    for name in names:
        for i, (pat, rx, fmt) in enumerate(rules):
            if rx.search(name):
                out[name], why[name] = fmt, f"--tensor-type {pat}={fmt}"
                took[i] += 1
                break
    for i, (pat, rx, fmt) in enumerate(rules):
        if not took[i]:
            if any(rx.search(n) for n in names):
                raise TasaError(f"--tensor-type {pat}={fmt} pins no tensor: every tensor it matches is "
                                "taken by an earlier --tensor-type (the first match wins)")
            raise TasaError(f"--tensor-type {pat}={fmt}: the pattern matches no quantizable tensor of {src.name} "
                            f"(e.g. {names[1 if len(names) > 1 else 0]})")
    if pins.token_embd is not None:
        fmt = spec.parse(pins.token_embd)
        hit = [n for n in TOKEN_EMBD if n in src.tensors and src.tensors[n].quantizable]
        if not hit:
            raise TasaError(f"--token-embedding-type: {src.name} has no quantizable token_embd.weight")
        for n in hit:
            if n == "per_layer_token_embd.weight" and n in out:
                continue      # llama.cpp: an explicit --tensor-type names this large table
            out[n], why[n] = fmt, f"--token-embedding-type {fmt}"
    if pins.output is not None:
        fmt = spec.parse(pins.output)
        if OUTPUT in src.tensors and src.tensors[OUTPUT].quantizable:
            out[OUTPUT], why[OUTPUT] = fmt, f"--output-tensor-type {fmt}"
        elif "token_embd.weight" in src.tensors and "token_embd.weight" not in out:
            # tied embeddings: the LM head is token_embd.weight (llama.cpp's has_tied_embeddings rule)
            out["token_embd.weight"] = fmt
            why["token_embd.weight"] = f"--output-tensor-type {fmt} (tied embeddings: the output layer is token_embd.weight)"
        elif "token_embd.weight" in src.tensors:
            raise TasaError(f"--output-tensor-type {fmt} pins no tensor: {src.name} ties its output layer to "
                            f"token_embd.weight, already pinned by {why['token_embd.weight']}")
        else:
            raise TasaError(f"--output-tensor-type: {src.name} has no output.weight")
    for n, fmt in out.items():
        bad = spec.misfit(fmt, src.tensors[n].shape)
        if bad is not None:
            raise TasaError(f"{why[n]}: tensor {n}: {bad}")
    return out


def apply_pins(opts: dict[str, list[Option]], pinned: dict[str, str], src: ModelSource,
               spec: formats.Target) -> list[str]:
    """Reduce each pinned tensor's options to its pinned format, in place; return the pinned
    tensors whose format the analysis did not score.

    Decision: a pinned format outside the analysed menu is **allowed**. Its bytes are exact (from
    the format registry), and its loss enters the objective as 0: a pinned tensor has a single
    option, so its loss is a constant of the objective and the allocation of every other tensor
    is the same whatever value it takes -- the solve stays exact. Only the reported total is then
    incomplete: the plan lists such tensors as ``provenance.pins.unscored`` (their loss not
    predicted, not included in ``predicted.loss``). Refusing instead would forbid the common
    case of pinning the output layer to a type (F16, Q8_0) the menu left out."""
    unscored = []
    for n, fmt in pinned.items():
        keep = [o for o in opts[n] if o.fmt == fmt]
        if not keep:
            keep = [Option(fmt, int(spec.tensor_nbytes(fmt, src.tensors[n])), 0.0)]
            unscored.append(n)
        opts[n] = keep
    return unscored


def _pinned_options(an: Analysis, src: ModelSource, scores: dict, pins: Pins | None):
    opts = options_for(an, scores)
    if not pins:
        return opts, {}, []
    spec = an.target
    pinned = resolve_pins(pins, src, spec)
    if spec.uses_imatrix and an.imatrix is None:
        need = [n for n, f in pinned.items() if spec.requires_imatrix(f)]
        if need:
            raise TasaError(f"pinned type {pinned[need[0]]} of {need[0]} requires an importance matrix, "
                            "and the analysis was scored without one")
    return opts, pinned, apply_pins(opts, pinned, src, spec)


def _check_pinned_budget(opts, budget: int, src: ModelSource, pinned: dict) -> None:
    if not pinned:
        return
    lo, _ = bytes_range(opts)
    if lo > budget:
        fixed = fixed_bytes(src)
        raise TasaError(f"budget infeasible with the pins: the smallest plan with {len(pinned)} pinned tensor(s) "
                        f"is {lo + fixed:,} bytes ({8.0 * (lo + fixed) / src.n_params:.3f} bits/weight), "
                        f"the budget {budget + fixed:,} bytes")


# ---------------------------------------------------------------------------- device limits
@dataclass(frozen=True)
class DeviceLimits:
    """A measured device profile (``tasa-edge profile``) and the limits of ``plan --profile``:
    predicted decode ms/token (``--max-decode-ms`` / ``--min-tg``), predicted prefill ms for the
    profile's ``pp`` tokens (``--max-prefill-ms``), and ``--fit-ram`` (the file must fit the
    device's usable RAM less the KV cache for ``ctx`` tokens and ``ram_overhead`` bytes). All are
    rows of the same exact MILP; with none set the plan only records its predicted times.

    ``near`` (tensor -> format of a reference file, e.g. a llama.cpp mix measured on the device) with
    ``max_changes``: at most that many tensors may take another format than the reference's -- a
    trust region where the profile's prediction errors are mostly the reference's own, which a
    measurement of the reference has already taken out."""

    profile: KernelProfile
    max_decode_ms: float | None = None
    max_prefill_ms: float | None = None
    fit_ram: bool = False
    ctx: int = 4096
    ram_overhead: int = 256 * 2**20
    near: Mapping[str, str] | None = None
    max_changes: int | None = None

    def ram_budget(self, src: ModelSource) -> dict:
        """{"usable", "kv_cache", "overhead", "file"}: bytes the file may take under --fit-ram."""
        usable = self.profile.usable_ram_bytes
        if not usable:
            raise TasaError(f"--fit-ram: profile {self.profile.where} records no usable RAM")
        if self.ctx <= 0:
            raise TasaError(f"--ctx must be positive, got {self.ctx}")
        if self.ram_overhead < 0:
            raise TasaError("--ram-overhead must be >= 0")
        kv = kv_cache_bytes(src, self.ctx)
        file = usable - kv - self.ram_overhead
        if file <= fixed_bytes(src):
            raise TasaError(f"--fit-ram: usable RAM {usable / 2**20:.0f} MiB less the KV cache for --ctx {self.ctx} "
                            f"({kv / 2**20:.0f} MiB) and the runtime overhead ({self.ram_overhead / 2**20:.0f} MiB) "
                            f"leaves {max(file, 0) / 2**20:.0f} MiB: no room for {src.name}")
        return {"usable": usable, "kv_cache": kv, "overhead": self.ram_overhead, "ctx": self.ctx, "file": file}

    def resources(self, src: ModelSource, opts: dict[str, list[Option]]) -> list[Resource]:
        out = []
        dec = {n: {o.fmt: self.profile.tensor_costs(src, n, o.fmt)[0] for o in os_} for n, os_ in opts.items()}
        pre = {n: {o.fmt: self.profile.tensor_costs(src, n, o.fmt)[1] for o in os_} for n, os_ in opts.items()}
        if self.max_decode_ms is not None:
            if not self.max_decode_ms > 0:
                raise TasaError(f"--max-decode-ms must be positive, got {self.max_decode_ms}")
            out.append(Resource("predicted decode ms/token", dec, float(self.max_decode_ms)))
        if self.max_prefill_ms is not None:
            if not self.max_prefill_ms > 0:
                raise TasaError(f"--max-prefill-ms must be positive, got {self.max_prefill_ms}")
            out.append(Resource(f"predicted prefill ms ({self.profile.pp} tokens)", pre, float(self.max_prefill_ms)))
        if self.max_changes is not None:
            if self.near is None or self.max_changes < 0:
                raise TasaError("max_changes needs a reference plan (near) and must be >= 0")
            moved = {n: {o.fmt: 0.0 if self.near.get(n) == o.fmt else 1.0 for o in os_} for n, os_ in opts.items()}
            out.append(Resource("tensors in another format than the reference", moved, float(self.max_changes)))
        return out

    def restrict(self, opts: dict[str, list[Option]], spec: formats.Target) -> list[str]:
        """Drop the options whose format the profile did not measure; return the dropped formats."""
        if self.profile.target != spec.name:
            raise TasaError(f"profile {self.profile.where} measured {self.profile.target} kernels, the analysis is for "
                            f"{spec.name} (tasa-edge profile --format {spec.name})")
        dropped = set()
        for n, os_ in opts.items():
            keep = [o for o in os_ if o.fmt in self.profile.costs]
            dropped |= {o.fmt for o in os_} - {o.fmt for o in keep}
            if not keep:
                raise TasaError(f"tensor {n}: none of its formats ({', '.join(o.fmt for o in os_)}) has a measured "
                                f"kernel cost in {self.profile.where}")
            opts[n] = keep
        return sorted(dropped)

    def record(self, plan: BitPlan, src: ModelSource, dropped: list[str], ram: dict | None) -> None:
        p = self.profile.predict(src, plan.tensors)
        plan.predicted.update({"decode_ms": p.decode_ms, "prefill_ms": p.prefill_ms, "prefill_tokens": p.pp})
        if p.decode_ms > 0 and p.prefill_ms > 0:      # (a profile whose costs are all 0 predicts no speed)
            plan.predicted.update({"tg_ts": p.tg_ts, "pp_ts": p.pp_ts})
        m = self.profile.measured
        plan.provenance["device_profile"] = {
            "path": self.profile.path, "name": self.profile.name, "machine": dict(self.profile.machine),
            "threads": m.get("threads"), "stat": m.get("stat"), "pp": m.get("pp"), "tg": m.get("tg"),
            "limits": {"max_decode_ms": self.max_decode_ms, "max_prefill_ms": self.max_prefill_ms,
                       "fit_ram": ram, **({"max_changes_from_reference": self.max_changes}
                                          if self.max_changes is not None else {})},
            "formats_not_measured": dropped,
        }


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


def _device_budget(device: DeviceLimits | None, src: ModelSource, bpw, nbytes) -> tuple[int, dict | None, dict]:
    """(tensor byte budget, the --fit-ram accounting or None, the plan's budget block)."""
    ram = device.ram_budget(src) if device is not None and device.fit_ram else None
    if bpw is None and nbytes is None:
        if ram is None:
            raise TasaError("give a budget: --bpw, --bytes or --fit-ram (with --profile)")
        return budget_bytes(src, nbytes=ram["file"]), ram, {"bytes": int(ram["file"])}
    budget = budget_bytes(src, bpw=bpw, nbytes=nbytes)
    block = {"bpw": bpw} if bpw is not None else {"bytes": int(nbytes)}
    if ram is not None and ram["file"] - fixed_bytes(src) < budget:
        return ram["file"] - fixed_bytes(src), ram, {"bytes": int(ram["file"])}
    return budget, ram, block


def make_plan(an: Analysis, src: ModelSource, *, bpw: float | None = None, nbytes: int | None = None,
              mode: str = "tasa", lam: float | None = None, pins: Pins | None = None,
              device: DeviceLimits | None = None, time_limit: float | None = None) -> BitPlan:
    """The plan of least predicted loss within the budget (``bpw`` or ``nbytes``), the pins and the
    device's limits. ``time_limit``: seconds for the MILP (a device-limited solve can take minutes
    on a 1.5B model); when it runs out the best plan found is returned, recorded as
    ``provenance["optimal"] = False``."""
    if an.model["fingerprint"] != src.fingerprint:
        raise TasaError(f"analysis is for {an.model.get('name')} ({an.model['fingerprint']}), not {src.name} ({src.fingerprint})")
    scores, lam_used = scores_for(an, mode, lam)
    opts, pinned, unscored = _pinned_options(an, src, scores, pins)
    dropped, resources = [], []
    if device is not None:
        device.profile.check_model(src)
        dropped = device.restrict(opts, an.target)
        resources = device.resources(src, opts)
    budget, ram, block = _device_budget(device, src, bpw, nbytes)
    _check_pinned_budget(opts, budget, src, pinned)
    alloc = solve(opts, budget, resources=resources, time_limit=time_limit)
    plan = plan_from_allocation(an, src, alloc, scores, mode, lam_used, block)
    if device is not None:
        device.record(plan, src, dropped, ram)
    if pins:
        plan.provenance["pins"] = {**pins.to_dict(an.target), "tensors": pinned, "unscored": unscored,
                                   **({"note": "unscored: pinned to a format the analysis did not score; their loss is "
                                               "not predicted (counted as 0 in predicted.loss)"} if unscored else {})}
    return plan


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
            "calibration": {**an.mixture.chosen.summary(), "beta": an.mixture.beta,
                            "chat_template": bool(an.config.get("chat_template", False))},
            "imatrix": an.imatrix_path if spec.uses_imatrix else None,
            "solver": alloc.solver,
            "optimal": alloc.optimal,
            "scores": {n: scores[n][f] for n, f in alloc.choice.items() if f in scores[n]},
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


def sweep(an: Analysis, src: ModelSource, *, mode: str = "tasa", lam: float | None = None, points: int = 12,
          pins: Pins | None = None, device: DeviceLimits | None = None) -> list[dict]:
    """Pareto curve: file bytes -> minimal predicted loss, over the feasible budget range (with
    the pins, if any, as constraints). With a device profile every point also meets its time
    limits and reports its predicted decode / prefill speed (loss against tokens/s)."""
    scores, lam_used = scores_for(an, mode, lam)
    opts, _, _ = _pinned_options(an, src, scores, pins)
    resources = []
    if device is not None:
        device.profile.check_model(src)
        device.restrict(opts, an.target)
        resources = device.resources(src, opts)
    lo, hi = bytes_range(opts)
    if device is not None and device.fit_ram:
        hi = min(hi, device.ram_budget(src)["file"] - fixed_bytes(src))
        if hi < lo:
            raise TasaError("--fit-ram: the smallest plan does not fit the device's RAM budget")
    budgets = sorted({int(lo + (hi - lo) * i / max(1, points - 1)) for i in range(points)})
    fixed = fixed_bytes(src)
    out = []
    for b in budgets:
        try:
            a = solve(opts, b, resources=resources)
        except TasaError:
            if not resources:
                raise
            continue        # the time limits rule this budget out
        total = a.nbytes + fixed
        row = {"budget_bytes": a.budget_bytes + fixed, "bytes": total, "bpw": 8.0 * total / src.n_params,
               "loss": a.loss, "types": count_formats(a.choice.values())}
        if device is not None:
            row.update(device.profile.predict(src, a.choice).to_dict())
        out.append(row)
    if not out:
        raise TasaError("no budget of the sweep meets the time limits")
    return out


def _scored_imatrix(an: Analysis) -> dict | None:
    """The identity of the imatrix the analysis scored with (hashed now for analyses written
    before the hash was recorded)."""
    im = an.imatrix
    if im is None or im.get("sha256"):
        return im
    return imatrix_ref(im["path"])
