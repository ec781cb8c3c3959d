"""Remote targets: Android phones over ``adb`` and Linux boards (Raspberry Pi ...) over ``ssh``/``scp``.

The flow is the one a person would type: push llama.cpp's own ``llama-bench`` and
``llama-perplexity`` (built for the device, see ``devices/README.md``) and the model files to a
scratch directory on the device, run

* ``llama-bench -m MODEL -p PP -n TG -r REPS -t THREADS -o json`` (speed, llama-bench's numbers),
* ``llama-perplexity -m REF -f TEXT --kl-divergence-base BASE`` once, then
  ``llama-perplexity -m MODEL --kl-divergence-base BASE --kl-divergence`` per model
  (KL-divergence / same-top-p / perplexity on the device, and the model load time),

each under a small ``sh`` wrapper that samples ``VmHWM`` from ``/proc/PID/status`` (the peak
resident set; works with Android's toybox and busybox), and parse their output.

Executables come from ``$TASA_ADB``, ``$TASA_SSH`` and ``$TASA_SCP`` (default ``adb``, ``ssh``,
``scp`` on ``PATH``). Files already on the device with the same size are not pushed again.

A bad state of the device -- unreachable, a tool missing, out of memory, storage full, a command
that hangs -- raises :class:`DeviceError` (a one-line :class:`TasaError`) that ends the whole run:
the harness writes no report then.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tasa_edge.errors import TasaError

from .llama_tools import parse_build_info, parse_llama_bench  # noqa: F401  (parse_llama_bench: the harness' parser)

ENV_VARS = {"adb": "TASA_ADB", "ssh": "TASA_SSH", "scp": "TASA_SCP"}
TOOLS = ("llama-bench", "llama-perplexity")
#: ELF e_machine -> ``uname -m`` name
ELF_MACHINES = {3: "i686", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}
DEFAULT_REMOTE_DIR = {"adb": "/data/local/tmp/tasa-edge", "ssh": "/tmp/tasa-edge"}

#: Runs ``CMD...`` with stdout/stderr to OUT/ERR and writes its peak RSS (VmHWM, kB) to OUT.hwm.
WRAPPER = r"""#!/bin/sh
# usage: tasa-run.sh OUT ERR CMD [ARGS...]   (tasa-edge device harness)
out="$1"; err="$2"; shift 2
"$@" >"$out" 2>"$err" &
pid=$!
peak=0
while :; do
  st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$pid/status" 2>/dev/null)
  [ -z "$st" ] && break
  [ "$st" = Z ] && break
  v=$(sed -n 's/^VmHWM:[^0-9]*\([0-9][0-9]*\).*/\1/p' "/proc/$pid/status" 2>/dev/null)
  [ -n "$v" ] && [ "$v" -gt "$peak" ] && peak=$v
  sleep 0.05 2>/dev/null || sleep 1
