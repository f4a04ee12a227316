"""The machine line every benchmark prints first (figures hold only for the machine named)."""

import os
import platform

import torch


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
            f"(torch threads {torch.get_num_threads()}), {gpu}, torch {torch.__version__}")
