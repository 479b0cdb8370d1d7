"""Where training numbers go: a progress line, JSON lines (``--metrics-file``), TensorBoard events, Weights &
Biases (``--wandb-project``).

Only the rank that logs (global rank 0) opens files; every other rank gets a logger that writes nothing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Optional

log = logging.getLogger("megalm")


def setup_logging(rank: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stdout, format=f"[rank {rank}] %(asctime)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S", level=logging.INFO if rank == 0 else logging.WARNING)


class MetricsLogger:
    def __init__(self, enabled: bool, metrics_file: Optional[str] = None, tensorboard_dir: Optional[str] = None,
                 wandb: Optional[dict] = None):
        """``wandb``: ``{"project", "name", "dir", "config"}`` to log to Weights & Biases as well."""
        self.enabled = enabled
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        if wandb and wandb.get("project"):
            import wandb as wandb_lib

            if wandb.get("dir"):
                os.makedirs(wandb["dir"], exist_ok=True)
            self._wandb = wandb_lib.init(project=wandb["project"], name=wandb.get("name"), dir=wandb.get("dir"),
                                         config=wandb.get("config"))
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self._jsonl = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)

    def record(self, row: dict) -> None:
        """One JSON line, and each number as a TensorBoard scalar at ``row['iteration']``."""
        if not self.enabled:
            return
        if self._jsonl:
            self._jsonl.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in row.items()
                   if k != "iteration" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, row["iteration"])
        if self._wandb:
            self._wandb.log(numbers, step=row["iteration"])

    def progress(self, row: dict, train_iters: int) -> None:
        if not self.enabled:
            return
        parts = [f"iter {row['iteration']}/{train_iters}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.3e}",
                 f"grad norm {row['grad_norm']:.3f}", f"{row['tokens_per_sec']:.0f} tokens/s",
                 f"{row['ms_per_iter']:.1f} ms/iter", f"{row['tflops_per_device']:.3f} TFLOP/s/device"]
        if "mfu" in row:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        if row.get("skipped"):
            parts.append(f"skipped {row['skipped']}")
        if "loss_scale" in row:
            parts.append(f"loss scale {row['loss_scale']:.0f}")
        if "pipeline_wait_ms" in row:
            parts.append(f"stage-0 p2p wait {100 * row['pipeline_wait_ms'] / row['ms_per_iter']:.0f}%")
        timed = [(k[len("time_"):-len("_ms")].replace("_", "-"), v) for k, v in row.items() if k.startswith("time_")]
        if timed:
            parts.append("ms: " + ", ".join(f"{name} {ms:.1f}" for name, ms in timed))
        if "dpo_rewards_accuracy" in row:
            parts.append(f"rewards chosen {row['dpo_rewards_chosen']:.4f} rejected {row['dpo_rewards_rejected']:.4f} "
                         f"accuracy {row['dpo_rewards_accuracy']:.2f}")
        if "moe_aux_loss" in row:
            parts.append(f"moe aux {row['moe_aux_loss']:.4f} load max/mean {row['moe_load_imbalance']:.2f}")
        if "moe_z_loss" in row:
            parts.append(f"z {row['moe_z_loss']:.4f}")
        if "moe_dropped_share" in row:
            parts.append(f"dropped {100 * row['moe_dropped_share']:.1f}%")
        log.info(" | ".join(parts))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
