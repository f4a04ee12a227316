"""The machine line every benchmark prints first (figures hold only for the machine named)."""

import os
import platform

import torch


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
            f"(torch threads {torch.get_num_threads()}), {gpu}, torch {torch.__version__}")


def run_header(script: str, argv=None) -> str:
    """``machine: ...; load average at start ...; command: python bench/<script> <args>``:
    the first line of a result file, naming what produced it and where."""
    import sys

    args = " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()[0]
    return f"machine: {machine()}; load average at start {load:.2f}; command: python bench/{script} {args}"
