"""Launch a training script on one process, or on several CPU processes with `accelerate launch`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(
    script: Path, output_dir: Path, processes: int, *extra: str, timeout: float, environment: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `script OUTPUT_DIR EXTRA...`; a run longer than `timeout` seconds raises `subprocess.TimeoutExpired`."""
    if processes == 1:
        command = [sys.executable, str(script), str(output_dir), *extra]
    else:
        # accelerate launches CPU processes with torchrun only through `--multi_gpu`.
        # Without a GPU each process then trains on the CPU with the gloo backend.
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            str(script), str(output_dir), *extra,
        ]  # fmt: skip
    variables = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(environment or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=variables)
