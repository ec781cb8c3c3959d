"""Device profiles: ``devices/profiles/*.toml`` (or any TOML file) describing a benchmark target.

A profile names the transport (``local`` / ``adb`` / ``ssh``), the threads and memory the device
offers, the weight formats that have fast kernels there (the analysis menu of ``tasa-edge analyze
--profile``), and how to reach it::

    name = "pixel-8"
    description = "..."
    target = "adb"                       # local | adb | ssh
    [cpu]       arch = "arm64-v8a"  threads = 4  features = ["neon", "dotprod", "i8mm"]
    [memory]    ram_gib = 8  limit_gib = 3.5      # 0 = unknown / no limit
    [formats]   gguf = ["Q4_0", "IQ4_NL", "Q4_K", "Q8_0"]  onnx = ["int4_b32"]  onnx_accuracy_level = 4
    [transport] serial = ""  remote_dir = "/data/local/tmp/tasa-edge"  bin_dir = ""   # adb
                host = "raspberrypi.local"  user = ""  port = 22                     # ssh

Unknown keys, wrong types and unknown formats are one-line :class:`TasaError`\\ s naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tasa_edge import formats
from tasa_edge.costmodel import KernelProfile, kernel_profile_from_dict, read_profile_toml
from tasa_edge.errors import TasaError

PROFILE_DIR = Path(__file__).parent / "profiles"
TARGETS = ("local", "adb", "ssh")
GIB = 1024**3

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "": {"name": str, "description": str, "target": str},
    "cpu": {"arch": str, "threads": int, "features": list},
    "memory": {"ram_gib": (int, float), "limit_gib": (int, float)},
    "formats": {"gguf": list, "onnx": list, "onnx_accuracy_level": int},
    "transport": {"serial": str, "host": str, "user": str, "port": int, "remote_dir": str, "bin_dir": str},
}
#: tables written by ``tasa-edge profile`` (devices/kernel_profile.py)
MEASURED_TABLES = ("machine", "measured", "kernels")
_TRANSPORT_KEYS = {"local": set(), "adb": {"serial", "remote_dir", "bin_dir"},
                   "ssh": {"host", "user", "port", "remote_dir", "bin_dir"}}


@dataclass
class Profile:
    name: str
    target: str
    description: str = ""
    arch: str = ""
    threads: int | None = None            # None: all usable cores
    features: list[str] = field(default_factory=list)
    ram_bytes: int | None = None
    limit_bytes: int | None = None        # memory the model may use (RLIMIT_AS on local)
    gguf_formats: list[str] = field(default_factory=list)
    onnx_formats: list[str] = field(default_factory=list)
    onnx_accuracy_level: int = 4
    transport: dict = field(default_factory=dict)
    path: str | None = None
    kernels: "KernelProfile | None" = None     # measured kernel costs (tasa-edge profile), if any

    def menu(self, target: str) -> tuple[str, ...]:
        """The formats with fast kernels on this device for ``target`` (the analysis menu of
        ``tasa-edge analyze --profile``); a one-line error when the profile lists none."""
        fm = {"gguf": self.gguf_formats, "onnx": self.onnx_formats}.get(target)
        if not fm:
            raise TasaError(f"device profile {self.name} lists no {target} formats")
        return tuple(fm)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "target": self.target, "description": self.description, "arch": self.arch,
            "threads": self.threads, "features": list(self.features), "ram_bytes": self.ram_bytes,
            "limit_bytes": self.limit_bytes,
            "formats": {"gguf": list(self.gguf_formats), "onnx": list(self.onnx_formats),
                        "onnx_accuracy_level": self.onnx_accuracy_level},
            "transport": dict(self.transport), "path": self.path,
        }


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(spec: str | Path) -> Profile:
    """A shipped profile by name (``pixel-8``) or a TOML file path."""
    s = str(spec)
    p = Path(s).expanduser()
    if not (s.endswith(".toml") or p.exists()):
        p = PROFILE_DIR / f"{s}.toml"
        if not p.exists():
            raise TasaError(f"unknown device profile '{s}' (shipped: {', '.join(list_profiles())}; or give a .toml path)")
    if not p.is_file():
        raise TasaError(f"device profile not found: {p}")
    return profile_from_dict(read_profile_toml(p), where=str(p))


def profile_from_dict(data: dict, where: str = "profile") -> Profile:
    """Validate a parsed profile table and build a :class:`Profile`."""
    _check_types(data, where)
    kernels = kernel_profile_from_dict(data, where)
    name = data.get("name")
    if not name:
        raise TasaError(f"{where}: 'name' is required")
    target = data.get("target")
    if target not in TARGETS:
        raise TasaError(f"{where}: 'target' must be one of {', '.join(TARGETS)}, got {target!r}")
    cpu, mem, fmts, tr = (data.get(k, {}) for k in ("cpu", "memory", "formats", "transport"))

    threads = cpu.get("threads", 0)
    if threads < 0:
        raise TasaError(f"{where}: cpu.threads must be >= 0 (0 = all cores), got {threads}")
    features = cpu.get("features", [])
    if not all(isinstance(f, str) for f in features):
        raise TasaError(f"{where}: cpu.features must be a list of strings")
    ram, limit = (float(mem.get(k, 0)) for k in ("ram_gib", "limit_gib"))
    if ram < 0 or limit < 0:
        raise TasaError(f"{where}: memory sizes must be >= 0")
    if ram and limit > ram:
        raise TasaError(f"{where}: memory.limit_gib ({limit:g}) exceeds memory.ram_gib ({ram:g})")

    menus = {}
    for tname in ("gguf", "onnx"):
        spec = formats.get(tname)
        listed = fmts.get(tname, [])
        if not all(isinstance(f, str) for f in listed):
            raise TasaError(f"{where}: formats.{tname} must list {tname} format names")
        try:
            menus[tname] = [spec.parse(f) for f in listed]
        except TasaError as exc:
            raise TasaError(f"{where}: formats.{tname}: {exc}") from None
    level = fmts.get("onnx_accuracy_level", 4)
    if level not in (0, 1, 2, 3, 4):
        raise TasaError(f"{where}: formats.onnx_accuracy_level must be 0..4, got {level}")

    extra = set(tr) - _TRANSPORT_KEYS[target]
    if extra:
        raise TasaError(f"{where}: transport key(s) {', '.join(sorted(extra))} do not apply to target '{target}'")
    if target == "ssh" and not tr.get("host"):
        raise TasaError(f"{where}: an ssh profile needs transport.host")
    if target == "ssh":
        from .remote import validate_host

        validate_host(tr["host"], tr.get("user"), tr.get("port"), where=f"{where}: transport")
    port = tr.get("port", 22)
    if not 0 < port < 65536:
        raise TasaError(f"{where}: transport.port must be 1..65535, got {port}")
    rdir = tr.get("remote_dir")
    if rdir is not None and not rdir.startswith("/"):
        raise TasaError(f"{where}: transport.remote_dir must be an absolute path, got {rdir!r}")

    return Profile(
        name=name, target=target, description=data.get("description", ""), arch=cpu.get("arch", ""),
        threads=threads or None, features=list(features),
        ram_bytes=int(ram * GIB) or None, limit_bytes=int(limit * GIB) or None,
        gguf_formats=menus["gguf"], onnx_formats=menus["onnx"], onnx_accuracy_level=level,
        transport=dict(tr), path=None if where == "profile" else where, kernels=kernels,
    )


def _check_types(data: dict, where: str) -> None:
    if not isinstance(data, dict):
        raise TasaError(f"{where}: a profile must be a TOML table")
    for key, val in data.items():
        if key in MEASURED_TABLES:
            continue        # the measured part: validated by tasa_edge.costmodel.kernel_profile_from_dict
        if key in _SCHEMA and key:
            if not isinstance(val, dict):
                raise TasaError(f"{where}: [{key}] must be a table")
            for k, v in val.items():
                want = _SCHEMA[key].get(k)
                if want is None:
                    raise TasaError(f"{where}: unknown key '{key}.{k}' (known: {', '.join(_SCHEMA[key])})")
                if not isinstance(v, want) or isinstance(v, bool):
                    raise TasaError(f"{where}: '{key}.{k}' has the wrong type ({type(v).__name__})")
        elif key in _SCHEMA[""]:
            if not isinstance(val, str):
                raise TasaError(f"{where}: '{key}' must be a string")
        else:
            known = sorted(set(_SCHEMA[""]) | {k for k in _SCHEMA if k})
            raise TasaError(f"{where}: unknown key '{key}' (known: {', '.join(known)})")
