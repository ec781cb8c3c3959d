"""Python stand-ins for llama.cpp's ``llama-bench`` and ``llama-perplexity`` (llama-cpp-python).

A test double, not part of the package: ``python tests/fakes/pybench.py llama-bench -m M.gguf -p 64
-n 16 -r 2 -t 4 -o json`` prints llama-bench's JSON rows (``n_prompt``/``n_gen``/``avg_ts``/
``stddev_ts``/``samples_ts`` ...), and
``python tests/fakes/pybench.py llama-perplexity -m REF -f TEXT -c 128 --kl-divergence-base BASE`` then
``... -m Q --kl-divergence-base BASE --kl-divergence`` print llama-perplexity's KL-divergence
summary, with the same chunking (``-c`` tokens per chunk, BOS first, the second half of every chunk
scored). The measurements are :mod:`devices.worker`'s and :mod:`tasa_edge.quality`'s; the base
file is an ``.npz`` of our own
(llama.cpp's binary layout is not reproduced).

They let the adb/ssh flow of :mod:`devices.remote` run end to end against a local stand-in device
(a directory and a fake ``adb``/``ssh``), and parse the very formats the real tools print.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from devices.worker import GGUFBackend, measure_speed  # noqa: E402
from tasa_edge import quality  # noqa: E402


def _bench(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llama-bench")
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=4)
    ap.add_argument("-o", "--output", default="md", choices=["json", "md"])
    a = ap.parse_args(argv)
    be = GGUFBackend(a.model, a.threads)
    be.load(a.n_prompt + a.n_gen, max(1, a.n_prompt))
    sp = measure_speed(be, a.n_prompt, a.n_gen, a.repetitions)
    from llama_cpp import llama_model_n_params, llama_model_size

    size, params = int(llama_model_size(be.llm.model)), int(llama_model_n_params(be.llm.model))
    be.close()
    rows = []
    for key, n_p, n_g in (("pp", a.n_prompt, 0), ("tg", 0, a.n_gen)):
        if key not in sp:
            continue
        s = sp[key]
        ns = s["samples_ns"]
        rows.append({
            "build_commit": "pybench", "build_number": 0, "cpu_info": "tasa-edge stand-in", "gpu_info": "",
            "backends": "CPU", "model_filename": a.model, "model_type": "gguf", "model_size": size,
            "model_n_params": params, "n_batch": 2048, "n_ubatch": 512, "n_threads": a.threads,
            "type_k": "f16", "type_v": "f16", "n_gpu_layers": 0, "use_mmap": True,
            "n_prompt": n_p, "n_gen": n_g, "n_depth": 0, "test_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "avg_ns": int(np.mean(ns)), "stddev_ns": int(np.std(ns, ddof=1)) if len(ns) > 1 else 0,
            "avg_ts": s["ts_mean"], "stddev_ts": s["ts_std"], "samples_ns": ns, "samples_ts": s["samples_ts"],
        })
    if a.output == "json":
        print(json.dumps(rows, indent=2))
    else:
        print("| model | size | params | backend | threads | test | t/s |")
        print("| ----- | ---: | -----: | ------- | ------: | ---: | --: |")
        for r in rows:
            test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
            print(f"| gguf | {r['model_size'] / 2**20:.2f} MiB | {r['model_n_params'] / 1e6:.2f} M | CPU | "
                  f"{a.threads} | {test} | {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} |")
    return 0


def _chunks(llm, tokens: list[int], ctx: int, n_chunks: int):
    add_bos = llm.tokenize(b"", add_bos=True) != []
    for i in range(n_chunks):
        toks = list(tokens[i * ctx: (i + 1) * ctx])
        if add_bos:
            toks[0] = llm.token_bos()
        yield toks


def _perplexity(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llama-perplexity")
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file")
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-b", "--batch-size", type=int, default=2048)
    ap.add_argument("-t", "--threads", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=-1)
    ap.add_argument("--kl-divergence-base")
    ap.add_argument("--kl-divergence", action="store_true")
    a = ap.parse_args(argv)
    from llama_cpp import Llama

    ctx, first = a.ctx_size, a.ctx_size // 2
    t0 = time.perf_counter()
    llm = Llama(model_path=a.model, n_ctx=ctx, n_batch=min(ctx, a.batch_size), logits_all=True, verbose=False,
                n_threads=a.threads, n_threads_batch=a.threads, seed=0)
    load_ms = (time.perf_counter() - t0) * 1000
    if a.kl_divergence:
        base = np.load(a.kl_divergence_base)
        tokens, n_chunks = base["tokens"].tolist(), int(base["n_chunks"])
        if int(base["ctx"]) != ctx:
            print(f"main: context {ctx} differs from the base's {int(base['ctx'])}", file=sys.stderr)
            return 1
    else:
        if not a.file:
            print("main: need -f FILE", file=sys.stderr)
            return 1
        with open(a.file, encoding="utf-8") as fh:
            tokens = llm.tokenize(fh.read().encode(), add_bos=True)
        if len(tokens) < 2 * ctx:
            print(f"perplexity: you need at least {2 * ctx} tokens to evaluate perplexity with a context of {ctx}",
                  file=sys.stderr)
            print(f"perplexity: the data file you provided tokenizes to only {len(tokens)} tokens", file=sys.stderr)
            return 1
        n_chunks = len(tokens) // ctx if a.chunks < 0 else min(a.chunks, len(tokens) // ctx)
    print(f"perplexity: calculating perplexity over {n_chunks} chunks, n_ctx={ctx}, batch_size={ctx}", file=sys.stderr)
    lps, nll, nll_base, kl, same, dp = [], [], [], [], [], []
    row = 0
    for i, toks in enumerate(_chunks(llm, tokens, ctx, n_chunks)):
        llm.reset()
        llm.eval(toks)
        lg = np.asarray(llm.scores[first: ctx - 1], dtype=np.float32)
        tgt = np.asarray(tokens[i * ctx + first + 1: (i + 1) * ctx], dtype=np.int64)
        m = lg.shape[0]
        if a.kl_divergence:
            lp16 = base["lp"][row: row + m]
            row += m
            lp_t = lp16.astype(np.float32)[np.arange(m), tgt]
            k, same_top1, lq_t = quality.score_rows(lp16, lp16.astype(np.float32).argmax(-1), lg, tgt)
            nll.append(-lq_t)
            nll_base.append(-lp_t)
            kl.append(k)
            same.append(same_top1)
            dp.append(np.exp(lq_t) - np.exp(lp_t))
        else:
            lp16, tgt_lp, _ = quality.reference_rows(lg, tgt)
            nll.append(-tgt_lp)
            lps.append(lp16)
        print(f"[{i + 1}]{np.exp(np.concatenate(nll).mean()):.4f},", end="", flush=True)
    print()
    nll_all = np.concatenate(nll)
    ppl = float(np.exp(nll_all.mean()))
    ppl_se = ppl * quality.std_error(nll_all)
    if not a.kl_divergence:
        if a.kl_divergence_base:
            with open(a.kl_divergence_base, "wb") as fh:
                np.savez(fh, tokens=np.asarray(tokens[: n_chunks * ctx], np.int32), n_chunks=n_chunks, ctx=ctx,
                         lp=np.concatenate(lps))
        print(f"Final estimate: PPL = {ppl:.4f} +/- {ppl_se:.5f}")
    else:
        _print_kld(ppl, ppl_se, nll_all, np.concatenate(nll_base), np.concatenate(kl), np.concatenate(same),
                   np.concatenate(dp))
    print(f"llama_perf_context_print:        load time = {load_ms:10.2f} ms", file=sys.stderr)
    llm.close()
    return 0


def _print_kld(ppl, ppl_se, nll, nll_base, kl, same, dp) -> None:
    pb = float(np.exp(nll_base.mean()))
    d = nll - nll_base
    print("====== Perplexity statistics ======")
    print(f"Mean PPL(Q)                   : {ppl:10.6f} ± {ppl_se:10.6f}")
    print(f"Mean PPL(base)                : {pb:10.6f} ± {pb * quality.std_error(nll_base):10.6f}")
    cor = float(np.corrcoef(nll, nll_base)[0, 1]) if nll.size > 1 else 1.0
    print(f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * cor:6.2f}%")
    print(f"Mean ln(PPL(Q)/PPL(base))     : {d.mean():10.6f} ± {quality.std_error(d):10.6f}")
    print(f"Mean PPL(Q)/PPL(base)         : {np.exp(d.mean()):10.6f} ± {np.exp(d.mean()) * quality.std_error(d):10.6f}")
    print()
    print("====== KL divergence statistics ======")
    print(f"Mean    KLD: {kl.mean():10.6f} ± {quality.std_error(kl):10.6f}")
    print(f"Maximum KLD: {kl.max():10.6f}")
    for q, label in ((99.9, "99.9%"), (99.0, "99.0%"), (95.0, "95.0%"), (90.0, "90.0%")):
        print(f"{label:<7} KLD: {np.percentile(kl, q):10.6f}")
    print(f"Median  KLD: {np.median(kl):10.6f}")
    for q, label in ((10.0, "10.0%"), (5.0, " 5.0%"), (1.0, " 1.0%"), (0.1, " 0.1%")):
        print(f"{label:<7} KLD: {np.percentile(kl, q):10.6f}")
    print(f"Minimum KLD: {kl.min():10.6f}")
    print()
    print("====== Token probability statistics ======")
    print(f"Mean    Δp: {100 * dp.mean():6.3f} ± {100 * quality.std_error(dp):5.3f} %")
    print(f"Maximum Δp: {100 * dp.max():6.3f}%")
    print(f"Median  Δp: {100 * np.median(dp):6.3f}%")
    print(f"Minimum Δp: {100 * dp.min():6.3f}%")
    print(f"RMS Δp    : {100 * np.sqrt((dp ** 2).mean()):6.3f} ± {100 * quality.std_error(dp ** 2):5.3f} %")
    s = same.astype(np.float64)
    print(f"Same top p: {100 * s.mean():6.3f} ± {100 * quality.std_error(s):5.3f} %")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("llama-bench", "llama-perplexity"):
        print("usage: python tests/fakes/pybench.py {llama-bench|llama-perplexity} ARGS...", file=sys.stderr)
        return 2
    return (_bench if argv[0] == "llama-bench" else _perplexity)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
