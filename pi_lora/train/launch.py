"""Multi-process and multi-node launch through the standard launchers.

`pi-lora train RECIPE --nproc N` re-runs the same command under torchrun
(`python -m torch.distributed.run`), or under the deepspeed launcher when a hostfile is given.
The child processes find RANK / LOCAL_RANK / WORLD_SIZE in their environment and never
relaunch; the same holds when torchrun, accelerate or deepspeed started `pi-lora train`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pi_lora.core.errors import PiLoraError
from pi_lora.run.provenance import COMMAND_ENV, command_line
from pi_lora.train.distributed import process_info

LAUNCHED_VARIABLE = "PI_LORA_LAUNCHED"  # set in children: a second relaunch would recurse
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchPlan:
    """How many processes where; `nproc=None` means one per local GPU (1 without GPUs)."""

    nproc: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    hostfile: str | None = None

    def processes_per_node(self) -> int:
        import torch

        return self.nproc if self.nproc is not None else max(torch.cuda.device_count(), 1)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The launch options of `pi-lora train` (torchrun's names, hostfile as DeepSpeed's)."""
    group = parser.add_argument_group("launch (several processes or machines)")
    group.add_argument("--nproc", type=int, help="processes on this machine "
                       "(default: one per local GPU, 1 without GPUs)")
    group.add_argument("--nnodes", type=int, default=1, help="machines taking part (default: 1)")
    group.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    group.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (default: 127.0.0.1)")
    group.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT,
                       help=f"port node 0 listens on (default: {DEFAULT_MASTER_PORT})")
    group.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' lines): "
                       "launch on every host over ssh with the deepspeed launcher")
    # the deepspeed launcher appends --local_rank=N to the command it starts
    group.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def plan_from_args(args: argparse.Namespace) -> LaunchPlan:
    """Check the launch options where they are read."""
    if args.nproc is not None and args.nproc < 1:
        raise PiLoraError("must be at least 1", field="--nproc", fix="--nproc 2")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise PiLoraError(f"node rank {args.node_rank} outside 0..{args.nnodes - 1}",
                          field="--node-rank", fix="number the machines 0..nnodes-1")
    if args.hostfile and not Path(args.hostfile).is_file():
        raise PiLoraError(f"{args.hostfile} not found", field="--hostfile",
                          fix="one 'hostname slots=N' line per machine")
    return LaunchPlan(args.nproc, args.nnodes, args.node_rank, args.master_addr,
                      args.master_port, args.hostfile)


def needs_launch(plan: LaunchPlan) -> bool:
    """True in the user's process when more than one process must run."""
    if os.environ.get(LAUNCHED_VARIABLE) or process_info().launched:
        return False
    return bool(plan.hostfile) or plan.nnodes > 1 or plan.processes_per_node() > 1


def launcher_command(plan: LaunchPlan, child_args: list[str]) -> list[str]:
    """torchrun (or the deepspeed launcher for a hostfile) running `pi_lora.cli CHILD_ARGS`."""
    if plan.hostfile:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", plan.hostfile,
                   "--master_addr", plan.master_addr, "--master_port", str(plan.master_port)]
        if plan.nproc is not None:
            command += ["--num_gpus", str(plan.nproc)]
        return [*command, "--module", "pi_lora.cli", *child_args]
    return [sys.executable, "-m", "torch.distributed.run",
            "--nproc-per-node", str(plan.processes_per_node()), "--nnodes", str(plan.nnodes),
            "--node-rank", str(plan.node_rank), "--master-addr", plan.master_addr,
            "--master-port", str(plan.master_port), "-m", "pi_lora.cli", *child_args]


def relaunch(plan: LaunchPlan, child_args: list[str]) -> int:
    """Run the launcher in the foreground; its exit status is the command's."""
    command = launcher_command(plan, child_args)
    env = {**os.environ, LAUNCHED_VARIABLE: "1", COMMAND_ENV: json.dumps(command_line())}
    print(f"pi-lora: launching {plan.processes_per_node()} process(es) x {plan.nnodes} node(s): "
          f"{' '.join(command[1:6])} ...", flush=True)
    return subprocess.run(command, env=env, check=False).returncode


def maybe_relaunch(plan: LaunchPlan, child_args: list[str]) -> int | None:
    """The launcher's exit status when this process launched one, None to train in-process."""
    return relaunch(plan, child_args) if needs_launch(plan) else None


def train_child_args(recipe_path: str, overrides: list[str], resume: bool,
                     overwrite: bool) -> list[str]:
    """`pi-lora train` arguments for the launched processes (launch options dropped)."""
    args = ["train", recipe_path, *(f"--set={item}" for item in overrides)]
    return args + ["--resume"] * resume + ["--overwrite"] * overwrite
