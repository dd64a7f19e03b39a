"""Fill ``.whl/`` for ``bench/gpu_check.sh``: a faiss GPU build that loads on the device machine, in < 64 MiB.

    python bench/gpu_wheels.py [--out .whl] [--cache build/gpu-wheels] [--keep-sm 90]      (make gpu-wheels)

The device machine (an H200, sm_90) has Python 3.12, torch 2.11+cu130 and CUDA 13 libraries only
(nvidia-cuda-runtime, -cublas, -curand, -cusolver, -cusparse, -nvjitlink, -nvrtc, nccl-cu13), no
faiss, and no network; what a call carries (the working tree included) is limited to 64 MiB. No
published faiss GPU wheel fits (sizes of the wheels, pip download, 2026-12):

=============================  ========  ======================================================
wheel                          size      why not as it is
=============================  ========  ======================================================
faiss-gpu 1.15.1 (abi3)        135.3 MB  CUDA 12: needs nvidia-cublas-cu12 (581 MB), not there
faiss-gpu-cuvs 1.15.1 (abi3)   119.2 MB  CUDA >= 13.2 runtime + libcuvs-cu13 (222 MB)
faiss-gpu-cu13-cuvs 1.15.0     81.2 MB   cp312 manylinux_2_39, CUDA 13.0; + libcuvs-cu13 (222 MB),
                                         libraft-cu13 (17.8 MB), librmm-cu13 (4.5 MB), rapids-logger
faiss-gpu-cu12 1.14.1.post1    48.4 MB   sm_70 / sm_80 machine code only, no PTX: no kernel for
                                         sm_90; and CUDA 12 (nvidia-cublas-cu12, 581 MB)
faiss-cuda 1.14.3.post0        106.5 MB  CUDA 12.8 (nvidia-cublas-cu12)
=============================  ========  ======================================================

So this script takes faiss-gpu-cu13-cuvs 1.15.0 and its RAPIDS libraries (308 MB of wheels) and
keeps only what an sm_90 device runs: in every ``.nv_fatbin`` section (the GPU code of a shared
library) each fat binary keeps its sm_90 cubins and drops the others (sm_75/80/86/100/120 and PTX;
the freed bytes are zeroed and compress to nothing); headers, CMake files and dist-info are left
out. The result is one ``.tar.xz`` of a site folder (about 60 MB), which ``gpu_check.sh``
unpacks into ``/tmp/site/<name>`` and ``gpu_check.py`` tries like any other candidate (a faiss
already installed, then each folder). The CUDA 13 libraries themselves are the machine's own
(its torch's ``nvidia/cu13`` wheels). Whether it loads is only known on the device: the check
reports it, and falls back to torch CUDA search when it does not.

Wheels are downloaded with pip (``--no-deps``, the device's Python tags) into ``--cache``
(ignored by git); ``--out`` gets only what travels: the ``.tar.xz`` and ``manifest.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

#: (name, version, platforms): faiss first; the RAPIDS libraries its cuVS build links.
WHEELS = (
    ("faiss-gpu-cu13-cuvs", "1.15.0", ("manylinux_2_39_x86_64",)),
    ("libcuvs-cu13", "26.6.0", ("manylinux_2_28_x86_64",)),
    ("libraft-cu13", "26.6.0", ("manylinux_2_28_x86_64",)),
    ("librmm-cu13", "26.6.0", ("manylinux_2_28_x86_64",)),
    ("rapids-logger", "0.2.3", ("manylinux_2_28_x86_64",)),
)
BUNDLE = "faiss-gpu-cu13-cuvs-1.15.0-sm90"
#: What travels in a device call: the working tree plus the carried paths.
DEVICE_LIMIT = 64 * 2**20
FATBIN_MAGIC = 0xBA55ED50
_SKIP = ("/include/", "/cmake/", ".dist-info/", "/lib64/rapids/")


def download(cache: Path) -> list[Path]:
    """pip-download each wheel of :data:`WHEELS` for CPython 3.12 into ``cache`` (kept between runs)."""
    cache.mkdir(parents=True, exist_ok=True)
    files = []
    for name, version, platforms in WHEELS:
        stem = name.replace("-", "_")
        have = sorted(cache.glob(f"{stem}-{version}-*.whl"))
        if not have:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", "-d", str(cache), f"{name}=={version}"]
            for p in platforms:
                cmd += ["--platform", p]
            subprocess.run(cmd, check=True)
            have = sorted(cache.glob(f"{stem}-{version}-*.whl"))
        files.append(have[-1])
    return files


def _section(data: bytes | bytearray, name: str) -> tuple[int, int] | None:
    """(file offset, size) of an ELF64 section, or None."""
    if data[:4] != b"\x7fELF":
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple:
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    names = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        start = names + h[0]
        if data[start:data.index(b"\0", start)].decode() == name:
            return h[4], h[5]
    return None


def prune_fatbin(data: bytearray, keep_sm: set[int]) -> Counter:
    """Keep only the cubins of ``keep_sm`` in every fat binary of ``data``'s ``.nv_fatbin`` section,
    in place: each container's kept entries are moved to its start, its size field set to theirs,
    the rest zeroed (container addresses, which the registration code points at, do not move).

    Returns counts: containers, entries kept / dropped, containers left without a kept entry."""
    stats: Counter = Counter()
    where = _section(data, ".nv_fatbin")
    if where is None:
        return stats
    off, end_section = where[0], where[0] + where[1]
    while off + 16 <= end_section:
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", data, off)
        if magic != FATBIN_MAGIC:
            off += 8
            continue
        p, end = off + hsize, off + hsize + fsize
        kept = []
        while p < end:
            kind, _, ehsize, esize = struct.unpack_from("<HHIQ", data, p)
            sm, = struct.unpack_from("<I", data, p + 28)
            if kind == 2 and sm in keep_sm:  # 2: ELF (cubin), 1: PTX
                kept.append(bytes(data[p:p + ehsize + esize]))
            stats["kept" if kind == 2 and sm in keep_sm else "dropped"] += 1
            p += ehsize + esize
        body = b"".join(kept)
        data[off + hsize:end] = body + bytes(fsize - len(body))
        struct.pack_into("<Q", data, off + 8, len(body))
        stats["containers"] += 1
        stats["without a kept entry"] += not kept
        off = end
    return stats


def bundle(wheels: list[Path], out: Path, keep_sm: set[int]) -> dict:
    """One ``.tar.xz`` of every wheel's files (less :data:`_SKIP`), GPU code pruned to ``keep_sm``."""
    out.mkdir(parents=True, exist_ok=True)
    tar_path = out / f"{BUNDLE}.tar"
    pruned: dict[str, dict[str, int]] = {}
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                for info in sorted(z.infolist(), key=lambda i: i.filename):
                    name = info.filename
                    if info.is_dir() or any(s in "/" + name for s in _SKIP):
                        continue
                    data = bytearray(z.read(info))
                    if ".so" in Path(name).name:
                        stats = prune_fatbin(data, keep_sm)
                        if stats:
                            pruned[name] = dict(stats)
                    t = tarfile.TarInfo(name)
                    t.size, t.mode, t.mtime = len(data), (info.external_attr >> 16) & 0o777 or 0o644, 0
                    tar.addfile(t, io.BytesIO(bytes(data)))
    xz = out / f"{BUNDLE}.tar.xz"
    xz.unlink(missing_ok=True)
    if shutil.which("xz"):
        subprocess.run(["xz", "-T0", "-6", "-f", str(tar_path)], check=True)
    else:  # single-threaded, same format
        import lzma

        with open(tar_path, "rb") as src, lzma.open(xz, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tar_path.unlink()
    return {"bundle": xz.name, "bytes": xz.stat().st_size, "keep_sm": sorted(keep_sm),
            "wheels": {w.name: w.stat().st_size for w in wheels}, "pruned": pruned}


def _tree_bytes() -> int:
    """Bytes of the files a device call sends besides the carried ones (tracked + untracked, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(Path(f.decode()).stat().st_size for f in files if f and Path(f.decode()).is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(".whl"), help="what travels (carry it: .whl)")
    ap.add_argument("--cache", type=Path, default=Path("build/gpu-wheels"), help="downloaded wheels")
    ap.add_argument("--keep-sm", default="90", help="compute capabilities to keep, comma-separated")
    a = ap.parse_args()
    manifest = bundle(download(a.cache), a.out, {int(s) for s in a.keep_sm.split(",")})
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, size in manifest["wheels"].items():
        print(f"wheel   {size / 1e6:8.1f} MB  {name}")
    tree = _tree_bytes()
    carried = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file())
    total = tree + carried
    print(f"bundle  {manifest['bytes'] / 1e6:8.1f} MB  {a.out / manifest['bundle']} (sm {a.keep_sm} only)")
    print(f"device call: working tree {tree / 2**20:.1f} MiB + {a.out} {carried / 2**20:.1f} MiB = "
          f"{total / 2**20:.1f} MiB of {DEVICE_LIMIT / 2**20:.0f} MiB"
          + ("" if total <= DEVICE_LIMIT else "  -- OVER THE LIMIT: gpu_check falls back to torch CUDA search"))
    return 0 if total <= DEVICE_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
