"""benchmarks/gpu_check.sh: the CPU smoke run prints the table and one JSON line with every part's row, and a
part that crashes or hangs is reported in its own row (its whole process group ended)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362), ("NVIDIA A10", 125), ("NVIDIA A10G", 70),
    ("NVIDIA L4", 121), ("Tesla T4", None), ("NVIDIA GeForce RTX 3090", None)])
def test_peak_flops_by_card_name(gpu_check, name: str, tflops: float | None) -> None:
    peak = gpu_check.peak_bf16_flops(name)
    assert (peak is None and tflops is None) or peak == tflops * 1e12


def fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake_python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def test_a_crashing_part_is_its_rows_error(gpu_check, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "executable", fake_python(tmp_path, "echo 'Traceback (most recent call last):' >&2\n"
                                                                 "echo 'RuntimeError: boom in the part' >&2\nexit 3"))
    rows = gpu_check.run_part_process("fp16", sizes=gpu_check.CPU_SMOKE, smoke=True, timeout=30, log_dir=tmp_path)
    assert [r["status"] for r in rows] == ["error"]
    assert rows[0]["check"] == gpu_check.TITLES["fp16"]
    assert "RuntimeError: boom in the part" in rows[0]["detail"] and "exit 3" in rows[0]["detail"]


def test_a_hanging_part_times_out_and_its_processes_end(gpu_check, tmp_path: Path, monkeypatch) -> None:
    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setattr(sys, "executable", fake_python(tmp_path, f"sleep 60 &\necho $! > {pid_file}\nsleep 60"))
    started = time.monotonic()
    rows = gpu_check.run_part_process("attention", sizes=gpu_check.CPU_SMOKE, smoke=True, timeout=1, log_dir=tmp_path)
    assert time.monotonic() - started < 10
    assert rows[0]["status"] == "timeout after 1 s"
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not running(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} that the part started is still running")


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for whoever reaps orphans here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_cpu_smoke_prints_the_table_and_json(gpu_check, tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--log-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "AUDIOLDM_ATTENTION": "", "GPU_CHECK_PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    report = json.loads(lines[-1])
    rows = {row["check"]: row for row in report["rows"]}
    assert table[0] == "| check | status | speed | memory | detail |" and len(table) == 1 + len(rows)
    assert report["mode"] == "cpu-smoke" and report["device"] == "CPU"
    logs = {path.name: path.read_text()[-2000:] for path in tmp_path.glob("*.log")}
    attention = [row for check, row in rows.items() if check.startswith("attention")]
    assert {row["status"] for row in attention if row.get("backend") == "sdpa"} == {"agrees"}, logs
    assert len([row for row in attention if row.get("backend") == "math"]) == 2
    xformers = {row["status"] for row in attention if row["check"].startswith("attention xformers")}
    assert xformers == {"needs CUDA" if importlib.util.find_spec("xformers") else "not installed"}
    step = rows[gpu_check.TITLES["s_zero2_bf16"]]
    assert step["status"] == "ok", logs
    assert step["flops_per_step"] > 1e9 and step["samples_per_s"] > 0 and step["mfu"] is None
    assert rows[gpu_check.TITLES["m_offload"]]["status"] == "fits", logs
    assert rows[gpu_check.TITLES["fp16"]]["status"] == "needs CUDA"
    encoded = rows[gpu_check.TITLES["encoded"]]  # the real encode-shards, then train.py on both shard sets
    assert encoded["status"] == "ok" and encoded["encoded_samples_per_s"] > 0, logs

