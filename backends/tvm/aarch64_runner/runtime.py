"""Set up what running an aarch64 artifact on another host takes, once, in a cache folder.

1. Check the host tools: ``qemu-aarch64`` (Debian package qemu-user) and
   ``aarch64-linux-gnu-g++`` with its sysroot ``/usr/aarch64-linux-gnu``
   (g++-aarch64-linux-gnu).
2. Unpack ``libtvm_runtime.so``, ``libtvm_ffi.so`` and the tvm_ffi headers from the aarch64
   wheels of the installed apache-tvm and apache-tvm-ffi versions. The wheels come from
   ``pip download`` unless they already lie in ``<cache>/wheels``, which is how to set up a
   host without network access. Only these files are kept; the wheels are deleted.
3. Cross-compile ``runner.cc`` against them. The binary's name carries a hash of its source
   and the versions, so a changed runner or TVM gets a new build.

The cache is ``$GRAPHCOMP_AARCH64_CACHE``, else ``$XDG_CACHE_HOME/graphcomp/aarch64``, else
``~/.cache/graphcomp/aarch64``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from graphcomp.errors import BackendError

logger = logging.getLogger(__name__)

QEMU = "qemu-aarch64"
CROSS_COMPILER = "aarch64-linux-gnu-g++"
SYSROOT = Path("/usr/aarch64-linux-gnu")
RUNNER_SOURCE = Path(__file__).with_name("runner.cc")
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
DOWNLOAD_TIMEOUT_S = 600
COMPILE_TIMEOUT_S = 300


class EmulatorUnavailableError(BackendError):
    """A tool, library or wheel needed to run aarch64 code on this host is missing."""


@dataclass(frozen=True)
class EmulationRuntime:
    """A cross-compiled runner and the aarch64 TVM libraries it loads."""

    runner: Path
    library_dirs: tuple[Path, ...]
    sysroot: Path

    def command(self, arguments: list[str]) -> list[str]:
        """Return the command line that runs the runner under qemu with ``arguments``."""
        return [QEMU, "-L", str(self.sysroot), str(self.runner), *arguments]

    def environment(self) -> dict[str, str]:
        """Return this process's environment with the aarch64 TVM libraries on the path."""
        return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(map(str, self.library_dirs))}


