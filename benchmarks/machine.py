"""What every benchmark prints about where it ran: the figures are only comparable on the same machine and load."""
import os
from pathlib import Path

import torch

MUSHVISION4 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mushvision4"


def machine_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def load_line() -> str:
    return "load average {:.2f} {:.2f} {:.2f} (1/5/15 min)".format(*os.getloadavg())
