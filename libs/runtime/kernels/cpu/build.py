"""Compiles a C kernel source of this folder with the system C compiler at first use and loads it
with ctypes.

The library is cached under `<cache_dir>/<key>/lib<name>.so`, where the key hashes everything
that changes the binary: the source and the headers beside it, the compiler, its flags and the
CPU's feature flags (`-march=native` makes the code CPU-specific, and a cache in a shared home
directory may serve several machines). A build writes a temporary file beside the target and
renames it into place, so a process never loads a half-written library, even when two compile
at once.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120
MAX_REASON_CHARS = 600


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "duet" / "kernels"


@dataclass(frozen=True, slots=True)
class CompilerOptions:
    compiler: str = "cc"  # a name on PATH or a path
    flags: tuple[str, ...] = DEFAULT_FLAGS
    cache_dir: Path = field(default_factory=default_cache_dir)


class KernelUnavailable(Exception):
    """The kernel cannot be built or loaded here; str(error) says why."""


def load_library(source: Path, options: CompilerOptions) -> ctypes.CDLL:
    """The compiled source, built now if the cache lacks it. Raises KernelUnavailable."""
    path = build_library(source, options)
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:
        raise KernelUnavailable(f"cannot load {path}: {error}") from error


def build_library(source: Path, options: CompilerOptions) -> Path:
    """Path of the compiled library of source, compiling it unless already cached."""
    try:
        # The headers beside it are part of what it compiles from (`#include "..."`).
        headers = sorted(source.parent.glob("*.h"))
        code = b"".join([source.read_bytes(), *(header.read_bytes() for header in headers)])
    except OSError as error:
        raise KernelUnavailable(f"cannot read {source}: {error}") from error
    target = options.cache_dir / _cache_key(code, options) / f"lib{source.stem}.so"
    if target.exists():
        return target
    compiler = shutil.which(options.compiler)
    if compiler is None:
        raise KernelUnavailable(f"C compiler '{options.compiler}' not found")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(handle)
    except OSError as error:
        raise KernelUnavailable(f"cannot write to {target.parent}: {error}") from error
    try:
        _compile(compiler, source, Path(temporary), options.flags)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _compile(compiler: str, source: Path, output: Path, flags: tuple[str, ...]) -> None:
    command = [compiler, *flags, str(source), "-o", str(output), "-lm"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KernelUnavailable(f"{compiler} did not run: {error}") from error
    if result.returncode != 0:
        message = result.stderr.strip()[-MAX_REASON_CHARS:]
        raise KernelUnavailable(f"{compiler} failed with status {result.returncode}: {message}")


def _cache_key(code: bytes, options: CompilerOptions) -> str:
    digest = hashlib.sha256(code)
    for part in (options.compiler, *options.flags, _cpu_flags()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """The CPU's feature flags on Linux; the machine and processor names elsewhere."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"
