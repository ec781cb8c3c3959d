"""Seeded mutation fuzzing of tasa-edge's readers, each batch in ONE child process.

The parent (:func:`run_batch`) starts ``python tests/fuzzlib.py worker KIND SEED START COUNT DIR``
and reads one JSON line per case. The child prints ``{"i": n, "start": true}`` before a case and
``{"i": n, "outcome": ...}`` after it, so a case that kills the process (``GGML_ABORT``, a crash)
or stops making progress is attributed to it: the parent records ``abort`` / ``hang`` and starts a
new child at the next case. Outcomes:

* ``accepted``: the reader returned and the use after it (quantizing with an accepted imatrix,
  exporting an accepted plan for the tiny model, planning from an accepted analysis) worked;
* ``rejected``: a one-line :class:`TasaError`;
* ``traceback``: any other exception (a bug), with its type and location;
* ``invalid_accepted``: an accepted plan / analysis that its JSON schema rejects;
* ``abort``, ``hang``: the child died, or went ``timeout`` seconds without finishing a case.

Base inputs are tiny files written on the spot (a 4-tensor GGUF with gguf-py's writer, a
3-entry imatrix, a plan and an analysis for that model), so hundreds of cases take seconds.
Also used by ``scripts/fuzz_campaign.py`` with larger counts.
"""

from __future__ import annotations

import json
import os
import random
import select
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("gguf", "imatrix_gguf", "imatrix_dat", "plan", "analysis", "tensor_type", "profile")
INTERESTING_U64 = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 255, 256, 65535, 1 << 31, (1 << 32) - 1,
                   1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 8]
INTERESTING_F32 = [float("nan"), float("inf"), -float("inf"), -1e-30, -1.0, 0.0, 1e-45, 3.4e38, 1e30, -0.0]


# ============================================================================ base inputs
def make_bases(d: Path) -> dict[str, Path]:
    """Write the tiny valid inputs every mutation starts from; return kind -> path."""
    import gguf
    import numpy as np

    from tasa_edge.formats import ggml
    from tasa_edge.imatrix import ImatrixStats, save_legacy_dat

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    model = d / "tiny.gguf"
    if not model.exists():
        w = gguf.GGUFWriter(str(model), arch="llama")
        w.add_name("tiny")
        w.add_block_count(1)
        w.add_context_length(64)
        w.add_embedding_length(256)
        w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(12)])
        w.add_array("tokenizer.ggml.scores", [float(i) for i in range(12)])
        w.add_tensor("token_embd.weight", rng.standard_normal((12, 256)).astype(np.float32))
        w.add_tensor("blk.0.attn_norm.weight", np.ones(256, dtype=np.float32))
        w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 256)).astype(np.float16))
        q = ggml.quantize(rng.standard_normal((8, 256)).astype(np.float32), "Q8_0")
        w.add_tensor("blk.0.ffn_down.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    st = ImatrixStats(datasets=["fuzz"], chunk_count=2, chunk_size=64)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        st.add(name, rng.random(256) * 4, 16)
    im_gguf, im_dat = d / "imatrix.gguf", d / "imatrix.dat"
    if not im_gguf.exists():
        st.save(im_gguf)
        save_legacy_dat(st, im_dat)
    from tasa_edge.model import ModelSource
    from tasa_edge.plan import BitPlan

    src = ModelSource.open(model)
    plan = BitPlan.uniform(src, "Q8_0")
    plan.budget = {"bpw": 8.5}
    plan.predicted["loss"] = 0.0
    (d / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1))
    names = [t.name for t in src.quantizable]
    an = {
        "format": "tasa-edge/analysis", "version": 1, "tool": "fuzz",
        "model": {"fingerprint": src.fingerprint, "arch": "llama", "name": "tiny", "n_params": src.n_params},
        "config": {"target": "gguf", "formats": {"Q8_0": 8.5, "Q4_0": 4.5}},
        "mixture": {"beta": 0.5, "candidates": [], "chosen": {"task_ratio": 0.5, "size": 2, "alignment": 0.1,
                                                               "diversity": 0.2, "score": 0.15, "members": ["a", "b"]}},
        "table": {"ppl": {n: {"Q8_0": 0.01, "Q4_0": 0.2} for n in names},
                  "task": {n: {"Q8_0": 0.02, "Q4_0": 0.3} for n in names},
                  "bytes": {n: {"Q8_0": ggml.nbytes("Q8_0", src.tensors[n].shape),
                                "Q4_0": ggml.nbytes("Q4_0", src.tensors[n].shape)} for n in names},
                  "rel_err": {n: {"Q8_0": 0.01, "Q4_0": 0.1} for n in names}},
        "lam": 0.5, "imatrix_path": None, "timings": {"total_s": 1.0},
    }
    (d / "analysis.json").write_text(json.dumps(an))
    (d / "tt.txt").write_text("# llama-quantize --tensor-type-file\ntoken_embd\\.weight=q8_0\n"
                              "blk\\.(0|1)\\.attn_q\\.weight=q4_0\nffn_down=q6_k\n")
    (d / "profile.toml").write_text((ROOT / "devices" / "profiles" / "raspberry-pi-5.toml").read_text())
    return {"gguf": model, "imatrix_gguf": im_gguf, "imatrix_dat": im_dat,
            "plan": d / "plan.json", "analysis": d / "analysis.json",
            "tensor_type": d / "tt.txt", "profile": d / "profile.toml"}


