"""The training loop: one Trainer that builds everything from the config and runs iterations.

Step: this rank's micro-batches of the global batch -> forward/backward each through the pipeline schedule (loss
averaged over micro-batches) -> tied-embedding gradients summed over the first and last stage, gradients averaged
over data parallelism -> clip by the global norm -> AdamW step at the scheduled LR.
"""
from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from typing import Optional

import torch
import torch.distributed as dist

from megalm.config import Config, num_micro_batches, parse_data_path, parse_split
from megalm.data.gpt_dataset import IndexCache, build_datasets, indexed_datasets, split_sample_counts
from megalm.data.loader import global_batch
from megalm.data.tokenizers import build_tokenizer
from megalm.model.gpt import GPT
from megalm.model.lora import apply_lora, freeze_base
from megalm.model.moe import finish_step as finish_moe_step
from megalm.optim.distributed import DistributedOptimizer
from megalm.optim.fsdp import FSDPOptimizer
from megalm.optim.loss_scaler import LossScaler
from megalm.optim.snapshot import HostStaging
from megalm.optim.schedule import learning_rate
from megalm.model.mtp import shifted_targets
from megalm.parallel.context import split_batch
from megalm.parallel.fp8 import enable_fp8
from megalm.parallel.fsdp import local, reshard, shard_model
from megalm.parallel.random import rank_seed
from megalm.parallel.state import Topology, host_all_reduce
from megalm.pipeline.layout import stage_chunks
from megalm.pipeline.p2p import PipeComm
from megalm.pipeline.schedules import LiveActivations, bubble_fraction, run_schedule
from megalm.training.resume import Checkpointing
from megalm.training.dpo import DPO, METRICS, setup_reference
from megalm.training.drills import Drills
from megalm.training.finetune import finetune_datasets
from megalm.training.flops import Throughput, peak_tflops
from megalm.training.health import StepHealth, StragglerMonitor
from megalm.training.logging import MetricsLogger
from megalm.training.stopping import StopConditions, request_requeue
from megalm.training.timers import Timers
from megalm.training.watchdog import Watchdog

