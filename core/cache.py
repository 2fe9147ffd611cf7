"""The JSON tuning cache: per environment fingerprint, per dispatch key, the winner and every verdict.

One file, ``tuning-cache.json``, in ``SWITCHYARD_CACHE_DIR`` or the user's cache directory. Writes
take a file lock, re-read the file, merge this process's entries in, and replace the file atomically
(write to a temporary file in the same directory, fsync, ``os.replace``), so several processes
tuning at once lose no entries and nobody ever reads a torn file. A corrupt file or one of an
unknown schema is moved aside with a warning. JSON only: a cache must never execute code.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

SCHEMA = 1
FILE_NAME = "tuning-cache.json"
LIBRARY_ISA_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
ENV_CACHE_DIR = "SWITCHYARD_CACHE_DIR"


class CacheWarning(UserWarning):
    """The tuning cache file was unreadable and has been moved aside."""


def cache_dir() -> Path:
    """Where Switchyard keeps its tuning cache and compiled kernels."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("switchyard"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(plugin_versions: Mapping[str, str]) -> dict[str, Any]:
    """What must be equal for a cached decision to carry over to this process."""
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "plugins": dict(sorted(plugin_versions.items())),
        "device": device,
        "cpu": cpu_model(),
        # the instruction sets torch's own kernels (the peers' and the torch backend's) and its libraries
        # run at: a decision tuned with AVX-512 and AMX in oneDNN's bfloat16 matmul does not carry over to
        # a process that holds them to AVX2
        "torch_isa": [torch.backends.cpu.get_cpu_capability()] + [os.environ.get(v, "") for v in LIBRARY_ISA_VARS],
        "threads": torch.get_num_threads(),
        "platform": sys.platform,
    }


def fingerprint_id(fp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def entry_key(op: str, key: tuple[Any, ...]) -> str:
    return op + "|" + json.dumps(list(key), separators=(",", ":"), default=str)


class TuningCache:
    """Read and merge-write the cache file for one environment fingerprint."""

    def __init__(self, directory: Path | None, fp: Mapping[str, Any]) -> None:
        self.directory = Path(directory) if directory is not None else cache_dir()
        self.path = self.directory / FILE_NAME
        self.fingerprint = dict(fp)
        self.fid = fingerprint_id(fp)
        self._entries: dict[str, dict[str, Any]] = {}
        self._mtime: float | None = None
        self._mutex = threading.Lock()

    def lookup(self, op: str, key: tuple[Any, ...]) -> dict[str, Any] | None:
        """This environment's entry for (op, key), re-reading the file if another process changed it."""
        with self._mutex:
            self._refresh()
            return self._entries.get(entry_key(op, key))

    def store(self, op: str, key: tuple[Any, ...], entry: Mapping[str, Any]) -> None:
        """Merge one entry into the file (atomic, under the lock). Failing to write only warns."""
        ek = entry_key(op, key)
        record = dict(entry, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with self._mutex:
            self._entries[ek] = record
            try:
                self._write({ek: record})
            except OSError as e:
                warnings.warn(f"switchyard: could not write the tuning cache {self.path}: {e}", CacheWarning, stacklevel=2)

    def entries(self) -> dict[str, dict[str, Any]]:
        with self._mutex:
            self._refresh()
            return dict(self._entries)

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return
        if mtime == self._mtime:
            return
        data = self._read()
        env = data.get("environments", {}).get(self.fid, {})
        self._entries.update(env.get("entries", {}))
        self._mtime = mtime

    def _read(self) -> dict[str, Any]:
        """The file's contents; a corrupt or foreign file is moved aside and treated as empty."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("environments"), dict):
                raise ValueError(f"unknown schema {data.get('schema') if isinstance(data, dict) else type(data).__name__!r}")
            for fid, env in data["environments"].items():
                entries = env.get("entries") if isinstance(env, dict) else None
                if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
                    raise ValueError(f"malformed environment {fid!r}: expected an object whose 'entries' map keys "
                                     "to objects")
        except ValueError as e:
            aside = self.path.with_name(f"{FILE_NAME}.corrupt-{int(time.time() * 1000)}-{os.getpid()}")
            try:
                os.replace(self.path, aside)
            except OSError:
                aside = self.path
            warnings.warn(
                f"switchyard: the tuning cache {self.path} was unreadable ({e}); moved it to {aside} and starting empty",
                CacheWarning,
                stacklevel=4,
            )
            return {}
        return data

    def _write(self, new: Mapping[str, Mapping[str, Any]]) -> None:
        from filelock import FileLock

        self.directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=60):
            data = self._read() or {"schema": SCHEMA, "environments": {}}
            env = data["environments"].setdefault(self.fid, {"fingerprint": self.fingerprint, "entries": {}})
            env["entries"].update(new)
            fd, tmp = tempfile.mkstemp(prefix=".tuning-cache-", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            self._entries.update(env["entries"])
            self._mtime = self.path.stat().st_mtime_ns