done
wait "$pid"
rc=$?
echo "$peak" >"$out.hwm"
exit $rc
"""


class DeviceError(TasaError):
    """The device (not one model) is in a state that ends the run: unreachable, a llama.cpp tool
    missing, out of memory, storage full, a command timed out."""


#: ssh / scp / adb failing to reach the device (not a command failing on it)
_UNREACHABLE_RE = re.compile(
    r"Connection refused|Connection timed out|Connection reset|Connection closed|No route to host|"
    r"Could not resolve hostname|Network is unreachable|lost connection|Permission denied \(|"
    r"Host key verification failed|kex_exchange_identification|device offline|device unauthorized|"
    r"no devices/emulators found|device '[^']*' not found|error: closed", re.I)
#: a tool's output when it ran out of memory (RLIMIT_AS, cgroup limit, the kernel OOM killer)
_OOM_RE = re.compile(r"bad_alloc|Cannot allocate memory|out of memory|failed to allocate|unable to allocate|"
                     r"mmap: 12\b|ENOMEM|mem_buffer != NULL", re.I)
_NOSPACE_RE = re.compile(r"No space left on device|ENOSPC|Disk quota exceeded|EDQUOT", re.I)


def tool_path(name: str) -> str:
    """The executable for ``adb`` / ``ssh`` / ``scp`` (``$TASA_ADB`` ... override), or a TasaError."""
    var = ENV_VARS[name]
    exe = os.environ.get(var) or name
    found = shutil.which(exe)
    if found is None:
        hint = "install Android platform-tools" if name == "adb" else "install an OpenSSH client"
        raise TasaError(f"{exe} not found: {hint} or set {var} to the executable")
    return found


def _last_line(*texts: str) -> str:
    for t in texts:
        lines = [ln.strip() for ln in (t or "").splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return ""


# ============================================================================ transports
class Transport:
    kind = ""

    def __init__(self, remote_dir: str | None = None, timeout: float = 3600.0):
        rd = remote_dir or DEFAULT_REMOTE_DIR[self.kind]
        if not rd.startswith("/") or not _SAFE_REMOTE_PATH.fullmatch(rd) or rd.rstrip("/") == "":
            raise TasaError(f"remote directory {rd!r}: give an absolute path of letters, digits and ._/+=@%,- "
                            "(not / itself)")
        self.remote_dir = rd.rstrip("/")
        self.timeout = timeout

    label = ""

    def _run(self, argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, capture_output=True, text=True, errors="replace",
                                  timeout=timeout or self.timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.label}: '{' '.join(argv[:3])} ...' timed out after {timeout or self.timeout:.0f} s") from None
        except OSError as exc:
            raise TasaError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None

    def shell(self, cmd: str, timeout: float | None = None) -> tuple[int, str, str]:
        raise NotImplementedError

    def push(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "remote_dir": self.remote_dir}


class AdbTransport(Transport):
    kind = "adb"

    def __init__(self, serial: str | None = None, remote_dir: str | None = None, timeout: float = 3600.0):
        super().__init__(remote_dir, timeout)
        self.adb = tool_path("adb")
        self.serial = serial or None

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"adb:{self.serial or '?'}"

    def _base(self) -> list[str]:
        return [self.adb] + (["-s", self.serial] if self.serial else [])

    def check(self) -> None:
        r = self._run([self.adb, "devices"], timeout=60)
        if r.returncode != 0:
            raise TasaError(f"`adb devices` failed: {_last_line(r.stderr, r.stdout) or f'exit {r.returncode}'}")
        listed = []
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and not line.startswith(("List of devices", "*")):
                listed.append((parts[0], parts[1]))
        ready = [s for s, st in listed if st == "device"]
        if self.serial:
            state = dict(listed).get(self.serial)
            if state is None:
                others = ", ".join(s for s, _ in listed) or "none"
                raise TasaError(f"Android device {self.serial} is not attached (adb devices lists: {others})")
            if state != "device":
                raise TasaError(f"Android device {self.serial} is '{state}': unlock it and allow USB debugging")
            return
        if not ready:
            extra = f" ({', '.join(f'{s} is {st}' for s, st in listed)})" if listed else ""
            raise TasaError("no Android device attached: `adb devices` lists none ready" + extra
                            + "; connect one with USB debugging enabled, or use --target local")
        if len(ready) > 1:
            raise TasaError(f"several Android devices attached ({', '.join(ready)}): choose one with --serial")
        self.serial = ready[0]

    def shell(self, cmd: str, timeout: float | None = None) -> tuple[int, str, str]:
        r = self._run(self._base() + ["shell", cmd], timeout)
        if r.returncode != 0 and _UNREACHABLE_RE.search(_last_line(r.stderr)):
            raise DeviceError(f"lost the Android device {self.serial or ''}: {_last_line(r.stderr)}".replace("  ", " "))
        return r.returncode, r.stdout, r.stderr

    def push(self, local: Path, remote: str) -> None:
        r = self._run(self._base() + ["push", str(local), remote])
        if r.returncode != 0:
            msg = _last_line(r.stderr, r.stdout)
            if _UNREACHABLE_RE.search(msg):
                raise DeviceError(f"lost the Android device {self.serial or ''}: {msg}".replace("  ", " "))
            raise TasaError(f"adb push {local} -> {remote} failed: {msg}")


_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_])?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)$")
_SAFE_REMOTE_PATH = re.compile(r"[A-Za-z0-9_./+=@%,-]+")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def validate_host(host: str, user: str | None = None, port: int | None = None, where: str = "--host") -> None:
    """The one check for ssh targets, from ``--host`` or a profile's ``transport``: a host name or
    IP address (never starting with ``-``, no spaces, quotes or shell characters), a plain user
    name, a port in 1..65535."""
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        raise TasaError(f"{where}: invalid ssh host {host!r} (a host name or IP address)")
    if user is not None and user != "" and (not isinstance(user, str) or not _USER_RE.fullmatch(user)):
        raise TasaError(f"{where}: invalid ssh user {user!r}")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise TasaError(f"{where}: ssh port must be 1..65535, got {port!r}")


class SshTransport(Transport):
    kind = "ssh"
    OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]

    def __init__(self, host: str, user: str | None = None, port: int | None = None,
                 remote_dir: str | None = None, timeout: float = 3600.0):
        if not host:
            raise TasaError("the ssh target needs a host: pass --host (or a profile with transport.host)")
        validate_host(host, user, port, where="ssh target")
        super().__init__(remote_dir, timeout)
        self.ssh, self.scp = tool_path("ssh"), tool_path("scp")
        self.host, self.user, self.port = host, user or None, port
        self.dest = f"{user}@{host}" if user else host

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"ssh:{self.dest}"

    def shell(self, cmd: str, timeout: float | None = None) -> tuple[int, str, str]:
        port = ["-p", str(self.port)] if self.port and self.port != 22 else []
        r = self._run([self.ssh] + self.OPTIONS + port + ["--", self.dest, cmd], timeout)
        if r.returncode == 255:  # ssh's own failure (connect, authentication, lost connection)
            raise DeviceError(f"cannot reach {self.dest} over ssh: {_last_line(r.stderr) or 'exit 255'}")
        return r.returncode, r.stdout, r.stderr

    def check(self) -> None:
        rc, out, err = self.shell("echo tasa-edge-ok", timeout=60)
        if rc != 0 or "tasa-edge-ok" not in out:
            raise DeviceError(f"cannot reach {self.dest} over ssh: {_last_line(err, out) or f'exit {rc}'}")

    def push(self, local: Path, remote: str) -> None:
        port = ["-P", str(self.port)] if self.port and self.port != 22 else []
        # legacy scp (-O) expands the remote path in a remote shell, SFTP-mode scp does not: only
        # paths that read the same either way are sent; "--" ends the options
        if not _SAFE_REMOTE_PATH.fullmatch(remote):
            raise TasaError(f"remote path {remote!r} has characters scp may expand; rename the file")
        r = self._run([self.scp, "-q"] + self.OPTIONS + port + ["--", str(local), f"{self.dest}:{remote}"])
        if r.returncode != 0:
            msg = _last_line(r.stderr, r.stdout)
            if _UNREACHABLE_RE.search(msg):
                raise DeviceError(f"cannot reach {self.dest} over ssh: {msg}")
            raise TasaError(f"scp {local} -> {self.dest}:{remote} failed: {msg}")


# ============================================================================ llama.cpp tools on the device
@dataclass
class ToolRun:
    rc: int
    stdout: str
    stderr: str
    peak_rss_bytes: int | None
    seconds: float


class DeviceTools:
    """llama-bench / llama-perplexity on a device reached through ``transport``."""

    def __init__(self, transport: Transport, bin_dir: str | Path | None = None):
        self.t = transport
        self.bin_dir = Path(bin_dir).expanduser() if bin_dir else None
        self.rd = transport.remote_dir
        self.exe: dict[str, str] = {}
        self.env = ""

    def sh(self, cmd: str, timeout: float | None = None, what: str = "") -> str:
        rc, out, err = self.t.shell(cmd, timeout)
        if rc != 0:
            raise TasaError(f"{self.t.label}: {what or cmd.split()[0]} failed: {_last_line(err, out) or f'exit {rc}'}")
        return out

    def setup(self) -> None:
        q = shlex.quote
        try:
            self.sh(f"mkdir -p {q(self.rd)}/bin {q(self.rd)}/models {q(self.rd)}/run", what="mkdir")
        except DeviceError:
            raise
        except TasaError as exc:  # a read-only or full device directory ends the run
            raise DeviceError(str(exc)) from None
        local_wrapper = _write_temp("tasa-run.sh", WRAPPER)
        self.push_file(local_wrapper, f"{self.rd}/tasa-run.sh", force=True)  # small; always this version
        if self.bin_dir is not None:
            if not self.bin_dir.is_dir():
                raise TasaError(f"--bin-dir {self.bin_dir} is not a directory")
            missing = [t for t in TOOLS if not (self.bin_dir / t).is_file()]
            if missing:
                raise TasaError(f"{self.bin_dir} has no {', '.join(missing)} (build them for the device: see devices/README.md)")
            files = [p for p in sorted(self.bin_dir.iterdir()) if p.is_file()]
            for p in files:
                self.push_file(p, f"{self.rd}/bin/{p.name}")
            self.sh("chmod 755 " + " ".join(q(f"{self.rd}/bin/{p.name}") for p in files), what="chmod")
            self.exe = {t: f"{self.rd}/bin/{t}" for t in TOOLS}
            self.env = f"LD_LIBRARY_PATH={q(self.rd + '/bin')}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} "
        else:
            rc, out, _ = self.t.shell("for t in " + " ".join(TOOLS) + "; do command -v $t || echo MISSING:$t; done")
            missing = [ln.split(":", 1)[1] for ln in out.split() if ln.startswith("MISSING:")]
            if rc != 0 or missing:
                raise DeviceError(f"{self.t.label}: no llama.cpp binaries ({', '.join(missing) or 'llama-bench'} not on the "
                                "device's PATH): build them for the device (devices/README.md) and pass --bin-dir")
            self.exe = dict(zip(TOOLS, out.split()))

    def remote_size(self, remote: str) -> int | None:
        rc, out, _ = self.t.shell(f"wc -c < {shlex.quote(remote)} 2>/dev/null")
        out = out.strip()
        return int(out) if rc == 0 and out.isdigit() else None

    def push_file(self, local: Path, remote: str | None = None, force: bool = False) -> str:
        """Push ``local`` (a file) unless a file of the same size is already there (or ``force``);
        returns the remote path.

        A push that fails or leaves a file of the wrong size removes the partial file; when the
        device directory has less free space than the file needs (``df``) that is a :class:`DeviceError`."""
        local = Path(local)
        remote = remote or f"{self.rd}/models/{local.name}"
        size = local.stat().st_size
        if not force and self.remote_size(remote) == size:
            return remote
        err = None
        try:
            self.t.push(local, remote)
        except DeviceError:
            raise
        except TasaError as exc:
            err = str(exc)
        if err is None and self.remote_size(remote) == size:
            return remote
        self.t.shell(f"rm -f {shlex.quote(remote)}")
        free = self.free_bytes(remote.rsplit("/", 1)[0] or "/")
        if (free is not None and free < size) or (err and _NOSPACE_RE.search(err)):
            room = f"{free / 2**20:.1f} MiB free" if free is not None else "no space left"
            raise DeviceError(f"{self.t.label}: device storage full: {room} in {remote.rsplit('/', 1)[0]}, "
                              f"{local.name} needs {size / 2**20:.1f} MiB")
        raise TasaError(err or f"{self.t.label}: {remote} has the wrong size after the push")

    def free_bytes(self, remote_dir: str) -> int | None:
        """Free bytes in ``remote_dir``'s file system (``df -Pk``; toybox and busybox too), or None."""
        q = shlex.quote(remote_dir)
        rc, out, _ = self.t.shell(f"df -Pk {q} 2>/dev/null || df -k {q}")
        rows = [ln.split() for ln in out.splitlines() if ln.strip()]
        if rc != 0 or len(rows) < 2 or len(rows[-1]) < 4 or not rows[-1][3].isdigit():
            return None
        return int(rows[-1][3]) * 1024

    def binary_arch(self, tool: str = "llama-bench") -> str | None:
        """The CPU architecture ``tool`` is built for (its ELF header, read on the device), or None."""
        rc, out, _ = self.t.shell(f"od -A n -t u1 -N 20 {shlex.quote(self.exe[tool])}")
        b = [int(x) for x in out.split() if x.isdigit()]
        if rc != 0 or len(b) < 20 or b[:4] != [0x7F, ord("E"), ord("L"), ord("F")]:
            return None
        machine = b[18] | (b[19] << 8) if b[5] == 1 else (b[18] << 8) | b[19]
        return ELF_MACHINES.get(machine, f"elf-machine-{machine}")

    def push_dir_model(self, local: Path) -> str:
        raise TasaError("ONNX models are benchmarked on the local target only (onnxruntime is not on the device)")

    def run(self, tool: str, args: list[str], tag: str, timeout: float | None = None) -> ToolRun:
        q = shlex.quote
        out, err = f"{self.rd}/run/{tag}.out", f"{self.rd}/run/{tag}.err"
        argv = " ".join(q(a) for a in [self.exe[tool]] + args)
        cmd = (f"cd {q(self.rd)} && {self.env}sh {q(self.rd + '/tasa-run.sh')} {q(out)} {q(err)} {argv}; "
               f"rc=$?; cat {q(out)}; echo '@@TASA-ERR'; cat {q(err)}; echo '@@TASA-HWM'; "
               f"cat {q(out + '.hwm')} 2>/dev/null; echo \"@@TASA-RC $rc\"")
        t0 = time.perf_counter()
        rc, text, serr = self.t.shell(cmd, timeout)
        secs = time.perf_counter() - t0
        m = re.search(r"@@TASA-RC (\d+)", text)
        if not m:
            raise TasaError(f"{self.t.label}: could not run {tool}: {_last_line(serr, text) or f'exit {rc}'}")
        body = text[: m.start()]
        stdout, _, rest = body.partition("@@TASA-ERR\n")
        stderr, _, hwm = rest.partition("@@TASA-HWM\n")
        hwm = hwm.strip()
        return ToolRun(int(m.group(1)), stdout, stderr, int(hwm) * 1024 if hwm.isdigit() and int(hwm) > 0 else None, secs)

    def _check(self, r: ToolRun, tool: str, model: str | None = None) -> None:
        if r.rc == 0:
            return
        last = _last_line(r.stderr, r.stdout)
        what = f"{tool} on {model.rsplit('/', 1)[-1]}" if model else tool
        if r.rc == 127 and re.search(r"not found|No such file", r.stderr + r.stdout):
            raise DeviceError(f"{self.t.label}: {tool} is missing on the device: {last}")
        if _NOSPACE_RE.search(r.stderr + r.stdout):
            raise DeviceError(f"{self.t.label}: device storage full while running {what}: {last}")
        short = None if r.rc == 137 or _OOM_RE.search(r.stderr + r.stdout) else self._memory_short(model)
        if r.rc == 137 or _OOM_RE.search(r.stderr + r.stdout) or short:
            why = "killed (SIGKILL, the kernel's OOM killer)" if r.rc == 137 else last
            raise DeviceError(f"{self.t.label}: out of memory on the device: {what} failed (exit {r.rc})"
                              + (f" -- {short}" if short else "") + f": {why}")
        raise TasaError(f"{self.t.label}: {tool} exited with {r.rc}: {last}")

    def _memory_short(self, model: str | None) -> str | None:
        """After a failed run: does the device's address-space limit (``ulimit -v``) or its available
        memory fall short of the model file? (llama.cpp prints only "failed to load model" then.)
        Returns what falls short, or None."""
        if not model:
            return None
        need = self.remote_size(model)
        rc, out, _ = self.t.shell("ulimit -v 2>/dev/null; sed -n 's/^MemAvailable:[^0-9]*\\([0-9]*\\).*/\\1/p' /proc/meminfo")
        vals = out.split()
        if rc != 0 or need is None or not vals:
            return None
        limit = int(vals[0]) * 1024 if vals[0].isdigit() else None
        avail = int(vals[1]) * 1024 if len(vals) > 1 and vals[1].isdigit() else None
        for what, v in (("address-space limit (ulimit -v)", limit), ("available memory", avail)):
            if v is not None and v < need + 64 * 2**20:
                return f"{what} {v / 2**20:.0f} MiB, model file {need / 2**20:.1f} MiB"
        return None

    def build_info(self, tool: str = "llama-bench"):
        """``tool --version`` run on the device: the llama.cpp build it will measure with (the fields
        are None where the binary prints no build info)."""

        r = self.run(tool, ["--version"], f"version-{tool}", timeout=60)
        return parse_build_info(r.stdout + "\n" + r.stderr, self.exe[tool])

    def bench(self, model: str, pp: int, tg: int, reps: int, threads: int, tag: str) -> dict:
        args = ["-m", model, "-p", str(pp), "-n", str(tg), "-r", str(reps), "-t", str(threads), "-o", "json"]
        r = self.run("llama-bench", args, tag)
        self._check(r, "llama-bench", model)
        res = parse_llama_bench(r.stdout)
        res["peak_rss_bytes"] = r.peak_rss_bytes
        res["wall_s"] = r.seconds
        return res

    def kld_base(self, ref: str, text: str, base: str, ctx: int, threads: int) -> dict:
        args = ["-m", ref, "-f", text, "-c", str(ctx), "-b", str(ctx), "-t", str(threads), "--kl-divergence-base", base]
        r = self.run("llama-perplexity", args, "kld-base")
        self._check(r, "llama-perplexity", ref)
        return parse_perplexity(r.stdout + "\n" + r.stderr, kld=False)

    def kld(self, model: str, base: str, ctx: int, threads: int, tag: str) -> dict:
        args = ["-m", model, "-c", str(ctx), "-b", str(ctx), "-t", str(threads),
                "--kl-divergence-base", base, "--kl-divergence"]
        r = self.run("llama-perplexity", args, tag)
        self._check(r, "llama-perplexity", model)
        res = parse_perplexity(r.stdout + "\n" + r.stderr, kld=True)
        res["peak_rss_bytes"] = r.peak_rss_bytes
        return res


