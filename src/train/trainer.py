"""Step 3's trainer, read top to bottom: ``Trainer(config)`` sets everything up in named steps, ``fit()`` runs the
optimizer steps (``train_step``), logs them, evaluates on dev and saves checkpoints when due.

One optimizer step (``train_step``):
1. take this rank's ``m <= --grad-accum`` micro-batches of the step (fixed by the data position, see data.py);
2. all-reduce the number of label tokens of the whole step over all ranks (``N``);
3. per micro-batch: forward with per-document position ids and no attention mask (transformers builds the
   block-diagonal document mask on CPU; varlen flash attention on GPU, attention.py), summed token cross-entropy
   (from the logits, or chunked without them: loss.py), scaled so that the update is the mean over all ``N`` label
   tokens of the step whatever the row lengths (plus the MoE auxiliary loss);
   ``accelerator.backward`` (DeepSpeed steps, clips to 1.0 and zeroes at the step's last micro-batch);
4. the LR scheduler steps.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from src.common.defaults import IGNORE_INDEX
from src.common.errors import BadFile
from src.models import integrity
from src.train import checkpoint as ckpt
from src.train import lora
from src.train.config import TrainConfig
from src.train.dev_eval import evaluate_dev, format_dev, load_dev, materialize_copy
from src.train.runtime import (
    DENSE_LR,
    MOE_LR,
    deepspeed_config,
    flop_params,
    is_moe_path,
    moe_module,
    no_zero3_init,
    peak_flops,
    set_sync_gradients,
)
from src.train.steps import forward_loss, grad_norm, routing_metrics


@dataclass
class StepResult:
    """What one optimizer step measured (summed over this rank's micro-batches; ``counts`` over all ranks)."""
    counts: torch.Tensor  # [label tokens, tokens, sum of squared document lengths] of the whole step, all ranks
    ce_sum: torch.Tensor  # this rank's summed token cross-entropy
    aux_mean: float | None  # mean MoE auxiliary loss over the micro-batches (None when it has no gradient)
    lr: float
    seconds: float
    cpu_seconds: float


@dataclass
class Throughput:
    tokens: float = 0.0
    flops: float = 0.0
    seconds: float = 0.0
    steps: int = 0
    extra: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self._setup_accelerator()
        self._setup_out_dir()
        self._build_model()
        self._build_data()
        self._build_optimizer()
        self.start_step = self._resume()
        self._setup_logging()

    # -- setup ------------------------------------------------------------------------------------------------------
    def _setup_accelerator(self) -> None:
        import warnings

        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration, set_seed

        # DeepSpeed's ZeRO code still calls this torch API; the warning is noise for our users.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")
        config = self.config
        self.on_gpu = torch.cuda.is_available()
        self.is_moe = is_moe_path(config.model)
        if config.expect == "moe" and not self.is_moe:
            raise SystemExit(f"--expect moe: {config.model} is not a Post-MoE checkpoint (scripts/upcycle_moe.sh makes "
                             "one)")
        if config.expect == "dense" and self.is_moe:
            raise SystemExit(f"--expect dense: {config.model} is a Post-MoE checkpoint")
        self.rows_note = None
        if self.is_moe:  # the rows' language ids must match the experts (7 families or 50 languages)
            try:
                from src.train.data import rows_folder

                # rows_folder: --train may be step 2's output folder as well as the train/ inside it
                self.rows_note = moe_module().check_training_rows(config.model, rows_folder(config.train))
            except ValueError as e:
                raise SystemExit(str(e)) from None
        self.lr = config.lr if config.lr is not None else (MOE_LR if self.is_moe else DENSE_LR)
        self.out_dir = Path(config.out)
        log_dir = Path(config.log_dir) if config.log_dir else self.out_dir / "logs"
        ds_cfg = deepspeed_config(config.zero, batch_size=config.batch_size, bf16=self.on_gpu, clip=config.clip)
        self.plugin = DeepSpeedPlugin(hf_ds_config=ds_cfg, zero3_init_flag=config.zero == 3)
        if config.wandb:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise SystemExit("--wandb needs the wandb package: pip install wandb (TensorBoard logging needs "
                                 "nothing)") from None
        self.accelerator = Accelerator(
            deepspeed_plugin=self.plugin,
            gradient_accumulation_steps=config.grad_accum,
            mixed_precision="bf16" if self.on_gpu else "no",
            log_with=["tensorboard"] + (["wandb"] if config.wandb else []),
            project_config=ProjectConfiguration(project_dir=str(log_dir), logging_dir=str(log_dir)),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[InitProcessGroupKwargs(backend="nccl" if self.on_gpu else "gloo",
                                                    timeout=timedelta(minutes=60))],
        )
        self.main_proc = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.device = self.accelerator.device
        if self.rows_note:
            self.log(f"[train] note: {self.rows_note}")
        set_seed(config.seed)

    def log(self, msg: str) -> None:
        if self.main_proc:
            print(msg, flush=True)

    def _setup_out_dir(self) -> None:
        from src.common.locks import hold_for_launch

        self.out_dir.mkdir(parents=True, exist_ok=True)
        hold_for_launch(self.out_dir, "step 3", main_process=self.main_proc, world_size=self.world)  # one run per OUT
        shared_fs = ckpt.out_dir_is_shared(self.accelerator, self.out_dir)
        # The process that renames and rotates checkpoints: the global main one on a shared filesystem, else each
        # node's local main one in its own copy.
        self.renamer = self.main_proc if shared_fs else self.accelerator.is_local_main_process
        if self.renamer:
            for p in ckpt.clean_stale(self.out_dir):
                print(f"[train] removed {p.name} (left by an interrupted save)", flush=True)
        self.accelerator.project_configuration.save_on_each_node = not shared_fs
        self.resume_from = ckpt.resolve_resume(self.config.resume, self.out_dir)
        # A fresh run into a folder with an earlier run's checkpoints refuses to start unless --overwrite (every rank
        # refuses alike); with it, the earlier run's files go first.
        stale = ckpt.check_out_dir(self.out_dir, self.resume_from, overwrite=self.config.overwrite)
        self.accelerator.wait_for_everyone()
        if self.renamer and stale:
            ckpt.clear_previous_run(stale, log=self.log)
        self.accelerator.wait_for_everyone()
        if self.config.resume == "latest" and self.resume_from is None:
            self.log(f"[train] --resume latest: no checkpoint in {self.out_dir}, starting from scratch")

    def _build_model(self) -> None:
        from src.models.loading import load_model, load_tokenizer

        config = self.config
        self.tokenizer = load_tokenizer(config.model, padding_side="left")
        self.dtype = torch.bfloat16 if self.on_gpu else torch.float32
        t0 = time.time()
        if config.qlora:
            model = lora.load_4bit(config.model, self.dtype, self.accelerator.local_process_index, is_moe=self.is_moe)
        elif (self.is_moe or lora.enabled(config)) and config.zero == 3:
            # The MoE loader builds and fills a full model, and peft wraps full layers: DeepSpeed partitions it later.
            with no_zero3_init(self.plugin):
                model = load_model(config.model, torch_dtype=self.dtype)
        else:
            model = load_model(config.model, torch_dtype=self.dtype)  # ZeRO-3 dense: partitioned while loading
        speed = self._speed_choices(model)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model = lora.apply(model, config, base=config.model, is_moe=self.is_moe)  # unchanged without --lora-r
        if self.is_moe and config.zero == 3:
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, list(moe_module().SPARSE_BLOCK_CLASSES))
        from src.train import kernels, loss

        self.loss, why = loss.choose(config.loss, model, zero=config.zero, kernels=self.kernels, on_gpu=self.on_gpu)
        speed.append(f"loss {self.loss} ({why})")
        if config.compile:
            speed.append(f"torch.compile on {kernels.compile_layers(lora.plain_view(model))} decoder layers")
        self.n_flop_params = flop_params(model)
        self.model = model
        self.log(f"[train] model {config.model} ({'Post-MoE' if self.is_moe else 'dense'}, "
                 f"{self.n_flop_params / 1e6:.1f}M compute params"
                 f"{', gradient checkpointing' if config.gradient_checkpointing else ''}) loaded in "
                 f"{time.time() - t0:.1f}s")
        self.log("[train] " + "; ".join(speed))
        self.param_counts = lora.param_counts(model)
        if lora.enabled(config):
            self.log(f"[train] LoRA r {config.lora_r}, alpha {lora.alpha(config)}, targets {config.lora_targets}: "
                     f"{lora.describe(self.param_counts)}")

    def _speed_choices(self, model) -> list[str]:
        """The attention kernel and Liger's kernels for this model and device (``--attn-impl``, ``--kernels``),
        applied to ``model``; returns the start-up line's parts saying which run and why."""
        from src.generation.attention import attn_implementation
        from src.train import attention, kernels

        self.attn_impl, attn_why = attention.choose(self.config.attn_impl, self.on_gpu, model.config)
        if attn_implementation(model.config) != self.attn_impl:
            model.set_attn_implementation(self.attn_impl)
        self.kernels, kernels_why = kernels.choose(self.config.kernels, self.on_gpu, model.config.model_type)
        if self.kernels == "liger":
            kernels_why = f"{kernels.apply_liger(model, is_moe=self.is_moe)}; {kernels_why}"
        return [f"attention {self.attn_impl} ({attn_why})", f"kernels {self.kernels} ({kernels_why})"]

    def _build_data(self) -> None:
        from src.train.data import BatchPlan, Collator, load_rows

        config = self.config
        self.rows = load_rows(config.train, tokenizer=self.tokenizer, model_name=config.model,
                              vocab_size=self.model.get_input_embeddings().num_embeddings,
                              allow_tokenizer_mismatch=config.allow_tokenizer_mismatch, log=self.log)
        self.plan = BatchPlan(len(self.rows), self.world, config.batch_size, config.grad_accum)
        self.total_steps = config.max_steps or self.plan.steps_per_epoch * config.epochs
        if self.plan.dropped_rows_per_epoch:
            self.log(f"[train] {self.plan.dropped_rows_per_epoch} of {len(self.rows)} rows at the end of each epoch "
                     f"do not fill a global micro-batch of {self.plan.rows_per_micro_step} rows and are not trained on")
        self.eval_every = config.eval_every if config.eval_every is not None else max(1, self.total_steps // 10)
        self.save_every = config.save_every if config.save_every is not None else max(1, self.total_steps // 20)
        from src.train.attention import needs_flat_rows

        self.collator = Collator(self.tokenizer.pad_token_id, flatten=needs_flat_rows(self.attn_impl),
                                 with_language_ids=self.is_moe)
        self.num_workers = config.num_workers if config.num_workers is not None else (2 if self.on_gpu else 0)
        rows_per_step = self.plan.rows_per_micro_step * config.grad_accum
        self.log(f"[train] {len(self.rows)} rows, {self.world} process(es) x {config.batch_size} rows x "
                 f"{config.grad_accum} accumulation = {rows_per_step} rows per step, "
                 f"{self.plan.steps_per_epoch} steps per epoch, {self.total_steps} steps in all, ZeRO-{config.zero}, "
                 f"{'bf16' if self.on_gpu else 'fp32'} on {self.device}")

    def _build_optimizer(self) -> None:
        from src.train.optim import build_optimizer, build_scheduler, no_decay_names

        config = self.config
        optimizer = build_optimizer(self.model, self.lr, config.weight_decay, config.adam_betas, config.adam_eps,
                                    fused=self.on_gpu)
        self.log(f"[train] AdamW lr {self.lr}, weight decay {config.weight_decay} ({len(no_decay_names(self.model))} "
                 f"bias/norm tensors without decay), cosine to 0 over {self.total_steps} steps, warmup ratio "
                 f"{config.warmup_ratio}")
        scheduler = build_scheduler(optimizer, self.total_steps, config.warmup_ratio)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, optimizer, scheduler)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        if lora.enabled(config):
            lora.drop_frozen_tied_weights_on_save(self.model)
        # The settings an exact resume depends on: they must not change between the runs.
        self.signature = {"num_rows": len(self.rows), "world_size": self.world, "batch_size": config.batch_size,
                          "grad_accum": config.grad_accum, "total_steps": self.total_steps, "zero": config.zero,
                          "lora": lora.settings(config)}

    def _resume(self) -> int:
        """Weights, optimizer, scheduler and RNG states from ``--resume``; returns the step to continue from. Refused
        when the checkpoint's weight files differ from their recorded digests, or when the step it records is past
        this run's end or disagrees with its data position or with the restored scheduler and optimizer."""
        if self.resume_from is None:
            return 0
        state = ckpt.read_trainer_state(self.resume_from)
        saved = state.get("signature", {})
        diff = {k: (saved.get(k), v) for k, v in self.signature.items() if saved.get(k) != v}
        if diff:
            raise SystemExit(f"--resume {self.resume_from}: the run's settings differ from the checkpoint's, an exact "
                             "resume is impossible: " + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in diff.items()))
        step = self._recorded_step(state)
        integrity.verify_weights(self.resume_from)
        from src.train.weights_only import load_training_state

        # accelerate/DeepSpeed would unpickle these files: they are read with torch.load(weights_only=True) instead
        load_training_state(self.accelerator, self.resume_from / ckpt.STATE_DIR, self.accelerator.process_index,
                            **lora.state_load_kwargs(self.unwrapped))
        self._check_restored_counters(step)
        self.log(f"[train] resumed from {self.resume_from} at step {step} (weights, optimizer, scheduler, RNG, data "
                 f"position: epoch {step // self.plan.steps_per_epoch}, row "
                 f"{(step % self.plan.steps_per_epoch) * self.config.grad_accum * self.plan.rows_per_micro_step})")
        return step

    def _data_position(self, step: int) -> dict:
        """What trainer_state.json records about the data position of ``step`` (see save)."""
        epoch, in_epoch = divmod(step, self.plan.steps_per_epoch)
        return {"epoch": epoch, "step_in_epoch": in_epoch,
                "rows_consumed_in_epoch": in_epoch * self.config.grad_accum * self.plan.rows_per_micro_step}

    def _run_end(self) -> str:
        if self.config.max_steps:
            return f"--max-steps {self.config.max_steps}"
        return f"--epochs {self.config.epochs} of {self.plan.steps_per_epoch} steps"

    def _recorded_step(self, state: dict) -> int:
        """The checkpoint's step, checked against this run's end and against the data position recorded with it."""
        file = self.resume_from / ckpt.STATE_FILE
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise BadFile(file, f"field 'step': expected a whole number >= 0, got {step!r}")
        if step > self.total_steps:
            raise BadFile(file, f"step {step} is past the end of this run ({self._run_end()}): nothing to train; the "
                                f"file was edited, or the checkpoint belongs to a longer run")
        want = self._data_position(step)
        got = {k: state.get(k) for k in want}
        if got != want:
            raise BadFile(file, f"step {step}, but its data position disagrees ("
                                + ", ".join(f"{k} {v}" for k, v in got.items()) + f"; at step {step} they are "
                                + ", ".join(map(str, want.values())) + "): the file was edited")
        return step

    def _check_restored_counters(self, step: int) -> None:
        """The scheduler and optimizer restored from state/ must have counted ``step`` optimizer steps: an edited
        trainer_state.json would otherwise resume "at" its step on another step's learning-rate schedule."""
        wrong = {k: v for k, v in ckpt.saved_step_counters(self.scheduler, self.model).items() if v != step}
        if not wrong:
            return
        values = set(wrong.values())
        where = (f"the {' and '.join(wrong)} state saved beside it ({ckpt.STATE_DIR}/) "
                 f"{'are' if len(wrong) > 1 else 'is'} at step {values.pop()}" if len(values) == 1 else
                 ", ".join(f"the {k} state saved beside it at step {v}" for k, v in wrong.items()))
        raise BadFile(self.resume_from / ckpt.STATE_FILE, f"step {step}, but {where}: the file was edited, or "
                                                         f"{ckpt.STATE_DIR}/ comes from another checkpoint")

    def _setup_logging(self) -> None:
        from src.common.io import iter_jsonl, write_jsonl

        config = self.config
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(config).items()}
        hparams.update(lr=self.lr, world_size=self.world, total_steps=self.total_steps, is_moe=self.is_moe,
                       attn_impl=self.attn_impl, loss=self.loss, kernels=self.kernels)
        self.accelerator.init_trackers(config.run_name or self.out_dir.resolve().name, config=hparams)
        self.accelerator.log({f"params/{k}": v for k, v in self.param_counts.items()}, step=self.start_step)
        self.metrics_path = self.out_dir / "train_log.jsonl"
        if self.main_proc:
            # On resume keep the records up to the resumed step (a crashed run may have logged steps past it).
            old = iter_jsonl(self.metrics_path) if self.metrics_path.is_file() else []
            write_jsonl(self.metrics_path, [r for r in old if r.get("step", 0) <= self.start_step])
        self.dev_records = load_dev(config.dev, config.dev_limit) if config.dev and self.eval_every >= 0 else None
        if self.dev_records:
            self.log(f"[train] dev evaluation on {len(self.dev_records)} prompts "
                     f"{'at the end' if self.eval_every == 0 else f'every {self.eval_every} steps and at the end'}")
        self.peak = peak_flops(config, self.device)
        self.moe = moe_module() if self.is_moe else None
        # counts expert selections for the logs
        self.routing = self.moe.RoutingStats(self.unwrapped).__enter__() if self.moe is not None else None

    # -- one optimizer step -----------------------------------------------------------------------------------------
    def train_step(self, micro: list[dict], started: tuple[float, float]) -> StepResult:
        """One optimizer step over this rank's micro-batches; ``started`` = (wall, CPU) time before they were
        loaded, so the step's time includes the data loading."""
        t0, cpu0 = started
        acc, m = self.accelerator, len(micro)
        local = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro),
                              sum(b["num_tokens"] for b in micro), sum(b["doc_len_sq"] for b in micro)],
                             dtype=torch.float64, device=self.device)
        counts = acc.reduce(local, reduction="sum")
        n_label = max(counts[0].item(), 1.0)
        ce_total = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_total, aux = 0.0, None
        for i, batch in enumerate(micro):
            # The step's last micro-batch, also when the epoch's last step has fewer than --grad-accum of them.
            set_sync_gradients(acc, i == m - 1)
            ce_sum, aux = forward_loss(self.model, batch, self.device, is_moe=self.is_moe, moe=self.moe,
                                       loss=self.loss)
            loss = ce_sum * (self.config.grad_accum * self.world / n_label)
            if aux is not None:
                loss = loss + aux * (self.config.grad_accum / m)
                aux_total += float(aux.detach())
            acc.backward(loss)
            ce_total += ce_sum.detach().double()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        aux_mean = aux_total / m if aux is not None and aux.requires_grad else None
        return StepResult(counts, ce_total, aux_mean, lr, time.time() - t0, time.process_time() - cpu0)

    def log_step(self, step: int, epoch: int, r: StepResult, window: Throughput, bar) -> None:
        cfg = self.unwrapped.config
        ce_global = self.accelerator.reduce(r.ce_sum, reduction="sum").item()
        n_label = max(r.counts[0].item(), 1.0)
        tokens = r.counts[1].item()
        flops = 6.0 * self.n_flop_params * tokens + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * r.counts[2].item()
        window.tokens += tokens
        window.seconds += r.seconds
        window.flops += flops
        rec = {"step": step, "epoch": epoch, "loss": ce_global / n_label, "lr": r.lr,
               "grad_norm": grad_norm(self.model), "tokens": int(tokens), "label_tokens": int(r.counts[0].item()),
               "step_seconds": r.seconds, "step_cpu_seconds": r.cpu_seconds, "tokens_per_second": tokens / r.seconds}
        if self.peak:
            rec["mfu"] = flops / (r.seconds * self.peak * self.world)
        if r.aux_mean is not None:
            rec["aux_loss"] = r.aux_mean
        metrics = {f"train/{k}": v for k, v in rec.items() if k != "step" and v is not None}
        if self.routing is not None:
            metrics.update(routing_metrics(self.accelerator, self.routing))
        self.accelerator.log(metrics, step=step)
        if self.main_proc:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{r.lr:.2e}", tok_s=f"{rec['tokens_per_second']:.0f}",
                        refresh=False)

    # -- evaluate and save ------------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        """Step 4 on the dev prompts; accuracy per language goes to the trackers."""
        if not self.dev_records:
            return {}
        from src.evaluate.predict import predict
        from src.evaluate.scoring import score

        t = time.time()
        tmp = self.out_dir / f"{ckpt.EVAL_TMP_PREFIX}{step}"
        if self.config.zero == 3:
            # ZeRO-3 forwards are collective and step 4's decoder loop runs a data-dependent number of them per rank:
            # every rank evaluates its shard on a plain full copy of the current weights instead.
            eval_model = materialize_copy(self.accelerator, self.plugin, self.unwrapped, self.tokenizer, tmp,
                                          is_moe=self.is_moe, dtype=self.dtype, writer=self.renamer)
        else:
            eval_model = self.unwrapped
        try:
            res = evaluate_dev(self.accelerator, lora.plain_view(eval_model), self.tokenizer, self.dev_records,
                               predict, score, self.config, self.out_dir / "dev" / f"step-{step}")
        finally:
            if eval_model is not self.unwrapped:
                self._drop_eval_copy(eval_model, tmp)
        if self.main_proc and res:
            res["dev/seconds"] = time.time() - t
            self.accelerator.log(res, step=step)
            self.log(f"[train] dev evaluation at step {step} ({res['dev/seconds']:.0f}s): {format_dev(res)}")
        self.model.train()
        if self.routing is not None:
            self.routing.reset()  # the dev forwards are not training routing
        return res

    def _drop_eval_copy(self, eval_model, tmp: Path) -> None:
        import shutil

        del eval_model
        if self.on_gpu:
            torch.cuda.empty_cache()
        self.accelerator.wait_for_everyone()
        if self.renamer:
            shutil.rmtree(tmp, ignore_errors=True)

    def save(self, step: int) -> None:
        config = self.config
        state = {"step": step, **self._data_position(step), "signature": self.signature, "model": str(config.model),
                 "train": str(config.train), "lr": self.lr, "is_moe": self.is_moe, "seed": config.seed,
                 "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        ckpt.save_checkpoint(self.accelerator, self.model, self.tokenizer, self.out_dir, step, state,
                             is_moe=self.is_moe, max_ckpts=config.max_ckpts, renamer=self.renamer, log=self.log)

    # -- the loop ---------------------------------------------------------------------------------------------------
    def _micro_batches(self, in_epoch: int):
        """This rank's micro-batches from step ``in_epoch`` of the epoch on, as lists of one optimizer step each."""
        loader = torch.utils.data.DataLoader(self.rows, batch_sampler=self.plan.batches(self.rank, in_epoch),
                                             collate_fn=self.collator, num_workers=self.num_workers,
                                             pin_memory=self.on_gpu, persistent_workers=False)
        batches = iter(loader)
        for s in range(in_epoch, self.plan.steps_per_epoch):
            yield [next(batches) for _ in range(self.plan.micro_steps_in(s))]

    def fit(self) -> None:
        from tqdm.auto import tqdm

        config, total = self.config, self.total_steps
        stop_at = min(total, config.stop_at_step) if config.stop_at_step else total
        if self._already_at_end(stop_at):
            return
        bar = tqdm(total=total, initial=self.start_step, desc="train", unit="step",
                   disable=not self.main_proc or config.no_progress, dynamic_ncols=True)
        step, last_eval = self.start_step, -1
        in_out = self.resume_from is not None and self.resume_from.parent.resolve() == self.out_dir.resolve()
        last_saved = self.start_step if in_out else -1  # a checkpoint resumed from --out is already here
        window = Throughput()
        self.model.train()
        while step < stop_at:
            epoch, in_epoch = divmod(step, self.plan.steps_per_epoch)
            steps = self._micro_batches(in_epoch)
            while True:
                started = (time.time(), time.process_time())
                micro = next(steps, None)
                if micro is None:
                    break
                result = self.train_step(micro, started)
                step += 1
                bar.update(1)
                if step % config.log_every == 0 or step == stop_at:
                    self.log_step(step, epoch, result, window, bar)
                if self.eval_every > 0 and step % self.eval_every == 0 and step < total:
                    self.evaluate(step)
                    last_eval = step
                if self.save_every > 0 and step % self.save_every == 0 and step < stop_at:
                    self.save(step)
                    last_saved = step
                if step >= stop_at:
                    break
        bar.close()
        if step != last_saved and self.save_every >= 0:
            self.save(step)
        if step >= total and self.eval_every >= 0 and last_eval != step:
            self.evaluate(step)
        self._summary(step, window)
        self.accelerator.end_training()

    def _already_at_end(self, stop_at: int) -> bool:
        """A resumed checkpoint already where this run ends: say so in one line (exit code 0); nothing is trained,
        saved or evaluated."""
        if self.start_step < stop_at:
            return False
        end = f"--stop-at-step {stop_at}" if stop_at < self.total_steps else self._run_end()
        self.log(f"[train] {self.resume_from} is at step {self.start_step}, the end of this run ({end}): nothing to "
                 f"train")
        self.accelerator.end_training()
        return True

    def _summary(self, step: int, window: Throughput) -> None:
        if window.seconds <= 0:
            return
        summary = {"steps": step - self.start_step, "tokens_per_second": window.tokens / window.seconds}
        if self.peak:
            summary["mfu"] = window.flops / (window.seconds * self.peak * self.world)
        done = "finished" if step >= self.total_steps else f"stopped at step {step} (--stop-at-step)"
        self.log(f"[train] {done}: " + json.dumps(summary))
