"""Direct preference optimisation (``--dpo-data``): the loss of TRL's ``DPOTrainer`` on megalm's layouts.

A pair's sample holds ``prompt + chosen`` and ``prompt + rejected`` as two documents (``megalm.data.preference``);
the model's per-token losses give each completion's log-probability, a sum over its tokens (under context
parallelism each rank's part, summed over the group with a gradient that flows back to each part). Against the
reference model's log-probabilities ``r``:

- ``sigmoid`` (DPO): ``-log sigmoid(beta ((c - r_c) - (j - r_j)))``;
- ``ipo`` (IPO): ``((c - r_c) / n_c - (j - r_j) / n_j - 1 / (2 beta))^2``, per-token averages as TRL has them;

averaged over the pairs. Reported with it: the rewards ``beta (c - r_c)`` and ``beta (j - r_j)``, how often the
chosen one's is the larger (accuracy) and their margin, as TRL names them.

The reference is the starting model: its log-probabilities are computed once per pair, before the first step, by a
forward pass over the data under the run's own layout (with LoRA: the base, adapters switched off, so no second
model is held). They are kept in every checkpoint (``dpo_reference.pt``), so a resumed run uses the same ones, and
with ``--dpo-reference-file`` read from (or written to) a file, keyed by a digest of the data.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalm.data.loader import documents
from megalm.data.preference import CHOSEN, REJECTED
from megalm.model.lora import adapters_disabled
from megalm.parallel.context import split_batch
from megalm.parallel.mappings import reduce_from_tp
from megalm.pipeline.schedules import run_schedule
from megalm.training.checkpoint_dirs import CheckpointError

log = logging.getLogger("megalm")

REFERENCE_FILE = "dpo_reference.pt"  # in each checkpoint of a DPO run
METRICS = ("loss", "rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin")


class DPO:
    def __init__(self, beta: float, kind: str, topo):
        self.beta, self.kind, self.topo = beta, kind, topo

    def sequence_logps(self, per_token: torch.Tensor, batch: dict, device) -> tuple:
        """Each pair's (chosen, rejected) log-probability ``[b, 2]`` and completion length ``[b, 2]``."""
        mask = batch["loss_mask"].to(device)
        docs = batch["document_ids"].to(device)
        logp = -per_token.float() * mask
        which = [docs == d for d in (CHOSEN, REJECTED)]
        logps = torch.stack([(logp * w).sum(-1) for w in which], dim=-1)
        counts = torch.stack([(mask * w).sum(-1) for w in which], dim=-1)
        if self.topo.cp > 1:  # each rank holds part of every sequence
            logps = reduce_from_tp(logps, self.topo.cp_group)
            dist.all_reduce(counts, group=self.topo.cp_group)
        return logps, counts

    def loss(self, per_token: torch.Tensor, batch: dict, device) -> tuple:
        """(the micro-batch's loss, its ``METRICS``); under context parallelism every rank returns the whole loss
        (its gradient reaches this rank's part only) and a share of the metrics (the trainer sums the group's)."""
        logps, counts = self.sequence_logps(per_token, batch, device)
        ratios = logps - batch["reference_logps"].to(device)
        if self.kind == "ipo":
            average = ratios / counts.clamp_min(1.0)
            per_pair = (average[:, 0] - average[:, 1] - 1.0 / (2.0 * self.beta)) ** 2
        else:
            per_pair = -F.logsigmoid(self.beta * (ratios[:, 0] - ratios[:, 1]))
        rewards = self.beta * ratios.detach()
        report = torch.stack([per_pair.detach().mean(), rewards[:, 0].mean(), rewards[:, 1].mean(),
                              (rewards[:, 0] > rewards[:, 1]).float().mean(), (rewards[:, 0] - rewards[:, 1]).mean()])
        return per_pair.mean(), report / self.topo.cp


