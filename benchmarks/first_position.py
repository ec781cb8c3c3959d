"""Where the general-text KLD of a file against its F32 reference comes from, by position: the mean
over whole documents (every token after the first, the README's general scoring until 6 Dec), the
first scored position's share of it, and the mean over each document's second half (llama-perplexity's
scoring, and tasa_edge.evaluate's since then). Held-out general documents, one window each.

    python benchmarks/first_position.py --model qwen2.5-coder-1.5b      # smollm2-135m, gemma3-270m

The file compared is the packaged one unless ``--file`` names another GGUF of the same model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporters.reference import reference_gguf  # noqa: E402
from tasa_edge import quality  # noqa: E402
from tasa_edge.data import TextSample, load_general  # noqa: E402
from tasa_edge.errors import TasaError  # noqa: E402
from tasa_edge.evaluate import tokenize_samples  # noqa: E402
from tasa_edge.llama_run import score  # noqa: E402
from tasa_edge.zoo import resolve_model  # noqa: E402


def by_position(ref: Path, path: Path, docs: list[TextSample], tokens: int, threads: int | None) -> dict:
    """Per-position KL(reference || file) over every token after the first of each document (the
    project's :func:`tasa_edge.quality.kl_rows`, on float32 log-probs rather than the float16 store)."""
    seqs = tokenize_samples(ref, docs, tokens)[0]
    starts = [1] * len(seqs)
    kls = []
    for a, b in zip(score(ref, seqs, starts, threads), score(path, seqs, starts, threads)):
        kls.append(quality.kl_rows(quality.log_softmax(a), quality.log_softmax(b)))
    whole = np.concatenate(kls)
    first = np.array([k[0] for k in kls])
    half = np.concatenate([k[len(s) // 2:] for k, s in zip(kls, seqs)])   # tokens len//2+1 .. len-1
    return {"docs": len(kls), "positions": int(whole.size), "whole": float(whole.mean()),
            "first_share": float(first.sum() / whole.sum()), "first_mean": float(first.mean()),
            "later_mean": float(np.concatenate([k[1:] for k in kls]).mean()),
            "half": float(half.mean()), "half_positions": int(half.size)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a packaged model name (or a GGUF path)")
    ap.add_argument("--file", type=Path, help="the GGUF compared (default: the packaged file)")
    ap.add_argument("--docs", type=int, default=10, help="held-out general documents")
    ap.add_argument("--tokens", type=int, default=256, help="window per document")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    if a.docs < 1 or a.tokens < 4:
        raise TasaError("--docs must be >= 1 and --tokens >= 4")
    path = a.file or resolve_model(a.model)
    if not Path(path).is_file():
        raise TasaError(f"no such GGUF: {path}")
    r = by_position(reference_gguf(a.model), Path(path), load_general("eval")[: a.docs], a.tokens, a.threads)
    print(f"{a.model}: {Path(path).name} against its F32 reference, {r['docs']} held-out documents of <= {a.tokens} tokens")
    print(f"  every token after the first: mean KL {r['whole']:.5f} over {r['positions']} positions")
    print(f"  the first scored position:   mean KL {r['first_mean']:.4f}, {r['first_share']:.1%} of the sum"
          f" (every later position: {r['later_mean']:.5f})")
    print(f"  second half of each window:  mean KL {r['half']:.5f} over {r['half_positions']} positions")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (TasaError, OSError) as exc:     # bad input: one line, no traceback
        print(f"first_position.py: {exc}", file=sys.stderr)
        sys.exit(2)
