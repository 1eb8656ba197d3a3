"""What this machine has: GPUs (through nvidia-smi), CPU cores and RAM.

nvidia-smi rather than torch.cuda: asking torch would create a CUDA context in the web process,
holding GPU memory that a training run needs.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass, field

import psutil

QUERY = "index,name,memory.total,memory.used,compute_cap"


@dataclass
class GPU:
    index: int
    name: str
    memory_gib: float
    used_gib: float
    compute_capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= (8, 0)  # Ampere and newer


@dataclass
class Hardware:
    gpus: list[GPU] = field(default_factory=list)
    cpu_count: int = 1
    ram_gib: float = 0.0


def parse_nvidia_smi(text: str) -> list[GPU]:
    """GPUs from the rows of `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits`."""
    gpus = []
    for row in text.strip().splitlines():
        index, name, total, used, capability = (part.strip() for part in row.split(","))
        major, minor = capability.split(".")
        gpus.append(GPU(int(index), name, round(float(total) / 1024, 1), round(float(used) / 1024, 1),
                        (int(major), int(minor))))
    return gpus


def detect_gpus() -> list[GPU]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    gpus = parse_nvidia_smi(result.stdout)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # the numbering a child process will see is that of the visible ones
        keep = [int(i) for i in visible.split(",") if i.strip().isdigit()]
        gpus = [g for g in gpus if g.index in keep]
    return gpus


def detect_hardware() -> Hardware:
    return Hardware(
        gpus=detect_gpus(),
        cpu_count=os.cpu_count() or 1,
        ram_gib=round(psutil.virtual_memory().total / 2**30, 1),
    )
