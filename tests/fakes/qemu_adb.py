#!/usr/bin/env python3
"""Stand-in ``adb`` for an emulated aarch64 "phone": the device's storage is a local directory and
its aarch64 programs run under qemu-user (``qemu-aarch64``), so llama.cpp's real tools cross-built
for aarch64 (``make tools-aarch64``) run as they would on a phone. Not shipped in the package.

Environment:

* ``QEMU_ADB_ROOT`` (required): the local directory that holds the device's ``/data`` and ``/sdcard``
  (``/data/local/tmp/x`` on the device is ``$QEMU_ADB_ROOT/data/local/tmp/x`` here);
* ``QEMU_ADB_SERIAL`` (default ``qemu-aarch64``), ``QEMU_ADB_STATE`` (default ``device``; e.g.
  ``offline``, ``unauthorized``): what ``adb devices`` lists;
* ``QEMU_ADB_QEMU`` (default ``qemu-aarch64`` on PATH, else ``qemu-aarch64-static``);
* ``QEMU_ADB_LOG``: append every call here.

Subcommands (those tasa-edge's transport and a person use): ``devices [-l]``, ``get-state``,
``get-serialno``, ``wait-for-device``, ``-s SERIAL ...``, ``push LOCAL... REMOTE``, ``pull REMOTE
[LOCAL]``, ``shell [CMD...]`` and ``exec-out CMD...``. ``shell`` runs the command line in ``sh`` on
this machine with device paths (``/data/...``, ``/sdcard/...``) mapped into ``QEMU_ADB_ROOT``; a
program that is an aarch64 ELF file is started as ``qemu-aarch64 [-L /usr/aarch64-linux-gnu] PROG``
where the shell would execute it: as the first word of a simple command, or as an argument of a
program starter (``sh``, ``exec``, ``env``, ``nice``, ``nohup``, ``time``, ``timeout``, ``taskset``).
The "device" otherwise is this machine: ``uname -m`` says x86_64, ``/proc`` is the host's (which is
how the bench report knows the speeds are emulated).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

SEPARATORS = re.compile(r"(&&|\|\||;|\||&|\n)")
DEVICE_PATH = re.compile(r"(?<![\w./-])/(data|sdcard)(?=/|\b)")
LAUNCHERS = {"sh", "exec", "env", "nice", "nohup", "time", "timeout", "taskset"}
EM_AARCH64 = 183


def die(msg: str, code: int = 1):
    print(msg, file=sys.stderr)
    sys.exit(code)


ROOT = os.environ.get("QEMU_ADB_ROOT") or die("qemu_adb: set QEMU_ADB_ROOT to the device's directory")
SERIAL = os.environ.get("QEMU_ADB_SERIAL", "qemu-aarch64")
STATE = os.environ.get("QEMU_ADB_STATE", "device")


def qemu() -> list[str]:
    exe = os.environ.get("QEMU_ADB_QEMU") or shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if not exe:
        die("qemu_adb: qemu-aarch64 not found (apt-get install qemu-user)", 126)
    sysroot = "/usr/aarch64-linux-gnu"
    return [exe] + (["-L", sysroot] if os.path.isdir(sysroot) else [])


def local(path: str) -> str:
    """A device path -> the file under ROOT (paths outside /data and /sdcard are the host's)."""
    return DEVICE_PATH.sub(lambda m: ROOT.rstrip("/") + m.group(0), path)


def is_aarch64(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            h = fh.read(20)
    except OSError:
        return False
    if len(h) < 20 or h[:4] != b"\x7fELF":
        return False
    order = "little" if h[5] == 1 else "big"
    return int.from_bytes(h[18:20], order) == EM_AARCH64


def _rewrite(segment: str) -> str:
    words = list(re.finditer(r"\S+", segment))
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[i].group()):
        i += 1  # VAR=value prefixes
    if i == len(words):
        return segment
    starter = os.path.basename(words[i].group()) in LAUNCHERS
    for w in reversed(words[i:] if starter else [words[i]]):
        if is_aarch64(w.group()):
            segment = segment[:w.start()] + " ".join(qemu()) + " " + w.group() + segment[w.end():]
    return segment


def translate(cmd: str) -> str:
    """The device command line as this machine runs it (paths mapped, aarch64 programs under qemu)."""
    parts = SEPARATORS.split(local(cmd))
    return "".join(p if SEPARATORS.fullmatch(p) else _rewrite(p) for p in parts)


def main(argv: list[str]) -> int:
    if os.environ.get("QEMU_ADB_LOG"):
        with open(os.environ["QEMU_ADB_LOG"], "a") as fh:
            fh.write(f"{time.time():.2f} adb " + " ".join(argv) + "\n")
    args = list(argv)
    serial = None
    while args and args[0] in ("-s", "-d", "-e", "-t"):
        if args[0] in ("-s", "-t"):
            if len(args) < 2:
                die(f"adb: option {args[0]} needs an argument")
            serial = args[1] if args[0] == "-s" else serial
            args = args[2:]
        else:
            args = args[1:]
    if not args:
        die("adb: no command given (qemu_adb: devices, push, pull, shell, exec-out, get-state)")
    cmd, rest = args[0], args[1:]
    if cmd == "devices":
        print("List of devices attached")
        print(f"{SERIAL}\t{STATE}" + (" product:qemu_aarch64 model:qemu_aarch64 device:qemu" if "-l" in rest else ""))
        print()
        return 0
    if cmd == "start-server" or cmd == "kill-server":
        return 0
    if serial is not None and serial != SERIAL:
        die(f"adb: device '{serial}' not found")
    if STATE != "device":
        die(f"adb: device {STATE}" if STATE != "unauthorized" else
            "adb: device unauthorized. Allow USB debugging on the device.")
    if cmd == "get-state":
        print(STATE)
        return 0
    if cmd == "get-serialno":
        print(SERIAL)
        return 0
    if cmd == "wait-for-device":
        return 0
    if cmd == "push":
        if len(rest) < 2:
            die("adb: push requires an argument")
        *srcs, dst = rest
        ldst = local(dst)
        for src in srcs:
            if not os.path.isfile(src):
                die(f"adb: error: cannot stat '{src}': No such file or directory")
            target = os.path.join(ldst, os.path.basename(src)) if dst.endswith("/") or os.path.isdir(ldst) else ldst
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            t0 = time.perf_counter()
            try:
                shutil.copyfile(src, target)
            except OSError as exc:
                die(f"adb: error: failed to copy '{src}' to '{dst}': remote {exc.strerror}")
            n = os.path.getsize(src)
            print(f"{src}: 1 file pushed, 0 skipped. ({n} bytes in {time.perf_counter() - t0:.3f}s)")
        return 0
    if cmd == "pull":
        if not rest:
            die("adb: pull requires an argument")
        src, dst = rest[0], rest[1] if len(rest) > 1 else "."
        lsrc = local(src)
        if not os.path.isfile(lsrc):
            die(f"adb: error: failed to stat remote object '{src}': No such file or directory")
        target = os.path.join(dst, os.path.basename(src)) if os.path.isdir(dst) else dst
        shutil.copyfile(lsrc, target)
        print(f"{src}: 1 file pulled, 0 skipped.")
        return 0
    if cmd in ("shell", "exec-out"):
        if not rest:
            die("qemu_adb: interactive shell not supported; give a command")
        line = " ".join(rest)  # adb joins the arguments with spaces, the device's sh parses them
        return subprocess.run(["sh", "-c", translate(line)], stdin=subprocess.DEVNULL, cwd="/").returncode
    die(f"adb: unknown command {cmd}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
