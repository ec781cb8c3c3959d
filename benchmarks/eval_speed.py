"""Speed of `tasa-edge eval`'s generation: seconds per GSM8K question one at a time and batched.

Prompts are lm-eval's (5 shots ``Question: ...\\nAnswer: ...`` from the calibration split, then the
held-out question). ``shared``: the same first 5 shots for every question (the ``first_n`` sampler
``eval`` uses, so the prefix is decoded once); ``per-question``: other shots for every question
(lm-eval's default random draw: no common prefix). Each configuration generates the same questions
greedily (``--max-gen-tokens``, lm-eval's ``until``) through :class:`tasa_edge.lmeval.LlamaGenerator`;
the table gives seconds per question and how many completions are identical to one-at-a-time
generation of the same prompts, and how many GSM8K answers (strict-match) are right.

    python benchmarks/eval_speed.py --model qwen2.5-coder-1.5b --n 16 --parallel 1 8 16
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasa_edge.data import load_gsm8k  # noqa: E402
from tasa_edge.lmeval import Journal, LlamaGenerator  # noqa: E402
from tasa_edge.zoo import resolve_model  # noqa: E402

UNTIL = ["Question:", "</s>", "<|im_end|>"]


def prompts(n: int, shared: bool) -> list[str]:
    calib, ev = load_gsm8k("calib"), load_gsm8k("eval")[:n]
    out = []
    for i, q in enumerate(ev):
        shots = calib[:5] if shared else calib[5 * (i + 1): 5 * (i + 2)]
        out.append("".join(s.prompt + s.target + "\n\n" for s in shots) + q.prompt)
    return out


def answer(text: str) -> str | None:
    m = re.search(r"#### (\-?[0-9\.\,]+)", text)
    return m.group(1).replace(",", "") if m else None


def run(model: Path, texts: list[str], parallel: int, max_tokens: int, threads: int | None) -> tuple[list[str], float]:
    with tempfile.TemporaryDirectory() as d:
        g = LlamaGenerator(model, Journal(Path(d) / "g.jsonl"), n_ctx=2048, n_threads=threads,
                           max_gen_toks=max_tokens, n_parallel=parallel)
        try:
            g.llm()  # the load is not timed
            t = time.perf_counter()
            out = g.generate([(i, x, UNTIL, max_tokens) for i, x in enumerate(texts)])
            return out, time.perf_counter() - t
        finally:
            g.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--n", type=int, default=16, help="held-out questions")
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--max-gen-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-per-question", action="store_true", help="skip the one-at-a-time run without a shared prefix")
    a = ap.parse_args()
    model = resolve_model(a.model)
    gold = [s.target.split("#### ")[-1].strip().replace(",", "") for s in load_gsm8k("eval")[:a.n]]
    rows = []
    configs = ([] if a.no_per_question else [("per-question shots", False, 1)]) + [("shared shots", True, p) for p in a.parallel]
    base = None
    for label, shared, par in configs:
        out, sec = run(model, prompts(a.n, shared), par, a.max_gen_tokens, a.threads)
        if shared and par == 1:
            base = out
        right = sum(answer(o) == g for o, g in zip(out, gold))
        rows.append((label, par, sec / a.n, out, right))
        print(f"{label}, parallel {par}: {sec / a.n:.2f} s/question, {right}/{a.n} right", flush=True)
    print(f"\n{model.name}, {a.n} GSM8K held-out questions, <= {a.max_gen_tokens} tokens each\n")
    print("| prompts | parallel | s / question | completions identical to parallel 1 | strict answers right |")
    print("|---|---|---|---|---|")
    for label, par, spq, out, right in rows:
        same = "-" if base is None or label != "shared shots" else f"{sum(x == y for x, y in zip(out, base))}/{a.n}"
        print(f"| {label} | {par} | {spq:.2f} | {same} | {right}/{a.n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