log = logging.getLogger("megalm")


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer(Checkpointing):
    def __init__(self, cfg: Config, topo: Topology, watchdog: Optional[Watchdog] = None):
        """``watchdog``: the hang watchdog ``pretrain.main`` started (None: none)."""
        self.cfg, self.topo = cfg, topo
        self.watchdog = watchdog or Watchdog(0.0, topo.rank, topo.world_size)
        self.drills = Drills(topo.rank)
        r = cfg.resilience
        self.health = StepHealth(r, topo)
        self.straggler = StragglerMonitor(r, topo) if r.log_straggler else None
        self.skip_iterations, self.rollbacks = set(r.iterations_to_skip), 0
        self.compute_seconds, self.skip_reason = 0.0, None
        t = cfg.train
        torch.manual_seed(rank_seed(t.seed, topo))  # dropout on replicated activations
        self.device = pick_device()
        self.tokenizer = build_tokenizer(cfg.data)
        p = cfg.parallel
        chunks = stage_chunks(cfg.model.num_layers, topo.pp, topo.pp_rank, p.num_layers_per_virtual_pipeline_stage,
                              p.pipeline_stage_layers)
        with torch.device("meta"):  # no memory yet: each parameter is created on the device as it is initialised
            self.model = GPT(cfg.model, self.tokenizer.vocab_size, topo, chunks)
            if cfg.posttrain.lora_rank:
                apply_lora(self.model, cfg.posttrain, topo)
        self.model.init_weights(t.seed, self.device, self.parameter_dtype())
        if t.fp8_format:
            count = enable_fp8(self.model, t.fp8_recipe, t.fp8_format, topo, self.device)
            log.info("FP8: %d linear layers in %s, %s scaling (torchao)", count, t.fp8_format, t.fp8_recipe)
        if t.compile:
            for block in self.model.layers.values():
                block.compile()
        self.num_micro = num_micro_batches(cfg, topo.world_size)
        # counted before an optimizer (DeepSpeed ZeRO 3) may partition the parameters
        layer_params, output_params, num_params = self._sum_over_stages(
            *self.model.matmul_parameters(), self.model.num_parameters())
        adapters = None
        if cfg.posttrain.lora_rank:  # only the adapters train: no gradient buffer or Adam state for the rest
            adapters = self._sum_over_stages(freeze_base(self.model))[0]
            log.info("LoRA: rank %d on %s, %s adapter parameters train, the other %s are frozen",
                     cfg.posttrain.lora_rank, " ".join(cfg.posttrain.lora_target_modules), f"{adapters:,}",
                     f"{num_params - adapters:,}")
        self.comm = None
        if topo.pp > 1:
            seq = cfg.model.seq_length // topo.cp // (topo.tp if topo.sequence_parallel else 1)
            self.comm = PipeComm(topo, (t.micro_batch_size, seq, cfg.model.hidden_size), self.parameter_dtype(),
                                 self.device)
        o = cfg.optim
        self.optimizer = self.build_optimizer()
        if hasattr(self.optimizer, "check_finite"):  # fp16 overflows are the loss scaler's to skip
            self.optimizer.check_finite = r.check_for_nan_in_loss_and_grad and not t.fp16
        self.staging = None  # --async-save: host memory for the snapshots, set aside now so saves copy quickly
        if cfg.checkpoint.async_save:
            self.staging = HostStaging(pin=self.device.type == "cuda")
            self.staging.reserve(self.optimizer.snapshot_bytes())
        self.scaler = LossScaler(t.fp16, o.initial_loss_scale, o.loss_scale_window, o.min_loss_scale,
                                 o.loss_scale or 0.0)
        self.iteration = 0
        self.consumed_samples = 0
        lg = cfg.logging
        self.timers = Timers(lg.timing_log_level, self.device)
        self.metrics = MetricsLogger(topo.rank == 0, lg.metrics_file, lg.tensorboard_dir,
                                     {"project": lg.wandb_project, "name": lg.wandb_exp_name, "dir": lg.wandb_save_dir,
                                      "config": cfg.to_dict()})
        barrier = dist.barrier if dist.is_initialized() else None
        self.dpo = DPO(cfg.posttrain.dpo_beta, cfg.posttrain.dpo_loss, topo) if cfg.data.dpo_data else None
        self.report = METRICS if self.dpo else None  # what a step reports beside the loss
        if cfg.data.sft_data or cfg.data.dpo_data:
            self.train_ds, self.valid_ds = finetune_datasets(cfg, self.tokenizer, topo.rank, topo.world_size)
        else:
            counts = split_sample_counts(t.train_iters, t.global_batch_size, t.eval_iters)
            cache = IndexCache(cfg.data.data_cache_path, topo.rank == 0, barrier)

            def datasets(paths, split):
                return build_datasets(parse_data_path(paths), split, counts, cfg.model.seq_length, t.seed,
                                      self.tokenizer.fingerprint, cache, self.tokenizer.vocab_size)

            d = cfg.data
            if d.train_data_path:  # separate files per split, each used whole
                self.train_ds = datasets(d.train_data_path, [1.0, 0.0, 0.0])[0]
                self.valid_ds = datasets(d.valid_data_path, [0.0, 1.0, 0.0])[1] if d.valid_data_path else None
            else:
                self.train_ds, self.valid_ds, _ = datasets(d.data_path, parse_split(d.split))
        self.data_files = {id(d): d for ds in (self.train_ds, self.valid_ds) for d in indexed_datasets(ds)}
        self.data_files = list(self.data_files.values())
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.throughput = Throughput(cfg.model, layer_params, output_params, topo.world_size,
                                     peak_tflops(device_name, cfg.logging.peak_tflops), adapters)
        loaded = self.load_weights()
        if self.dpo:
            self.reference = setup_reference(self, loaded)
        extra = "".join(f" x {name} {n}" for name, n in (("CP", topo.cp), ("EP", topo.ep), ("ETP", topo.etp))
                        if n > 1)
        log.info("model: %s parameters, %d layers, hidden %d, vocab %d (padded %d); layout TP %d x PP %d x DP %d%s",
                 f"{num_params:,}", cfg.model.num_layers, cfg.model.hidden_size,
                 self.tokenizer.vocab_size, self.model.padded_vocab_size, topo.tp, topo.pp, topo.dp, extra)
        self.log_memory()
        if topo.pp > 1:
            virtual = len(chunks)
            log.info("pipeline: %d stages%s, %d micro-batches per step: %s schedule, ideal bubble %.1f%% "
                     "((P - 1) / (%sm + P - 1))", topo.pp, f" x {virtual} virtual" if virtual > 1 else "",
                     self.num_micro, "interleaved 1F1B" if virtual > 1 else "1F1B",
                     100 * bubble_fraction(topo.pp, self.num_micro, virtual), "V " if virtual > 1 else "")

    def parameter_dtype(self) -> torch.dtype:
        """bf16/fp16 parameters under --bf16/--fp16 (the optimizer keeps fp32 main copies), else fp32."""
        t = self.cfg.train
        return torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32

    def build_optimizer(self):
        """megalm's distributed optimizer over gradient buckets (ZeRO 0-2), or with --use-torch-fsdp2 and more
        than one data-parallel rank, FSDP2 over the model and AdamW over its shards."""
        o, p = self.cfg.optim, self.cfg.parallel
        grad_dtype = torch.bfloat16 if self.cfg.train.grad_reduce_in_bf16 else torch.float32
        if p.use_torch_fsdp2 and self.topo.dp * self.topo.cp > 1:
            shard_model(self.model, self.topo, self.parameter_dtype(), grad_dtype, p.fsdp_reshard_after_forward)
            return FSDPOptimizer(self.model, o, self.topo, self.parameter_dtype())
        if p.use_torch_fsdp2:
            log.info("--use-torch-fsdp2 at DP 1: nothing to shard, megalm's optimizer runs")
        return DistributedOptimizer(self.model, o, self.topo, o.zero_stage, self.num_micro, o.ddp_bucket_size,
                                    grad_dtype)

    def optimizer_state_bytes(self) -> int:
        return self.optimizer.state_bytes()

    def memory_row(self) -> dict:
        """Rank 0's training state in bytes after the first step, and its peak resident memory."""
        row = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if hasattr(self.optimizer, "memory_bytes"):
            row.update(self.optimizer.memory_bytes())
        row["optimizer_state_bytes"] = self.optimizer_state_bytes()
        frozen = [local(p) for p in self.model.parameters() if not p.requires_grad]
        if frozen:  # LoRA's base (and MoE expert biases): weights outside the optimizer (FSDP2: this rank's shard)
            row["frozen_param_bytes"] = sum(p.numel() * p.element_size() for p in frozen)
        return row

    def log_memory(self) -> None:
        mem = self.optimizer.memory_bytes()
        main = f", fp32 main parameters {mem['main_param_bytes'] / 1e6:.1f} MB" if mem["main_param_bytes"] else ""
        log.info("memory per rank (rank 0): parameters %.1f MB, gradients %.1f MB%s, optimizer state %.1f MB "
                 "(ZeRO stage %d over DP %d)", mem["param_bytes"] / 1e6, mem["grad_bytes"] / 1e6, main,
                 mem["optimizer_state_bytes"] / 1e6, self.optimizer.zero_stage, self.topo.dp)

    def _sum_over_stages(self, *values: int) -> list:
        """Per-stage counts summed over the pipeline (identical across TP and DP already)."""
        if self.topo.pp == 1:
            return list(values)
        return [int(v) for v in host_all_reduce(list(values), group=self.topo.pp_group)]

    def _micro_batches(self, dataset, consumed: int):
        if self.iteration % self.cfg.logging.log_interval == 0 or len(self.data_files) <= 64:
            for indexed in self.data_files:  # a file deleted or rewritten under the run stops it, named
                indexed.check_unchanged()
        t = self.cfg.train
        d = self.cfg.data
        batches = global_batch(dataset, consumed, t.global_batch_size, t.micro_batch_size, self.topo.dp_rank,
                               self.topo.dp, eod=self.tokenizer.eod, eod_mask_loss=d.eod_mask_loss,
                               reset_position_ids=d.reset_position_ids, reset_attention_mask=d.reset_attention_mask)
        if self.dpo:  # each pair's reference log-probabilities travel with it
            reference = self.reference["train" if dataset is self.train_ds else "valid"]
            for b in batches:
                b["reference_logps"] = reference[b["sample_index"]].float()
        if self.cfg.model.mtp_num_layers:  # shifted from whole sequences, before CP cuts them
            batches = [shifted_targets(b, self.cfg.model.mtp_num_layers, self.tokenizer.eod) for b in batches]
        if self.topo.cp > 1:  # this context-parallel rank's chunks of every sequence
            batches = [split_batch(b, self.topo.cp, self.topo.cp_rank) for b in batches]
        return batches

    def _loss_row(self, total: torch.Tensor) -> dict:
        """``loss`` and, with multi-token prediction, ``mtp_<k>_loss`` of each depth, from ``total`` ``[1 + D]``
        (DPO: its rewards, ``dpo_<metric>``)."""
        losses = self._mean_loss(total)
        if self.report:
            return {"loss": losses[0], **{f"dpo_{k}": v for k, v in zip(self.report[1:], losses[1:])}}
        return {"loss": losses[0], **{f"mtp_{k}_loss": v for k, v in enumerate(losses[1:], start=1)}}

    def _mean_loss(self, total: torch.Tensor) -> list:
        """The step's losses as every rank reports them: from the last stage, summed over context parallelism
        (each rank's share of the masked mean), averaged over data parallelism."""
        if self.topo.pp > 1:
            total = total.clone()
            dist.all_reduce(total, group=self.topo.pp_group)  # only the last stage's is non-zero
        if self.topo.cp > 1:
            total = total.clone()
            dist.all_reduce(total, group=self.topo.cp_group)
        if self.topo.dp > 1:
            total = total.clone()
            dist.all_reduce(total, group=self.topo.dp_group)
            total /= self.topo.dp
        return total.reshape(-1).tolist()

    def model_inputs(self, batch: dict) -> dict:
        """A micro-batch's model arguments (tokens, labels, and positions/document ids when present) on this
        rank's device."""
        return {k: batch[k].to(self.device) for k in ("tokens", "labels", "position_ids", "document_ids",
                                                      "mtp_tokens", "mtp_labels") if k in batch}

    def training_loss(self, out, batch: dict):
        """(the micro-batch's loss to back-propagate, the losses to report ``[1 + D]``): the masked mean of the
        model's per-token loss and, with multi-token prediction, ``--mtp-loss-scaling-factor / D`` times the sum
        of each depth's (reported per depth, not in ``loss``: Megatron's convention)."""
        main, depths = out if isinstance(out, tuple) else (out, None)
        if self.dpo:
            return self.dpo.loss(main, batch, self.device)
        loss = self.masked_mean(main, batch)
        if depths is None:
            return loss, loss.detach()[None]
        masks = batch["mtp_loss_mask"]
        per_depth = torch.stack([self.masked_mean(d, batch, masks[k]) for k, d in enumerate(depths)])
        m = self.cfg.model
        return loss + m.mtp_loss_scaling_factor / m.mtp_num_layers * per_depth.sum(), \
            torch.cat((loss.detach()[None], per_depth.detach()))

    def masked_mean(self, per_token: torch.Tensor, batch: dict, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The micro-batch's loss: per-token losses averaged over the positions its loss mask keeps. Under
        context parallelism this rank's sum over the whole sequence's count (summed over the CP group), so the
        ranks' losses add up to the sequence's mean, and a rank with no loss position gives a finite zero."""
        mask = (batch["loss_mask"] if mask is None else mask).to(self.device)
        count = mask.sum()
        if self.topo.cp > 1:
            count = count.clone()
            dist.all_reduce(count, group=self.topo.cp_group)
        return (per_token.float() * mask).sum() / count.clamp_min(1.0)

    def _run_micro_batches(self, micro_batches, forward_only: bool) -> torch.Tensor:
        """Forward (and backward) every micro-batch through this rank's stage; returns the sum of the
        micro-batches' mean losses divided by their count (zero before the last stage)."""
        total = torch.zeros(len(self.report) if self.report else 1 + (self.cfg.model.mtp_num_layers or 0),
                            device=self.device)
        # the first step under pipelining measures the micro-batches whose activations are alive at once
        self.live = LiveActivations() if self.comm and self.iteration == 0 and not forward_only else None

        def forward(chunk, i, hidden):
            batch = micro_batches[i]
            measure = self.live.during(i) if self.live else contextlib.nullcontext()
            with measure:
                out = self.model(**self.model_inputs(batch), hidden=hidden, chunk=chunk)
            if not self.model.is_last_chunk(chunk):
                return out
            loss, reported = self.training_loss(out, batch)
            if not forward_only:
                loss, reported = (self.drills.loss(self.iteration + 1, v) for v in (loss, reported))
            loss = loss / len(micro_batches)
            total.add_(reported / len(micro_batches))
            return loss if forward_only else loss * self.scaler.scale

        run_schedule(forward, self.comm, len(micro_batches), self.topo.pp, self.topo.pp_rank, len(self.model.chunks),
                     forward_only)
        return total

    def train_step(self, micro_batches) -> dict:
        """One optimizer step over this rank's micro-batches; returns loss, grad norm, lr, skipped."""
        self.model.train()
        self.optimizer.zero_grad()
        moe = self.model.moe_stats
        if moe is not None:  # MoE layers' losses get the gradient the training loss gets
            moe.reset()
            moe.loss_scale = self.scaler.scale / len(micro_batches)
        iteration = self.iteration + 1
        with self.timers("forward-backward"):
            start, waited = time.perf_counter(), self.comm.wait_seconds if self.comm else 0.0
            hooks = self.drills.in_step(iteration, self.model)  # a drill's slow rank works in this time
            total = self._run_micro_batches(micro_batches, forward_only=False)
            self.compute_seconds = time.perf_counter() - start - ((self.comm.wait_seconds - waited) if self.comm
                                                                  else 0.0)
        for hook in hooks:
            hook.remove()
        self.optimizer.reduce_gradients(self.timers)
        row = self._loss_row(total)
        bad = self.optimizer.nonfinite_params() if self.optimizer.check_finite else []
        if bad:
            names = {p: n for n, p in self.model.named_parameters()}
            bad = [names.get(p, "?") for p in bad]
        why = self.health.verdict(iteration, float(total[0]), bad, row["loss"])
        lr = learning_rate(self.cfg.optim, iteration)
        if why:  # nothing of this step reaches the weights, the Adam state or the routers
            if self.topo.rank == 0:
                log.warning("iteration %d: step skipped on every rank, weights and optimizer state untouched: %s",
                            iteration, why)
            grad_norm, skipped = float("nan"), True
        else:
            grad_norm, skipped = self.optimizer.update(lr, self.scaler.scale, self.timers)
        self.scaler.update(skipped)
        row.update({"grad_norm": grad_norm, "lr": lr, "skipped": int(skipped)})
        self.skip_reason = why
        if moe is not None and not why:  # under LoRA the base, its routers' biases too, stays as it was
            rate = 0.0 if self.cfg.posttrain.lora_rank else self.cfg.model.moe_router_bias_update_rate
            row.update(finish_moe_step(self.model, self.topo, rate))
        return row

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over ``--eval-iters`` global batches of the validation split (the same ones every time)."""
        if self.valid_ds is None or self.cfg.train.eval_iters == 0:
            return None
        self.model.eval()
        gbs, losses = self.cfg.train.global_batch_size, []
        for i in range(self.cfg.train.eval_iters):
            losses.append(self._run_micro_batches(self._micro_batches(self.valid_ds, i * gbs), forward_only=True))
        reshard(self.model)  # FSDP2: nothing left gathered once no backward follows
        return self._mean_loss(torch.stack(losses).mean(0))[0]

    def train(self) -> None:
        t = self.cfg.train
        tokens_per_iter = t.global_batch_size * self.cfg.model.seq_length
        stop = StopConditions(t.exit_interval, t.exit_duration_in_mins)
        stop.install()
        self.watchdog.start()
        try:
            self._train_loop(stop, tokens_per_iter)
        except BaseException:
            self.watchdog.reporting()  # no longer timed; still beating while pretrain.main names the peers
            raise
        finally:
            stop.uninstall()
        self.watchdog.stop()
        self.metrics.close()

    def _train_loop(self, stop: StopConditions, tokens_per_iter: int) -> None:
        t, lg, ck = self.cfg.train, self.cfg.logging, self.cfg.checkpoint
        saved_at = None
        while self.iteration < t.train_iters:
            if self.iteration + 1 in self.skip_iterations:
                self._skip_batch()
                continue
            with self.watchdog.phase("saving (background writer)", self.iteration):
                self.finish_save(blocking=False)
            start = time.perf_counter()
            waited = self.comm.wait_seconds if self.comm else 0.0
            with self.timers("data"), self.watchdog.phase("data"):
                micro_batches = self._micro_batches(self.train_ds, self.consumed_samples)
            with self.watchdog.phase("forward-backward and optimizer step"):
                step = self.train_step(micro_batches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if self.iteration == 0:  # startup is over: collectives now time out just after the watchdog
                self.watchdog.shorten_collective_timeouts()
            self.iteration += 1
            self.consumed_samples += t.global_batch_size
            row = {"iteration": self.iteration, **step, **self.throughput(tokens_per_iter, elapsed),
                   "ms_per_iter": 1000 * elapsed, "consumed_samples": self.consumed_samples, **self.timers.take()}
            if t.fp16:
                row["loss_scale"] = self.scaler.scale
            if self.iteration == 1:  # measured, not estimated: the Adam moments this rank allocated
                row.update(self.memory_row())
                if t.compile:  # what dynamo could not trace in the blocks it compiled (kept at zero by the tests)
                    row["compile_graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
            if self.comm:  # this rank's stage (rank 0: the first): time blocked on its neighbours, activations held
                row["pipeline_wait_ms"] = 1000 * (self.comm.wait_seconds - waited)
                if self.live:  # measured in the first step
                    row["pipeline_peak_micro_batches"] = self.live.peak
            self.metrics.record(row)
            if self.iteration % lg.log_interval == 0 or self.iteration == 1:
                self.metrics.progress(row, t.train_iters)
            rollback = self.health.after(self.iteration, step["loss"], bool(step["skipped"]), self.skip_reason)
            if rollback:
                self.rollback(rollback)
                saved_at = self.iteration
                continue
            if self.iteration % t.eval_interval == 0 or self.iteration == t.train_iters:
                with self.watchdog.phase("validation"):
                    self.log_validation()
            if ck.save and ck.save_interval and self.iteration % ck.save_interval == 0:
                self.save()
                saved_at = self.iteration
            reason = self._straggler_report(elapsed)
            reason = stop.reason(self.iteration) or reason
            if reason and self.iteration < t.train_iters:
                log.info("stopping after iteration %d: %s", self.iteration, reason)
                if ck.save and saved_at != self.iteration:
                    self.save(final=True)
                self.finish_save(final=True)  # written and visible before the job is requeued or ends
                if ck.save and self.topo.rank == 0:
                    request_requeue(ck.save, reason)
                if not ck.save:
                    log.warning("no --save: the progress of this run is not kept")
                return
        if ck.save and saved_at != self.iteration:
            self.save(final=True)
        self.finish_save(final=True)

    def _skip_batch(self) -> None:
        """An iteration whose batch is consumed without a step (``--iterations-to-skip``, or a rollback's)."""
        gbs = self.cfg.train.global_batch_size
        self.iteration += 1
        if self.topo.rank == 0:
            log.warning("iteration %d: batch skipped (samples %d to %d), no step", self.iteration,
                        self.consumed_samples, self.consumed_samples + gbs - 1)
        self.consumed_samples += gbs
        self.metrics.record({"iteration": self.iteration, "skipped_batch": 1,
                             "consumed_samples": self.consumed_samples})

    def _straggler_report(self, elapsed: float) -> Optional[str]:
        """``--log-straggler`` every ``--log-interval`` iterations: the row for the metrics, and a reason to stop
        when one rank stays too slow."""
        if self.straggler is None:
            return None
        self.straggler.add(self.compute_seconds, elapsed)
        if self.iteration % self.cfg.logging.log_interval:
            return None
        with self.watchdog.phase("straggler report"):
            row, reason = self.straggler.report(self.iteration)
        self.metrics.record(row)
        return reason

    def log_validation(self) -> None:
        valid = self.evaluate()
        if valid is None:
            return
        ppl = math.exp(min(valid, 50.0))
        self.metrics.record({"iteration": self.iteration, "valid_loss": valid, "valid_ppl": ppl})
        if self.metrics.enabled:
            log.info("validation at iter %d | loss %.4f | perplexity %.2f", self.iteration, valid, ppl)
