"""What an analysis produces, as typed values: its configuration, the calibration mixture, the
sensitivity table and the ``analysis.json`` file that carries them (no torch here: planning,
reports and the illusion plot read analyses without loading the analysis machinery).

The TASA score of tensor t in format f (see :mod:`tasa_edge.analysis` for S_ppl and S_task):

    S_tasa(t, f) = (1 - lambda) * S_ppl(t, f) / Z_ppl + lambda * S_task(t, f) / Z_task

where Z_s is the total of S_s when every tensor takes the target's reference format (or its
cheapest option where the reference does not fit: :meth:`Target.reference_of`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__, formats
from .errors import TasaError
from .fsutil import atomic_write_text
from .jsonio import check_analysis_file

ANALYSIS_FORMAT = "tasa-edge/analysis"
ANALYSIS_VERSION = 1
SOURCES = ("ppl", "task")


@dataclass
class AnalysisConfig:
    n_general: int = 24          # general-text pool samples
    n_task: int = 24             # task pool samples
    n_target: int = 12           # held-in task target set for alignment
    max_tokens: int = 192
    sketch_k: int = 16           # trace sketch is k x k per tensor
    ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    sizes: tuple[int, ...] = (8, 16)
    beta: float = 0.5            # diversity weight in the mixture score
    target: str = "gguf"
    formats: tuple[str, ...] | None = None
    seed: int = 0
    fisher: str = "factored"     # form of the Fisher statistics: factored | block | exact (tasa_edge.fisher)
    fisher_dtype: str = "float32"    # storage of the exact form
    dtype: str = "auto"          # weights during the gradient pass: auto | float32 | bfloat16
    sensitivity_rows: float = 1.0    # fraction of each large tensor's rows the sensitivity pass samples
    chat_template: bool = False  # task samples rendered with the model's chat template (tasa_edge.chat)
    checkpoint: str = "auto"     # layer checkpointing in the gradient pass: auto | on | off (same statistics)

    def key(self) -> str:
        """Identity of the gradient statistics (not of the format menu, mixture scoring or the
        sensitivity pass)."""
        d = asdict(self)
        for k in ("formats", "beta", "ratios", "sizes", "target", "sensitivity_rows", "checkpoint"):
            d.pop(k)
        if not d["chat_template"]:
            d.pop("chat_template")   # the key of a template-less analysis is what it was before templates
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Candidate:
    """One calibration mixture (task ratio x size) and its gradient-trace scores."""

    task_ratio: float
    size: int
    alignment: float
    diversity: float
    score: float
    members: list[str]
    n_task: int | None = None     # task samples among the members

    def summary(self) -> dict:
        """The fields a plan records of its calibration (everything but the member scores)."""
        return {"task_ratio": self.task_ratio, "size": self.size, "alignment": self.alignment,
                "diversity": self.diversity, "score": self.score, "members": list(self.members)}


@dataclass
class Mixture:
    beta: float
    candidates: list[Candidate]
    chosen: Candidate

    def to_dict(self) -> dict:
        return {"beta": self.beta, "candidates": [asdict(c) for c in self.candidates], "chosen": asdict(self.chosen)}

    @classmethod
    def from_dict(cls, d: dict) -> "Mixture":
        return cls(float(d["beta"]), [Candidate(**c) for c in d["candidates"]], Candidate(**d["chosen"]))


@dataclass
class SensitivityTable:
    """Per tensor and format: predicted loss on general text (``ppl``) and on task data
    (``task``), the file bytes, and the relative weight error of the roundtrip."""

    ppl: dict[str, dict[str, float]] = field(default_factory=dict)
    task: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    rel_err: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, name: str, fmt: str, *, ppl: float, task: float, nbytes: int, rel_err: float) -> None:
        for col, v in ((self.ppl, ppl), (self.task, task), (self.bytes, nbytes), (self.rel_err, rel_err)):
            col.setdefault(name, {})[fmt] = v

    def names(self) -> list[str]:
        return list(self.ppl)

    def source(self, s: str) -> dict[str, dict[str, float]]:
        if s not in SOURCES:
            raise TasaError(f"unknown sensitivity source {s!r} (known: {', '.join(SOURCES)})")
        return self.ppl if s == "ppl" else self.task

    def reference_format(self, spec: formats.Target, name: str) -> str:
        return spec.reference_of(self.bytes[name])

    def at_reference(self, spec: formats.Target, s: str) -> dict[str, float]:
        """S_s of every tensor at its normalisation format."""
        col = self.source(s)
        return {n: col[n][self.reference_format(spec, n)] for n in col}

    def normalisers(self, spec: formats.Target) -> dict[str, float]:
        """Z_s: total predicted loss of source s with every tensor at its normalisation format."""
        out = {}
        for s in SOURCES:
            tot = sum(self.at_reference(spec, s).values())
            out[s] = tot if tot > 0 else 1.0
        return out

    def scores(self, spec: formats.Target, lam: float) -> dict[str, dict[str, float]]:
        """The TASA aggregate of every (tensor, format) for reasoning weight ``lam``."""
        z = self.normalisers(spec)
        return {n: {f: (1 - lam) * row[f] / z["ppl"] + lam * self.task[n][f] / z["task"] for f in row}
                for n, row in self.ppl.items()}

    def to_dict(self) -> dict:
        out = {"ppl": self.ppl, "task": self.task, "bytes": self.bytes}
        if self.rel_err:
            out["rel_err"] = self.rel_err
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityTable":
        return cls(d["ppl"], d["task"], {n: {f: int(b) for f, b in row.items()} for n, row in d["bytes"].items()},
                   d.get("rel_err", {}))


@dataclass
class Analysis:
    model: dict                  # the plan's model block: fingerprint, arch, name, n_params, source
    config: dict                 # AnalysisConfig fields, with "formats" = the menu per tensor
    mixture: Mixture
    table: SensitivityTable
    lam: float
    imatrix: dict | None         # {"path", "sha256", "entries"} of the imatrix the table was scored with
    timings: dict = field(default_factory=dict)

    @property
    def target(self) -> formats.Target:
        return formats.get(self.config["target"])

    @property
    def imatrix_path(self) -> str | None:
        return None if self.imatrix is None else self.imatrix["path"]

    def scores(self, lam: float) -> dict[str, dict[str, float]]:
        return self.table.scores(self.target, lam)

    def to_dict(self) -> dict:
        return {
            "format": ANALYSIS_FORMAT, "version": ANALYSIS_VERSION, "tool": f"tasa-edge {__version__}",
            "model": self.model, "config": self.config, "mixture": self.mixture.to_dict(),
            "table": self.table.to_dict(), "lam": self.lam, "imatrix_path": self.imatrix_path,
            "imatrix": self.imatrix, "timings": self.timings,
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Analysis":
        p = Path(path)
        if not p.is_file():
            raise TasaError(f"analysis not found: {p}")
        d = check_analysis_file(p)       # bounded load, schema analysis.v1, a consistent table
        try:
            imatrix = d.get("imatrix")
            if imatrix is None and d.get("imatrix_path"):   # written before the sha256 was recorded
                imatrix = {"path": d["imatrix_path"], "sha256": None, "entries": None}
            if imatrix is not None and not Path(imatrix["path"]).is_file() and (p.parent / Path(imatrix["path"]).name).is_file():
                # an analysis folder moved or copied elsewhere (another machine, a committed copy): its
                # imatrix beside it; plan export still checks the sha256 recorded here
                imatrix = {**imatrix, "path": str((p.parent / Path(imatrix["path"]).name).resolve())}
            return cls(d["model"], d["config"], Mixture.from_dict(d["mixture"]), SensitivityTable.from_dict(d["table"]),
                       float(d["lam"]), imatrix, d.get("timings", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TasaError(f"{p}: malformed analysis file ({type(exc).__name__}: {exc})") from exc