# ============================================================================ mutations
def _gguf_fields(data: bytes) -> tuple[list[tuple[int, str]], list[int]]:
    """(offset, struct format) of every count/length/type/dim/offset field, and the offsets of
    float32 payload values of the valid base file (a minimal walker, no checks)."""
    fields: list[tuple[int, str]] = []
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    pos = 4
    fields.append((pos, "<I")); pos += 4
    fields += [(pos, "<Q"), (pos + 8, "<Q")]
    n_t, n_kv = struct.unpack_from("<QQ", data, pos); pos += 16

    def string():
        nonlocal pos
        fields.append((pos, "<Q"))
        n = struct.unpack_from("<Q", data, pos)[0]
        pos += 8 + n

    for _ in range(n_kv):
        string()
        fields.append((pos, "<I"))
        vt = struct.unpack_from("<I", data, pos)[0]; pos += 4
        if vt == 8:
            string()
        elif vt == 9:
            fields += [(pos, "<I"), (pos + 4, "<Q")]
            et, n = struct.unpack_from("<IQ", data, pos); pos += 12
            for _ in range(n):
                if et == 8:
                    string()
                else:
                    fields.append((pos, {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[sizes[et]]))
                    pos += sizes[et]
        else:
            fields.append((pos, {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[sizes[vt]]))
            pos += sizes[vt]
    for _ in range(n_t):
        string()
        fields.append((pos, "<I"))
        nd = struct.unpack_from("<I", data, pos)[0]; pos += 4
        for _ in range(nd):
            fields.append((pos, "<Q")); pos += 8
        fields += [(pos, "<I"), (pos + 4, "<Q")]
        pos += 12
    data_start = pos + (-pos % 32)
    floats = list(range(data_start, len(data) - 3, 4))
    return fields, floats


def _bytes_mutation(rng: random.Random, data: bytes, header_len: int) -> bytes:
    b = bytearray(data)
    op = rng.randrange(6)
    hot = max(8, min(len(b), header_len))
    if op == 0:  # bit flips, mostly in the header
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(hot if rng.random() < 0.8 else len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        return bytes(b[: rng.randrange(len(b))])
    elif op == 2:  # random bytes overwrite
        i = rng.randrange(hot)
        n = rng.randint(1, 16)
        b[i: i + n] = bytes(rng.randrange(256) for _ in range(n))
    elif op == 3:  # insert junk
        i = rng.randrange(hot)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    elif op == 4:  # delete a slice
        i = rng.randrange(hot)
        del b[i: i + rng.randint(1, 64)]
    else:  # non-UTF-8 bytes
        i = rng.randrange(hot)
        b[i: i + 2] = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\x80\x80", b"\xed\xa0"])
    return bytes(b)


def mutate_binary(rng: random.Random, data: bytes, fields, floats, header_len: int) -> bytes:
    r = rng.random()
    if fields and r < 0.45:
        b = bytearray(data)
        for _ in range(rng.randint(1, 2)):
            off, fmt = rng.choice(fields)
            width = struct.calcsize(fmt)
            v = rng.choice(INTERESTING_U64 + [rng.randrange(1 << (8 * width))])
            if rng.random() < 0.3:  # nudge the current value
                cur = struct.unpack_from(fmt, b, off)[0]
                v = cur + rng.choice([-2, -1, 1, 2, 32, -32])
            struct.pack_into(fmt, b, off, v % (1 << (8 * width)))
        return bytes(b)
    if floats and r < 0.65:
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            struct.pack_into("<f", b, rng.choice(floats), rng.choice(INTERESTING_F32))
        return bytes(b)
    return _bytes_mutation(rng, data, header_len)


def _dat_fields(data: bytes):
    fields, floats = [(0, "<I")], []
    pos = 4
    n = struct.unpack_from("<i", data, 0)[0]
    for _ in range(n):
        fields.append((pos, "<I"))
        ln = struct.unpack_from("<i", data, pos)[0]; pos += 4 + ln
        fields += [(pos, "<I"), (pos + 4, "<I")]
        nval = struct.unpack_from("<i", data, pos + 4)[0]; pos += 8
        floats += list(range(pos, pos + 4 * nval, 4))
        pos += 4 * nval
    fields += [(pos, "<I"), (pos + 4, "<I")]
    return fields, floats


_JUNK = [None, True, False, 0, -1, 1, 2, 1.5, -1e308, 1e308, 2 ** 70, "", "x", "q4_k", "Q4_K", "sha256:zz",
         [], {}, [1, 2], {"a": 1}, "\ud800"]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def mutate_json(rng: random.Random, text: str) -> bytes:
    r = rng.random()
    if r < 0.12:  # text-level damage
        return _bytes_mutation(rng, text.encode(), len(text))
    if r < 0.16:  # pathological documents
        return rng.choice([
            b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b"[]", b"null", b"42", b'"x"',
            b"{}", text.replace("1", "NaN", 1).encode(), b'{"format": "tasa-edge/bitplan"' + b" " * 10,
        ])
    obj = json.loads(text)
    paths = [p for p in _paths(obj) if p]
    for _ in range(rng.randint(1, 3)):
        p = rng.choice(paths)
        parent = obj
        try:
            for k in p[:-1]:
                parent = parent[k]
            key = p[-1]
            op = rng.random()
            if op < 0.25 and isinstance(parent, dict):
                del parent[key]
            elif op < 0.35 and isinstance(parent, dict):
                parent["x-" + str(rng.randrange(100))] = rng.choice(_JUNK)
            elif op < 0.45 and isinstance(parent[key], str):
                parent[key] = parent[key].lower() if rng.random() < 0.5 else parent[key] + "!"
            elif op < 0.55 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
                parent[key] = rng.choice([0, -parent[key], parent[key] * 1e12, True, str(parent[key])])
            else:
                parent[key] = rng.choice(_JUNK)
        except (KeyError, IndexError, TypeError):
            continue
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


_TEXT_JUNK = ["(a+)+$=q8_0", "[=q4_0", "x=Q99", "=q8_0", ".*=iq2_xxs", "a" * 5000 + "=q8_0", "\x00=q8_0",
              "ffn=", "[cpu]\nthreads = -1", "[transport]\nhost = \"-oProxyCommand=id\"", "a = " + "[" * 3000,
              "name = 1", "target = \"ssh\"", "[memory]\nlimit_gib = 1e400", "port = 99999", "[transport]\nport = 0"]


def mutate_text(rng: random.Random, text: str) -> bytes:
    if rng.random() < 0.5:
        return _bytes_mutation(rng, text.encode(), len(text))
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines) + 1)
        op = rng.random()
        if op < 0.5:
            lines.insert(i, rng.choice(_TEXT_JUNK))
        elif op < 0.75 and lines:
            del lines[min(i, len(lines) - 1)]
        elif lines:
            j = min(i, len(lines) - 1)
            lines[j] = lines[j].replace("=", rng.choice(["==", "", "= ", "=-"]), 1)
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


class Mutator:
    def __init__(self, kind: str, base: Path):
        self.kind, self.data = kind, base.read_bytes()
        self.fields, self.floats, self.header_len = [], [], len(self.data)
        if kind in ("gguf", "imatrix_gguf"):
            self.fields, self.floats = _gguf_fields(self.data)
            self.header_len = max(o for o, _ in self.fields) + 8
        elif kind == "imatrix_dat":
            self.fields, self.floats = _dat_fields(self.data)

    def case(self, seed: int, i: int) -> bytes:
        rng = random.Random(f"{self.kind}:{seed}:{i}")
        if self.kind in ("plan", "analysis"):
            return mutate_json(rng, self.data.decode())
        if self.kind in ("tensor_type", "profile"):
            return mutate_text(rng, self.data.decode())
        return mutate_binary(rng, self.data, self.fields, self.floats, self.header_len)


# ============================================================================ the child
def _use(kind: str, path: Path, ctx: dict) -> None:
    """Read ``path`` as ``kind`` and use what was read as the CLI would."""
    import numpy as np

    from tasa_edge.formats import ggml

    if kind == "gguf":
        from devices.gguf_header import read_header
        from tasa_edge.inspect import inspect_gguf
        from tasa_edge.model import ModelSource

        inspect_gguf(path)
        read_header(path)
        src = ModelSource.open(path)
        _ = src.name, src.fingerprint, src.n_params
        for name in src.tensors:
            src.read(name)
    elif kind.startswith("imatrix"):
        from tasa_edge.imatrix import load_imatrix

        st = load_imatrix(path)
        rng = np.random.default_rng(0)
        for name, m in st.means().items():
            if m.size % 256 == 0 and m.size <= 4096:
                ggml.quantize(rng.standard_normal((2, m.size)).astype(np.float32), "IQ2_XXS", m)
    elif kind == "plan":
        from exporters.gguf_export import export_gguf
        from tasa_edge.plan import BitPlan

        plan = BitPlan.load(path)
        _schema_or_flag(path, "bitplan.v1")
        plan.types_used()
        json.dumps(plan.to_dict())
        export_gguf(ctx["src"], plan, ctx["out"], nthreads=1, show_progress=False)
    elif kind == "analysis":
        from tasa_edge.results import Analysis
        from tasa_edge.planner import make_plan

        an = Analysis.load(path)
        _schema_or_flag(path, "analysis.v1")
        make_plan(an, ctx["src"], bpw=6.0)
    elif kind == "tensor_type":
        from tasa_edge.plan import read_tensor_type_file

        plan = read_tensor_type_file(path, ctx["src"], default="Q8_0")
        plan.validate(ctx["src"])
    elif kind == "profile":
        from devices.profiles import load_profile

        load_profile(path)


class InvalidAccepted(Exception):
    pass


def _schema_or_flag(path: Path, schema: str) -> None:
    """An independent check of an accepted file against the shipped schema."""
    import jsonschema

    s = json.loads((ROOT / "tasa_edge" / "schemas" / f"{schema}.json").read_text())
    try:
        jsonschema.validate(json.loads(path.read_text()), s)
    except jsonschema.ValidationError as exc:
        raise InvalidAccepted(exc.message[:100]) from None


def worker(kind: str, seed: int, start: int, count: int, d: Path) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    sys.setrecursionlimit(10000)
    os.environ["TASA_NO_PROGRESS"] = "1"
    from tasa_edge.errors import TasaError
    from tasa_edge.model import ModelSource

    bases = make_bases(d / "base")
    mut = Mutator(kind, bases[kind])
    ctx = {"src": ModelSource.open(bases["gguf"]), "out": d / "out.gguf"}
    ext = {"imatrix_dat": ".dat", "plan": ".json", "analysis": ".json", "tensor_type": ".txt", "profile": ".toml"}
    case = d / f"case-{kind}{ext.get(kind, '.gguf')}"
    for i in range(start, start + count):
        case.write_bytes(mut.case(seed, i))
        print(json.dumps({"i": i, "start": True}), flush=True)
        rec = {"i": i}
        try:
            _use(kind, case, ctx)
            rec["outcome"] = "accepted"
        except TasaError as exc:
            msg = str(exc)
            rec["outcome"] = "rejected" if "\n" not in msg else "multiline_error"
            rec["msg"] = msg[:200]
        except InvalidAccepted as exc:
            rec["outcome"], rec["msg"] = "invalid_accepted", str(exc)
        except BaseException as exc:  # noqa: BLE001 -- the point: anything else is a finding
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            rec["outcome"] = "traceback"
            rec["msg"] = f"{type(exc).__name__}: {str(exc)[:120]} at {Path(tb.filename).name}:{tb.lineno}"
        leftovers = [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
        if leftovers:
            rec["outcome"], rec["msg"] = "left_behind", ",".join(leftovers)
            for n in leftovers:
                (d / n).unlink()
        print(json.dumps(rec), flush=True)


# ============================================================================ the parent
def run_batch(kind: str, count: int, seed: int, workdir: Path, timeout: float = 30.0) -> list[dict]:
    """Run cases 0..count-1 of ``kind``; one record per case (restarting after an abort/hang)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TASA_NO_PROGRESS": "1"}
    results: dict[int, dict] = {}
    nxt = 0
    while nxt < count:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "worker", kind, str(seed), str(nxt), str(count - nxt), str(workdir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(workdir), text=True)
        current, last = None, time.monotonic()
        buf = ""
        while True:
            r, _, _ = select.select([proc.stdout], [], [], 1.0)
            if r:
                line = proc.stdout.readline()
                if not line:
                    break
                buf = line
                rec = json.loads(line)
                last = time.monotonic()
                if rec.get("start"):
                    current = rec["i"]
                else:
                    results[rec["i"]] = rec
                    current = None
                    nxt = rec["i"] + 1
            elif time.monotonic() - last > timeout:
                proc.kill()
                proc.wait()
                if current is None:  # stuck before the first case (setup): give up loudly
                    raise RuntimeError(f"fuzz worker for {kind} made no progress: {proc.stderr.read()[-2000:]}")
                results[current] = {"i": current, "outcome": "hang"}
                nxt = current + 1
                break
        rc = proc.wait()
        err = proc.stderr.read()
        proc.stderr.close()
        proc.stdout.close()
        if current is not None and current not in results:
            results[current] = {"i": current, "outcome": "abort", "msg": f"exit {rc}: {err.strip().splitlines()[-1:] if err.strip() else ''}"}
            nxt = current + 1
        elif current is None and nxt < count and rc != 0 and not buf:
            raise RuntimeError(f"fuzz worker for {kind} failed to start (exit {rc}): {err[-2000:]}")
    return [results[i] for i in range(count)]


def summarise(records: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r["outcome"]] = out.get(r["outcome"], 0) + 1
    return out


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]))