@torch.no_grad()
def reference_logps(trainer, dataset) -> torch.Tensor:
    """Every pair's (chosen, rejected) log-probability under the model as it is now, with adapters off:
    ``[pairs, 2]`` float64, the same on every rank. Batches of the global batch size in the data's own order
    (the last one padded with pairs whose values are dropped), through the run's pipeline schedule."""
    t, topo = trainer.cfg.train, trainer.topo
    n, gbs, mbs = len(dataset), t.global_batch_size, t.micro_batch_size
    out = torch.zeros(n, 2, dtype=torch.float64, device=trainer.device)
    dpo = trainer.dpo
    was_training = trainer.model.training
    trainer.model.eval()
    with adapters_disabled(trainer.model):
        for start in range(0, n, gbs):
            micro = []
            for j in range(gbs // (mbs * topo.dp)):
                first = start + (j * topo.dp + topo.dp_rank) * mbs
                rows = list(range(first, first + mbs))
                batch = documents([dataset.sample(i if i < n else 0) for i in rows])
                batch["valid"] = torch.tensor([i < n for i in rows])
                micro.append(split_batch(batch, topo.cp, topo.cp_rank) if topo.cp > 1 else batch)

            def forward(chunk, i, hidden):
                batch = micro[i]
                result = trainer.model(**trainer.model_inputs(batch), hidden=hidden, chunk=chunk)
                if not trainer.model.is_last_chunk(chunk):
                    return result
                logps, _ = dpo.sequence_logps(result, batch, trainer.device)
                if topo.cp_rank == 0:
                    keep = batch["valid"]
                    out[batch["sample_index"][keep]] = logps[keep.to(logps.device)].double()
                return logps.sum() * 0.0

            run_schedule(forward, trainer.comm, len(micro), topo.pp, topo.pp_rank, len(trainer.model.chunks), True)
    trainer.model.train(was_training)
    for group, size in ((topo.pp_group, topo.pp), (topo.dp_group, topo.dp), (topo.cp_group, topo.cp)):
        if size > 1:  # one stage computed it, each row on one data-parallel rank, and CP rank 0 wrote it
            dist.all_reduce(out, group=group)
    return out.cpu()


def _fingerprints(trainer) -> dict:
    return {name: ds.fingerprint for name, ds in (("train", trainer.train_ds), ("valid", trainer.valid_ds))
            if ds is not None}


def read_reference(path: str, fingerprints: dict) -> dict:
    """``{"train": [pairs, 2], "valid": ...}`` from a reference file, which must be of this run's data."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or not a torch file
        raise CheckpointError(f"{path}: not a DPO reference file ({type(exc).__name__}: {exc})") from None
    if not isinstance(saved, dict) or saved.get("fingerprints") != fingerprints:
        raise CheckpointError(f"{path}: the reference log-probabilities of other data (data digests "
                              f"{saved.get('fingerprints') if isinstance(saved, dict) else None}, this run's "
                              f"{fingerprints}); delete it to compute them again")
    return {k: saved[k] for k in fingerprints}


def write_reference(path: str, reference: dict, fingerprints: dict) -> None:
    tmp = path + ".tmp"
    torch.save({**reference, "fingerprints": fingerprints}, tmp)
    os.replace(tmp, path)


def setup_reference(trainer, checkpoint_dir) -> dict:
    """The run's reference: from the checkpoint it resumes (``checkpoint_dir``, past iteration 0), or
    ``--dpo-reference-file`` when it exists, else computed now from the model as loaded (and written to that
    file)."""
    fingerprints = _fingerprints(trainer)
    resuming = checkpoint_dir is not None and trainer.iteration > 0  # not --finetune: that starts anew
    in_checkpoint = os.path.join(checkpoint_dir, REFERENCE_FILE) if resuming else None
    given = trainer.cfg.posttrain.dpo_reference_file
    for path in (in_checkpoint, given):
        if path and os.path.isfile(path):
            log.info("DPO: reference log-probabilities from %s", path)
            return read_reference(path, fingerprints)
    if resuming:
        raise CheckpointError(f"{checkpoint_dir}: a DPO run's checkpoint without {REFERENCE_FILE}: the starting "
                              f"model is gone, so its reference cannot be computed again (give "
                              f"--dpo-reference-file)")
    reference = {"train": reference_logps(trainer, trainer.train_ds)}
    if trainer.valid_ds is not None:
        reference["valid"] = reference_logps(trainer, trainer.valid_ds)
    log.info("DPO: reference log-probabilities of %d pairs computed%s", sum(len(v) for v in reference.values()),
             " (adapters off: the base model)" if trainer.cfg.posttrain.lora_rank else "")
    if given and trainer.topo.rank == 0:
        write_reference(given, reference, fingerprints)
    if given and dist.is_initialized():
        dist.barrier()
    return reference


def save_reference(trainer, folder: str) -> None:
    """Into a checkpoint being written (rank 0)."""
    if trainer.topo.rank == 0:
        write_reference(os.path.join(folder, REFERENCE_FILE), trainer.reference, _fingerprints(trainer))
