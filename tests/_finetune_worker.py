"""Run under torchrun by tests/test_training_distributed.py: one fine-tuning per mode
(``ddp``, ``fsdp``) on the same ranks and process group, through the ``mechvlm finetune``
command line."""

import sys

import torch.distributed as dist

from mechvlm.cli import main

if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")  # one group for both runs (finetune reuses it)
    try:
        for mode in ("ddp", "fsdp"):
            main(["finetune", "--out", f"{out}/{mode}", *args, *(["--fsdp"] if mode == "fsdp" else [])])
    finally:
        dist.destroy_process_group()
