"""Which devices a worker trains on, decided without importing torch in the worker's parent."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """One concurrent trial: a device and the environment its slot process gets."""

    index: int
    device: str  # "cpu" or "cuda:N"
    torch_threads: int  # 0 = torch's default

    def child_env(self) -> dict[str, str]:
        visible = self.device.split(":", 1)[1] if self.device.startswith("cuda:") else ""
        return {"CUDA_VISIBLE_DEVICES": visible}

    @property
    def trainer_device(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"


def detect_gpus() -> list[str]:
    """GPU indices from nvidia-smi (respecting CUDA_VISIBLE_DEVICES), or none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def parse_devices(text: str) -> list[str]:
    """`auto` | `cpu` | `cuda:0,1` → ["cpu"] or ["cuda:0", "cuda:1"]."""
    text = text.strip()
    if text == "auto":
        gpus = detect_gpus()
        return [f"cuda:{g}" for g in gpus] or ["cpu"]
    if text == "cpu":
        return ["cpu"]
    if text.startswith("cuda:"):
        ids = [i.strip() for i in text.removeprefix("cuda:").split(",")]
        if ids and all(i.isdigit() for i in ids):
            return [f"cuda:{i}" for i in ids]
    raise ValueError(f"bad --devices {text!r}: use auto, cpu or cuda:0,1,...")


def plan_slots(devices: list[str], slots_per_device: int, cpu_count: int | None = None) -> list[Slot]:
    """Slots per device; CPU slots split the cores between them so they don't oversubscribe."""
    if slots_per_device < 1:
        raise ValueError("--slots-per-device must be at least 1")
    cores = cpu_count or os.cpu_count() or 1
    n_cpu_slots = slots_per_device * devices.count("cpu")
    threads = max(1, cores // n_cpu_slots) if n_cpu_slots else 0
    slots: list[Slot] = []
    for device in devices:
        for _ in range(slots_per_device):
            slots.append(Slot(len(slots), device, threads if device == "cpu" else 0))
    return slots