def default_cache_dir() -> Path:
    """Return the cache folder for the aarch64 runtime (see the module docstring)."""
    if os.environ.get("GRAPHCOMP_AARCH64_CACHE"):
        return Path(os.environ["GRAPHCOMP_AARCH64_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "graphcomp" / "aarch64"


def missing_tools() -> list[str]:
    """List the host tools for emulation that are missing, each with the package to install."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (Debian package qemu-user)")
    if shutil.which(CROSS_COMPILER) is None:
        missing.append(f"{CROSS_COMPILER} (Debian package g++-aarch64-linux-gnu)")
    if not (SYSROOT / "lib" / "libc.so.6").is_file():
        missing.append(f"the aarch64 C library in {SYSROOT} (Debian package libc6-arm64-cross)")
    return missing


def prepare_runtime(cache_dir: Path | None = None, download: bool = True) -> EmulationRuntime:
    """Check the tools, unpack the TVM libraries and build the runner, reusing the cache.

    Raises EmulatorUnavailableError naming what is missing and how to get it, or when
    ``download`` is False and the wheels are neither unpacked nor in ``<cache>/wheels``.
    """
    missing = missing_tools()
    if missing:
        raise EmulatorUnavailableError(
            "running aarch64 code on this host needs " + ", ".join(missing)
            + "; install them with apt-get install qemu-user g++-aarch64-linux-gnu"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmulatorUnavailableError(
            f"cannot create the cache folder {cache}: {exc}; set GRAPHCOMP_AARCH64_CACHE to a "
            "writable folder"
        ) from exc
    tvm_dir = _unpacked_wheel(cache, "apache-tvm", ["lib/libtvm_runtime.so"], download)
    ffi_dir = _unpacked_wheel(cache, "apache-tvm-ffi", ["lib/libtvm_ffi.so", "include/"],
                              download)
    library_dirs = (tvm_dir / "lib", ffi_dir / "lib")
    runner = _built_runner(cache, ffi_dir / "include", library_dirs)
    return EmulationRuntime(runner=runner, library_dirs=library_dirs, sysroot=SYSROOT)


def _unpacked_wheel(cache: Path, package: str, members: list[str], download: bool) -> Path:
    """Return ``<cache>/<package>-<version>`` holding ``members`` of the package's aarch64
    wheel, unpacking the wheel first if needed. A member ending in "/" is a folder."""
    version = importlib.metadata.version(package)
    folder = cache / f"{package}-{version}"
    if folder.is_dir():
        return folder

    wheel = _find_wheel(cache / "wheels", package, version)
    if wheel is None and download:
        _download_wheel(cache / "wheels", package, version)
        wheel = _find_wheel(cache / "wheels", package, version)
    if wheel is None:
        raise EmulatorUnavailableError(
            f"the aarch64 wheel of {package}=={version} is not in {cache / 'wheels'}"
            + ("" if download else " and downloading is off")
            + f"; get it with: pip download --no-deps --only-binary=:all: --platform "
            f"{WHEEL_PLATFORM} --python-version {_python_version()} -d {cache / 'wheels'} "
            f"{package}=={version}"
        )
    _extract(wheel, package, members, folder)
    wheel.unlink(missing_ok=True)
    return folder


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    prefix = f"{package.replace('-', '_')}-{version}-"
    found = sorted(folder.glob(f"{prefix}*aarch64*.whl")) if folder.is_dir() else []
    return found[0] if found else None


def _python_version() -> str:
    # Only apache-tvm-ffi's wheel is tagged with a Python version. Its libtvm_ffi.so does not
    # use Python, so any version would do; this one matches the installed x86 wheel.
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _download_wheel(folder: Path, package: str, version: str) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--only-binary=:all:", "--platform", WHEEL_PLATFORM,
        "--python-version", _python_version(), "--dest", str(folder), f"{package}=={version}",
    ]
    logger.info("downloading the aarch64 wheel of %s==%s", package, version)
    try:
        subprocess.run(command, capture_output=True, text=True, check=True,
                       timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise EmulatorUnavailableError(
            f"downloading the aarch64 wheel of {package}=={version} failed: "
            f"{exc.stderr.strip()[-1000:]}. Without access to PyPI, copy the wheel into "
            f"{folder}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise EmulatorUnavailableError(
            f"downloading the aarch64 wheel of {package}=={version} timed out after "
            f"{DOWNLOAD_TIMEOUT_S} s"
        ) from exc


def _extract(wheel: Path, package: str, members: list[str], folder: Path) -> None:
    # Wheels keep their files under the import name: tvm/lib/..., tvm_ffi/include/...
    root = "tvm_ffi/" if package == "apache-tvm-ffi" else "tvm/"
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=folder.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                relative = name.removeprefix(root)
                wanted = any(
                    relative.startswith(member) if member.endswith("/") else relative == member
                    for member in members
                )
                if name.startswith(root) and wanted and not name.endswith("/"):
                    target = staging / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(name))
        absent = [member for member in members if not (staging / member).exists()]
        if absent:
            raise EmulatorUnavailableError(f"{wheel.name} has no {', '.join(absent)}")
        _publish(staging, folder)
    except (OSError, zipfile.BadZipFile) as exc:
        raise EmulatorUnavailableError(f"cannot unpack {wheel}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("unpacked %s into %s", wheel.name, folder)


def _publish(staging: Path, folder: Path) -> None:
    # A rename is atomic, so readers never see half a folder; when another process won the
    # race, its folder has the same content.
    try:
        staging.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise


def _built_runner(cache: Path, include: Path, library_dirs: tuple[Path, ...]) -> Path:
    source = RUNNER_SOURCE.read_bytes()
    key = hashlib.sha256(source + b"\0" + "\0".join(map(str, library_dirs)).encode())
    runner = cache / f"runner-{key.hexdigest()[:16]}"
    if runner.is_file():
        return runner

    staging = cache / f".{runner.name}.{os.getpid()}"
    command = [CROSS_COMPILER, "-std=c++17", "-O2", "-I", str(include), "-o", str(staging),
               str(RUNNER_SOURCE)]
    for folder in library_dirs:
        command += ["-L", str(folder)]
    command += ["-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi"]
    try:
        subprocess.run(command, capture_output=True, text=True, check=True,
                       timeout=COMPILE_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise BackendError(
            f"cross-compiling {RUNNER_SOURCE} failed:\n{exc.stderr.strip()[-3000:]}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise BackendError(
            f"cross-compiling {RUNNER_SOURCE} timed out after {COMPILE_TIMEOUT_S} s"
        ) from exc
    staging.rename(runner)  # atomic, so a concurrent build never reads half a file
    logger.info("built the aarch64 runner %s", runner)
    return runner