def _write_temp(name: str, text: str) -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="tasa-edge-"))
    p = d / name
    p.write_text(text)
    p.chmod(0o755)
    return p


# ============================================================================ parsers
_NUM = r"(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|nan|inf)"
_PPL_PATTERNS = {
    "ppl": rf"Mean\s+PPL\(Q\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
    "ppl_base": rf"Mean\s+PPL\(base\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
    "kld": rf"Mean\s+KLD:\s*{_NUM}\s*±\s*{_NUM}",
    "kld_max": rf"Maximum\s+KLD:\s*{_NUM}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
    "kld_median": rf"Median\s+KLD:\s*{_NUM}",
    "delta_p": rf"Mean\s+Δp:\s*{_NUM}\s*±\s*{_NUM}\s*%",
    "top1": rf"Same top p:\s*{_NUM}\s*±\s*{_NUM}\s*%",
    "final_ppl": rf"Final estimate: PPL = {_NUM} \+/- {_NUM}",
    "load_ms": rf"load time\s*=\s*{_NUM}\s*ms",
    "load_stamp": r"(?m)^(\d+)\.(\d+)\.(\d+)\.(\d+) I system_info:",
}


def parse_perplexity(text: str, kld: bool = True) -> dict:
    """The summary ``llama-perplexity`` prints (``--kl-divergence`` statistics, or the final PPL).

    Percentages (same top p, Δp) are returned as fractions; ``*_se`` are the ± standard errors."""
    out: dict = {"tool": "llama-perplexity"}
    for key, pat in _PPL_PATTERNS.items():
        m = None
        for m in re.finditer(pat, text):
            pass  # last occurrence (summary after the per-chunk table)
        if m is None:
            continue
        vals = [float(g) for g in m.groups()]
        scale = 0.01 if key in ("delta_p", "top1") else 1.0
        name = {"final_ppl": "ppl" if "ppl" not in out else "final_ppl"}.get(key, key)
        if key == "load_ms":
            out["load_s"] = vals[0] / 1000.0
            continue
        if key == "load_stamp":  # newer llama.cpp: no perf "load time"; the log stamp (min.s.ms.us) when ready
            out.setdefault("load_s", 60 * vals[0] + vals[1] + vals[2] / 1e3 + vals[3] / 1e6)
            continue
        out[name] = vals[0] * scale
        if len(vals) > 1:
            out[name + "_se"] = vals[1] * scale
    if kld and "kld" not in out:
        raise TasaError(f"llama-perplexity printed no 'Mean KLD' line: {_last_line(text)[:160]!r}")
    if not kld and "ppl" not in out and "final_ppl" not in out:
        raise TasaError(f"llama-perplexity printed no perplexity: {_last_line(text)[:160]!r}")
    return out
