"""The device check's tooling, on the CPU: the scripts parse, the dry run's knn step runs, and the fat-binary
pruning of bench/gpu_wheels.py keeps exactly the chosen cubins (what makes the faiss GPU build fit a device call)."""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _wheels_module():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "bench" / "gpu_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scripts_parse():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
    for name in ("gpu_check.py", "gpu_wheels.py"):
        compile((ROOT / "bench" / name).read_text(), name, "exec")


def _container(entries):
    """A fat binary: 16-byte header, then per entry a 64-byte header (kind, size, sm at 28) and its payload."""
    body = b""
    for kind, sm, payload in entries:
        head = bytearray(64)
        struct.pack_into("<HHIQ", head, 0, kind, 0x101, 64, len(payload))
        struct.pack_into("<I", head, 28, sm)
        body += bytes(head) + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def _entries(data, offset):
    magic, _, hsize, fsize = struct.unpack_from("<IHHQ", data, offset)
    assert magic == 0xBA55ED50
    out, p = [], offset + hsize
    while p < offset + hsize + fsize:
        kind, _, ehs, size = struct.unpack_from("<HHIQ", data, p)
        out.append((kind, struct.unpack_from("<I", data, p + 28)[0], bytes(data[p + ehs:p + ehs + size])))
        p += ehs + size
    return out, offset + hsize + fsize


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build a shared library")
def test_prune_fatbin_keeps_only_the_chosen_cubins_in_place(tmp_path):
    gw = _wheels_module()
    first = [(2, 80, b"A" * 40), (2, 90, b"B" * 24), (1, 90, b"C" * 16)]  # sm_80 cubin, sm_90 cubin, PTX
    second = [(2, 75, b"E" * 8), (2, 90, b"D" * 8), (2, 120, b"F" * 32)]
    blob = _container(first) + _container(second)
    src = tmp_path / "fat.c"
    src.write_text('__attribute__((section(".nv_fatbin"), used, aligned(8))) const unsigned char fat[] = {'
                   + ",".join(str(b) for b in blob) + "};\nint f(void) { return fat[0]; }\n")
    so = tmp_path / "libfat.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    data = bytearray(so.read_bytes())
    size = len(data)
    start, length = gw._section(data, ".nv_fatbin")
    assert data[start:start + len(blob)] == blob
    stats = gw.prune_fatbin(data, {90})
    assert stats == {"containers": 2, "kept": 2, "dropped": 4, "without a kept entry": 0}
    assert len(data) == size  # nothing moves: the registration code points at the containers' addresses
    got, nxt = _entries(data, start)
    assert got == [(2, 90, b"B" * 24)]
    assert nxt - start < len(_container(first))
    assert not any(data[nxt:start + len(_container(first))])  # the freed bytes are zeros
    got2, _ = _entries(data, start + len(_container(first)))
    assert got2 == [(2, 90, b"D" * 8)]
    so.write_bytes(data)  # still a loadable library
    import ctypes

    assert ctypes.CDLL(str(so)).f() == 0x50  # first byte of the magic, little-endian
    assert gw.prune_fatbin(bytearray(b"not an elf"), {90}) == {}


def test_dry_run_knn_step_prints_its_figures_and_writes_the_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--only", "knn",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "knn: torch CPU: 300 x 5000 x 64, k=100" in done.stdout
    assert "knn: GPU: skipped: no CUDA" in done.stdout
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["steps"]["knn"]["ok"] and res["steps"]["knn"]["torch_recall_vs_numpy"] == 1.0
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("knn:") >= 3
