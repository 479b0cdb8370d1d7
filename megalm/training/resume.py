"""The Trainer's checkpoint side: saving (a failed save keeps the previous checkpoint and training goes on),
loading (the newest complete checkpoint, past damaged ones), resuming progress and random streams exactly, and
rolling back to the last checkpoint after bad steps."""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from megalm.model.lora import has_adapters
from megalm.optim.fsdp import FSDPOptimizer
from megalm.parallel.random import rank_seed
from megalm.parallel.state import host_all_reduce
from megalm.training import checkpoint as ckpt
from megalm.training import checkpoint_dirs as dirs
from megalm.training.dpo import save_reference
from megalm.training.finetune import check_lora, lora_meta
from megalm.training.stopping import TrainingDiverged

log = logging.getLogger("megalm")

class Checkpointing:
    """Mixed into ``Trainer``: uses its model, optimizer, config, topology, watchdog and progress."""

    def rollback(self, why: str) -> None:
        """Back to the last checkpoint under --save (every rank at once: ``why`` comes from all-reduced values),
        and the batches since it are skipped when the run passes them again (kept in later checkpoints and in
        ``SAVE/skipped_iterations.json``)."""
        ck, r = self.cfg.checkpoint, self.cfg.resilience
        self.finish_save(final=True)
        if not ck.save or dirs.pointed_iteration(ck.save) is None:
            raise TrainingDiverged(f"{why}; no checkpoint under --save to roll back to: stopping")
        if self.rollbacks >= r.max_rollbacks:
            raise TrainingDiverged(f"{why}; rolled back {self.rollbacks} times already (--max-rollbacks "
                                   f"{r.max_rollbacks}): stopping")
        failed_at, consumed = self.iteration, self.consumed_samples
        with self.watchdog.phase("rollback load"):
            self.load(ck.save, resume=True)
        self.rollbacks += 1
        self.skip_iterations |= set(range(self.iteration + 1, failed_at + 1))
        self.health.reset()
        dirs.record_skipped_iterations(ck.save, sorted(self.skip_iterations), self.topo.rank == 0)
        if self.topo.rank == 0:
            log.warning("%s: rolled back to iteration %d; the batches of iterations %d to %d (samples %d to %d) "
                        "will be skipped", why, self.iteration, self.iteration + 1, failed_at,
                        self.consumed_samples, consumed - 1)

    def rng_state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "tracker": self.model.rng_tracker.state_dict()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        return rng

    def checkpoint_meta(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "scaler": self.scaler.state_dict(),
                "skip_iterations": sorted(self.skip_iterations),
                "tokenizer": self.tokenizer.fingerprint,
                "layout": {"tp": self.topo.tp, "pp": self.topo.pp, "dp": self.topo.dp, "ep": self.topo.ep,
                           "cp": self.topo.cp,
                           "zero_stage": self.cfg.optim.zero_stage,
                           **({"fsdp2": True} if isinstance(self.optimizer, FSDPOptimizer) else {})},
                **({"lora": lora_meta(self.cfg)} if self.cfg.posttrain.lora_rank else {})}

    def save(self, final: bool = False) -> None:
        """Write a checkpoint. A save that fails (a full disk) keeps the previous checkpoint; training goes on
        and the next save tries again, unless this is the last one (``final``: the failure ends the run)."""
        with self.timers("checkpoint"), self.watchdog.phase("checkpoint save"):
            try:
                self.finish_save()  # the previous background save completes first
                self._save()
            except ckpt.SaveFailed as exc:
                if final:
                    raise
                log.error("%s; training goes on, the next save tries again", exc)

    def _save(self) -> None:
        ck = self.cfg.checkpoint
        if self.staging is not None:
            self.staging.reset()  # the previous save's writer is done: its snapshot memory is reused
        optimizer_state = self.optimizer.checkpoint_state(self.staging)
        extra = (lambda folder: save_reference(self, folder)) if self.dpo else None
        written = ckpt.save_checkpoint(ck.save, self.iteration, self.model, optimizer_state, self.cfg, self.topo,
                                       self.checkpoint_meta(), self.rng_state(), write_extra=extra,
                                       staging=self.staging)
        if ck.async_save:
            self.pending_save = written
        else:
            self._saved()

    def _saved(self) -> None:
        ck = self.cfg.checkpoint
        if ck.keep_last_n and self.topo.rank == 0:
            dirs.prune(ck.save, ck.keep_last_n)

    def finish_save(self, blocking: bool = True, final: bool = False) -> None:
        """Make a background save visible: at once (``blocking``, every rank waiting for its writer), or only if
        every rank's writer is already done (asked at each iteration, so checkpoints appear soon). A failed write
        is reported and training goes on (see ``save``), unless ``final``."""
        pending = getattr(self, "pending_save", None)
        if pending is None or (not blocking and not pending.done_everywhere()):
            return
        self.pending_save = None
        try:
            pending.finish()
        except ckpt.SaveFailed as exc:
            if final:
                raise
            log.error("%s; training goes on, the next save tries again", exc)
            return
        self._saved()

    def read_and_check(self, path: str, parts) -> dict:
        """Read this rank's part of a checkpoint, once its model and tokenizer are known to be this run's."""
        state = ckpt.read_checkpoint(path, ())
        ckpt.check_same_model(state["config"].model, self.cfg.model, state["path"])
        if state["meta"].get("tokenizer") != self.tokenizer.fingerprint:
            raise ckpt.CheckpointError(f"{state['path']}: saved with tokenizer {state['meta'].get('tokenizer')}, "
                                       f"this run uses {self.tokenizer.fingerprint}")
        return ckpt.read_checkpoint(path, parts, self.model, self.topo) if parts else state

    def read_loadable(self, path: str, parts) -> dict:
        """``read_and_check`` of the newest complete checkpoint under ``path``: a damaged one (a file truncated
        or corrupted, the pointer naming a missing directory) is skipped, with a warning naming what, for the
        next older one; every rank agrees on which (a rank may find its own files damaged)."""
        tried = []
        for candidate in dirs.candidates(path):
            error, state = None, None
            if candidate != path and not os.path.isfile(os.path.join(candidate, "meta.json")):
                error = f"{candidate}: missing or incomplete (no meta.json)"
            else:
                try:
                    state = self.read_and_check(candidate, parts)
                except ckpt.CheckpointDamaged as exc:
                    error = str(exc)
            damaged = host_all_reduce([1.0 if error else 0.0], op=dist.ReduceOp.MAX)[0]
            if not damaged:
                if tried and self.topo.rank == 0:
                    log.warning("%s: loading %s, the newest complete checkpoint; skipped %s", path, state["path"],
                                "; ".join(tried))
                return state
            if error:
                log.warning("rank %d: %s", self.topo.rank, error)
            tried.append(f"{candidate} ({error or 'damaged on another rank'})")
        raise ckpt.CheckpointError(f"{path}: no complete checkpoint to load" + (f" (tried {'; '.join(tried)})"
                                                                                 if tried else ""))

    def load_weights(self):
        """``--pretrained-checkpoint`` (weights only; under LoRA the base, also the one an adapter checkpoint
        records when none is given), then ``--load``; returns the directory ``--load`` read, or None."""
        ck = self.cfg.checkpoint
        base, lora = ck.pretrained_checkpoint, self.cfg.posttrain.lora_rank
        if base is None and ck.load and lora:
            base = (ckpt.read_checkpoint(ck.load, ())["meta"].get("lora") or {}).get("base")
            if base:
                log.info("LoRA: the base of %s is %s (recorded in it)", ck.load, base)
        if base and ck.load and not lora:  # a requeued fine-tuning run: --load holds every weight
            log.info("--pretrained-checkpoint %s not read: --load %s holds the whole model", base, ck.load)
        elif base:
            self.load_pretrained(base)
        return self.load(ck.load) if ck.load else None

    def load_pretrained(self, path: str) -> None:
        """A whole model's weights, from iteration 0 (under LoRA into the frozen base)."""
        state = self.read_loadable(path, ["model"])
        if state["meta"].get("lora"):
            raise ckpt.CheckpointError(f"--pretrained-checkpoint {path} holds LoRA adapters, not a whole model: give "
                                       f"it as --load (its base: {state['meta']['lora'].get('base')})")
        self.load_base(state)

    def load_base(self, state: dict) -> None:
        """A whole model's weights read by ``read_loadable`` into the model (under LoRA: the frozen base)."""
        ckpt.load_model_state(self.model, state["model"], self.topo, state["path"], local=True,
                              only=lambda p: not getattr(p, "lora", False))
        self.optimizer.load_main_params(ckpt.full_precision_values(self.model, state, self.topo))
        log.info("weights of %s loaded%s", state["path"], " as the frozen base" if has_adapters(self.model) else "")

    def load(self, path: str, resume: bool = False):
        """Weights always; optimizer state, loss scale, RNG and progress unless --finetune (weights only, from
        iteration 0), --no-load-optim or --no-load-rng say otherwise (``resume``: all of it, for a rollback).
        Under LoRA a checkpoint of adapters resumes them; a whole model's, with --finetune, is the base. Returns
        the directory read."""
        ck = self.cfg.checkpoint
        finetune = ck.finetune and not resume
        no_optim = ck.no_load_optim and not resume
        parts = ["model"]
        if not (finetune or no_optim):
            parts.append("optimizer")
        state = self.read_loadable(path, parts)
        saved_lora = state["meta"].get("lora")
        if has_adapters(self.model) and not saved_lora:
            if not finetune:
                raise ckpt.CheckpointError(f"--load {state['path']} holds a whole model, not LoRA adapters: give it as "
                                           f"--pretrained-checkpoint (or add --finetune) to train adapters on it")
            self.load_base(state)
            return state["path"]
        check_lora(saved_lora, self.cfg, state["path"])
        ckpt.load_model_state(self.model, state["model"], self.topo, state["path"], local=True,
                              only=(lambda p: getattr(p, "lora", False)) if saved_lora else None)
        if "optimizer" in parts:
            if not state["optimizer"]:
                log.warning("%s holds no optimizer state (saved by the DeepSpeed path or before the first step): "
                            "Adam starts afresh", state["path"])
            self.optimizer.load_full_state(ckpt.load_optimizer_state(self.model, state["optimizer"], self.topo,
                                                                     local=True))
        self.optimizer.load_main_params(ckpt.full_precision_values(self.model, state, self.topo))
        if finetune:
            log.info("fine-tuning from the weights of %s, starting at iteration 0", state["path"])
            return state["path"]
        self.restore_progress(state, resume)
        return state["path"]

    def restore_progress(self, state: dict, resume: bool = False) -> None:
        meta, ck = state["meta"], self.cfg.checkpoint
        self.iteration, self.consumed_samples = meta["iteration"], meta["consumed_samples"]
        self.skip_iterations |= set(meta.get("skip_iterations", [])) | set(
            dirs.skipped_iterations(os.path.dirname(state["path"])))
        if meta.get("scaler") and (resume or not ck.no_load_optim):
            self.scaler.load_state_dict(meta["scaler"])
        if resume or not ck.no_load_rng:
            self.restore_rng(state)
        log.info("resumed from %s at iteration %d (%d samples consumed)", state["path"], self.iteration,
                 self.consumed_samples)

    def restore_rng(self, state: dict) -> None:
        """This rank's own random streams (see ``checkpoint.read_rng``). Under another TP size the saved TP
        trackers no longer match this run's TP ranks one to one: each rank's tracker is seeded afresh from the
        seed, the iteration and its TP rank, so TP ranks keep distinct streams."""
        rng, same_layout = ckpt.read_rng(state["path"], state["meta"], self.topo)
        torch.set_rng_state(rng["torch"])
        saved_tp = state["meta"].get("layout", {}).get("tp", 1)
        if "tracker" in rng and saved_tp == self.topo.tp:
            self.model.rng_tracker.load_state_dict(rng["tracker"])
        else:
            seed = rank_seed(self.cfg.train.seed + self.iteration, self.topo)
            self.model.rng_tracker.seed(seed, self.topo.tp_rank)
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        if not same_layout and self.topo.rank == 0:
            log.info("resumed under another layout than the checkpoint's: dropout draws continue from the saved "
                     "ranks' generators, not bit for bit as the saving layout would have drawn them")
