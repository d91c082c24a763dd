"""Step 3: train a dense or Post-MoE causal LM on step 2's packed rows with accelerate + DeepSpeed (ZeRO-1/2/3).

Launch with ``3.single_node_train.sh`` (one node) or ``scripts/multi_node_train_{dense,moe}.sh`` (one command per node);
``python -m src.train.train ...`` alone runs one process. See docs/train.md for every flag.

What one optimizer step does:
1. take this rank's ``m <= --grad-accum`` micro-batches of the step (fixed by the data position, see data.py);
2. all-reduce the number of label tokens of the whole step over all ranks (``N``);
3. per micro-batch: forward with per-document position ids and no attention mask (transformers builds the
   block-diagonal document mask; flash-attention varlen on GPU), summed token cross-entropy, scaled so that the
   update is the mean over all ``N`` label tokens of the step whatever the row lengths (plus the MoE auxiliary loss);
   ``accelerator.backward`` (DeepSpeed steps, clips to 1.0 and zeroes at the step's last micro-batch);
4. LR scheduler step, logging (loss, lr, grad norm, tokens/s, MFU), dev evaluation and checkpoint when due.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DENSE_LR, MOE_LR = 1e-5, 1e-4  # the paper's learning rates
# bf16 dense peak FLOP/s by GPU name (for MFU); --peak-tflops overrides.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
               ("A10G", 70.0), ("A10", 125.0), ("4090", 165.0), ("3090", 71.0), ("V100", 125.0)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m src.train.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--model", required=True, help="base model: HF folder or hub id, or a Post-MoE checkpoint")
    g.add_argument("--train", required=True, help="step 2 output folder (datasets.save_to_disk rows)")
    g.add_argument("--dev", default=None, help="step 1 dev.jsonl for in-training evaluation (optional)")
    g.add_argument("--out", required=True, help="checkpoint folder: OUT/checkpoint-<step>/")
    g.add_argument("--expect", choices=["any", "dense", "moe"], default="any",
                   help="fail early unless --model is of this kind (the MoE launch script passes moe)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--zero", type=int, choices=[1, 2, 3], default=1, help="DeepSpeed ZeRO stage (configs/zeroN.json)")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {DENSE_LR} dense, {MOE_LR} MoE)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (none on biases and norm weights)")
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip", type=float, default=1.0, help="gradient clipping (max global norm)")
    g.add_argument("--epochs", type=int, default=1, help="passes over the rows (step 2 already repeats SFT data)")
    g.add_argument("--batch-size", type=int, default=2, help="rows per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--max-steps", type=int, default=None,
                   help="total optimizer steps (default: epochs x steps per epoch); the schedule ends here")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="end this run (with a checkpoint) at this step without changing the schedule; "
                        "continue later with --resume (time-limited jobs)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--attn-impl", default="auto",
                   help="attention kernel: auto (flash_attention_2 on GPU when flash-attn is installed, else sdpa), "
                        "sdpa, eager, flash_attention_2, ...")
    g.add_argument("--num-workers", type=int, default=None, help="data loader workers (default 2 on GPU, 0 on CPU)")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=None,
                   help="dev evaluation every N optimizer steps (default: about 10 per run); 0: at the end only; "
                        "<0: never")
    g.add_argument("--dev-limit", type=int, default=None, help="evaluate on this many dev prompts (evenly spread)")
    g.add_argument("--dev-batch-size", type=int, default=8)
    g.add_argument("--dev-max-new-tokens", type=int, default=128)
    g.add_argument("--dev-mode", default="generate", help="step 4 prediction mode (generate or its scoring mode)")
    g.add_argument("--save-every", type=int, default=None,
                   help="checkpoint every N optimizer steps (default: about 20 per run); 0: at the end only; "
                        "<0: never (benchmarks, smoke tests)")
    g.add_argument("--max-ckpts", type=int, default=3, help="keep the newest N checkpoints (<= 0: keep all)")
    g.add_argument("--resume", default=None, help="latest (newest checkpoint in --out, fresh start if none) or a "
                                                  "checkpoint folder")
    g.add_argument("--log-dir", default=None, help="TensorBoard folder (default OUT/logs)")
    g.add_argument("--run-name", default=None, help="run name for the trackers (default: the name of --out)")
    g.add_argument("--log-every", type=int, default=1, help="log every N optimizer steps")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`; "
                                                        "WANDB_MODE=offline works without an account)")
    g.add_argument("--wandb-project", default="apollomoe")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak FLOP/s (TFLOP/s) for MFU (default: known GPUs' bf16 dense peak)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    from . import lora

    lora.add_args(p)
    args = p.parse_args(argv)
    lora.check_args(p, args)
    for name in ("batch_size", "grad_accum", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------------------- setup
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """DeepSpeed always needs a process group: give a plain ``python -m src.train.train`` a world of one."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))


def moe_module():
    """src.models.moe when it is installed, else None (MoE checkpoints are then not recognised)."""
    try:
        from src.models import moe
    except ImportError:
        return None
    return moe


def is_moe_path(path) -> bool:
    moe = moe_module()
    return bool(moe is not None and Path(str(path)).is_dir() and moe.is_moe_checkpoint(path))


def deepspeed_config(zero: int, *, batch_size: int, bf16: bool, clip: float) -> dict:
    cfg = json.loads((CONFIG_DIR / f"zero{zero}.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = batch_size
    cfg["bf16"] = {"enabled": bool(bf16)}
    cfg["gradient_clipping"] = clip
    return cfg


def choose_attn_impl(requested: str, on_gpu: bool) -> str:
    if requested != "auto":
        return requested
    if on_gpu:
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def peak_flops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def flop_params(model) -> int:
    """Parameters that cost 6 FLOPs per token (forward + backward): all but the input embedding table (the output
    projection counts even when tied to it); routed experts count k/E of their size."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    cfg = model.config
    post_moe = getattr(cfg, "post_moe", None) or {}
    n_exp = post_moe.get("num_experts") or getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    k = post_moe.get("top_k") or getattr(cfg, "num_experts_per_tok", None)
    total = 0
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", p.numel())
        if p is emb:
            continue
        if n_exp and k and ".experts" in name:
            n = n * k / n_exp
        total += n
    if out is not None and out.weight is emb:
        total += getattr(emb, "ds_numel", emb.numel())
    return int(total)


@contextmanager
def no_zero3_init(plugin):
    """Build models unpartitioned inside a ZeRO-3 run (transformers uses deepspeed.zero.Init while the DeepSpeed
    config it is told about says stage 3)."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def main(argv=None) -> int:
    args = parse_args(argv)
    single_process_env()
    import warnings

    # DeepSpeed's ZeRO code still calls this torch API; the warning is noise for our users.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from datetime import timedelta

    from src.common.io import iter_jsonl, write_jsonl
    from src.models.loading import load_model, load_tokenizer

    from . import checkpoint as ckpt
    from . import lora
    from .data import BatchPlan, Collator, load_rows
    from .optim import build_optimizer, build_scheduler, no_decay_names

    on_gpu = torch.cuda.is_available()
    is_moe = is_moe_path(args.model)
    if args.expect == "moe" and not is_moe:
        raise SystemExit(f"--expect moe: {args.model} is not a Post-MoE checkpoint (scripts/upcycle_moe.sh makes one)")
    if args.expect == "dense" and is_moe:
        raise SystemExit(f"--expect dense: {args.model} is a Post-MoE checkpoint")
    lr = args.lr if args.lr is not None else (MOE_LR if is_moe else DENSE_LR)
    out_dir = Path(args.out)
    log_dir = Path(args.log_dir) if args.log_dir else out_dir / "logs"
    run_name = args.run_name or out_dir.resolve().name

    ds_cfg = deepspeed_config(args.zero, batch_size=args.batch_size, bf16=on_gpu, clip=args.clip)
    plugin = DeepSpeedPlugin(hf_ds_config=ds_cfg, zero3_init_flag=args.zero == 3)
    trackers = ["tensorboard"] + (["wandb"] if args.wandb else [])
    if args.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SystemExit("--wandb needs the wandb package: pip install wandb (TensorBoard logging needs nothing)") from None
    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision="bf16" if on_gpu else "no",
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(log_dir), logging_dir=str(log_dir)),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(backend="nccl" if on_gpu else "gloo", timeout=timedelta(minutes=60))],
    )
    main_proc = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index

    def log(msg: str) -> None:
        if main_proc:
            print(msg, flush=True)

    set_seed(args.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Is OUT shared by every node? (normal on clusters) Then only global rank 0 renames and rotates checkpoints,
    # otherwise each node's local rank 0 does it in its own copy.
    from accelerate.utils import broadcast_object_list

    token = [f"{os.getpid()}-{time.time()}" if main_proc else None]
    broadcast_object_list(token)
    marker = out_dir / ".shared-fs-probe"
    if main_proc:
        marker.write_text(token[0])
    accelerator.wait_for_everyone()
    seen = marker.is_file() and marker.read_text() == token[0]
    shared_fs = bool(accelerator.gather(torch.tensor([int(seen)], device=accelerator.device)).min().item())
    accelerator.wait_for_everyone()
    renamer = main_proc if shared_fs else accelerator.is_local_main_process
    if renamer:
        marker.unlink(missing_ok=True)
        for p in ckpt.clean_stale(out_dir):
            print(f"[train] removed {p.name} (left by an interrupted save)", flush=True)
    accelerator.project_configuration.save_on_each_node = not shared_fs

    resume_from = ckpt.resolve_resume(args.resume, out_dir)
    if args.resume == "latest" and resume_from is None:
        log(f"[train] --resume latest: no checkpoint in {out_dir}, starting from scratch")

    # ---------------------------------------------------------------------------------------------- model, data
    tokenizer = load_tokenizer(args.model, padding_side="left")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    t0 = time.time()
    if args.qlora:
        model = lora.load_4bit(args.model, dtype, accelerator.local_process_index, is_moe=is_moe)
    elif (is_moe or lora.enabled(args)) and args.zero == 3:
        # The MoE loader builds and fills a full model, and peft wraps full layers: DeepSpeed partitions it later.
        with no_zero3_init(plugin):
            model = load_model(args.model, torch_dtype=dtype)
    else:
        model = load_model(args.model, torch_dtype=dtype)  # ZeRO-3 dense: partitioned while loading (zero.Init)
    attn_impl = choose_attn_impl(args.attn_impl, on_gpu)
    if getattr(model.config, "_attn_implementation", None) != attn_impl:
        model.set_attn_implementation(attn_impl)
    flatten = attn_impl.startswith("flash")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = lora.apply(model, args, base=args.model, is_moe=is_moe)
    if is_moe and args.zero == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, list(moe_module().SPARSE_BLOCK_CLASSES))
    n_flop_params = flop_params(model)
    n_layers = model.config.num_hidden_layers
    hidden = model.config.hidden_size
    log(f"[train] model {args.model} ({'Post-MoE' if is_moe else 'dense'}, {n_flop_params / 1e6:.1f}M compute "
        f"params, attention {attn_impl}{', gradient checkpointing' if args.gradient_checkpointing else ''}) "
        f"loaded in {time.time() - t0:.1f}s")
    param_counts = lora.param_counts(model)
    if lora.enabled(args):
        log(f"[train] LoRA r {args.lora_r}, alpha {lora.alpha(args)}, targets {args.lora_targets}: "
            f"{lora.describe(param_counts)}")

    rows = load_rows(args.train)
    plan = BatchPlan(len(rows), world, args.batch_size, args.grad_accum)
    total_steps = args.max_steps or plan.steps_per_epoch * args.epochs
    if plan.dropped_rows_per_epoch:
        log(f"[train] {plan.dropped_rows_per_epoch} of {len(rows)} rows at the end of each epoch do not fill a "
            f"global micro-batch of {plan.rows_per_micro_step} rows and are not trained on")
    eval_every = args.eval_every if args.eval_every is not None else max(1, total_steps // 10)
    save_every = args.save_every if args.save_every is not None else max(1, total_steps // 20)
    collator = Collator(tokenizer.pad_token_id, flatten=flatten, with_language_ids=is_moe)
    num_workers = args.num_workers if args.num_workers is not None else (2 if on_gpu else 0)

    optimizer = build_optimizer(model, lr, args.weight_decay, args.adam_betas, args.adam_eps, fused=on_gpu)
    log(f"[train] AdamW lr {lr}, weight decay {args.weight_decay} ({len(no_decay_names(model))} bias/norm tensors "
        f"without decay), cosine to 0 over {total_steps} steps, warmup ratio {args.warmup_ratio}")
    scheduler = build_scheduler(optimizer, total_steps, args.warmup_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    engine = model
    unwrapped = accelerator.unwrap_model(model)
    if lora.enabled(args):
        lora.drop_frozen_tied_weights_on_save(engine)

    # The settings an exact resume depends on: they must not change between the runs.
    run_signature = {"num_rows": len(rows), "world_size": world, "batch_size": args.batch_size,
                     "grad_accum": args.grad_accum, "total_steps": total_steps, "zero": args.zero,
                     "lora": lora.settings(args)}
    start_step = 0
    if resume_from is not None:
        state = ckpt.read_trainer_state(resume_from)
        diff = {k: (state.get("signature", {}).get(k), v) for k, v in run_signature.items()
                if state.get("signature", {}).get(k) != v}
        if diff:
            raise SystemExit(f"--resume {resume_from}: the run's settings differ from the checkpoint's, an exact "
                             f"resume is impossible: " + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in diff.items()))
        accelerator.load_state(str(resume_from / ckpt.STATE_DIR), **lora.state_load_kwargs(unwrapped))
        start_step = int(state["step"])
        log(f"[train] resumed from {resume_from} at step {start_step} (weights, optimizer, scheduler, RNG, data "
            f"position: epoch {start_step // plan.steps_per_epoch}, row "
            f"{(start_step % plan.steps_per_epoch) * args.grad_accum * plan.rows_per_micro_step})")

    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
    hparams.update(lr=lr, world_size=world, total_steps=total_steps, is_moe=is_moe, attn_impl=attn_impl)
    accelerator.init_trackers(run_name, config=hparams)
    accelerator.log({f"params/{k}": v for k, v in param_counts.items()}, step=start_step)
    metrics_path = out_dir / "train_log.jsonl"
    if main_proc:
        # On resume keep the records up to the resumed step (a crashed run may have logged steps past it).
        kept = [r for r in (iter_jsonl(metrics_path) if metrics_path.is_file() else []) if r.get("step", 0) <= start_step]
        write_jsonl(metrics_path, kept)
    dev_records = load_dev(args.dev, args.dev_limit) if args.dev and eval_every >= 0 else None
    predict_fn = score_fn = None
    if dev_records:
        predict_fn, score_fn = load_scorer(log)
        if predict_fn is not None:
            log(f"[train] dev evaluation on {len(dev_records)} prompts "
                f"{'at the end' if eval_every == 0 else f'every {eval_every} steps and at the end'}")

    peak = peak_flops(args, accelerator.device)
    moe = moe_module() if is_moe else None
    steps_per_epoch = plan.steps_per_epoch
    log(f"[train] {len(rows)} rows, {world} process(es) x {args.batch_size} rows x {args.grad_accum} accumulation = "
        f"{plan.rows_per_micro_step * args.grad_accum} rows per step, {steps_per_epoch} steps per epoch, "
        f"{total_steps} steps in all, ZeRO-{args.zero}, {'bf16' if on_gpu else 'fp32'} on {accelerator.device}")

    def run_eval(step: int) -> dict:
        if predict_fn is None:
            return {}
        t = time.time()
        if args.zero == 3:
            # ZeRO-3 forwards are collective and step 4's decoder loop runs a data-dependent number of them per rank:
            # every rank evaluates its shard on a plain full copy of the current weights instead.
            eval_model = materialize_copy(accelerator, plugin, unwrapped, tokenizer, out_dir / f".tmp-eval-{step}",
                                          is_moe=is_moe, dtype=dtype, writer=renamer)
        else:
            eval_model = unwrapped
        try:
            res = evaluate_dev(accelerator, lora.plain_view(eval_model), tokenizer, dev_records, predict_fn, score_fn,
                               args, out_dir / "dev" / f"step-{step}")
        finally:
            if eval_model is not unwrapped:
                del eval_model
                if on_gpu:
                    torch.cuda.empty_cache()
                accelerator.wait_for_everyone()
                if renamer:
                    import shutil

                    shutil.rmtree(out_dir / f".tmp-eval-{step}", ignore_errors=True)
        if main_proc and res:
            res["dev/seconds"] = time.time() - t
            accelerator.log(res, step=step)
            log(f"[train] dev evaluation at step {step} ({res['dev/seconds']:.0f}s): {format_dev(res)}")
        return res

    def save(step: int) -> None:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        state = {"step": step, "epoch": epoch, "step_in_epoch": in_epoch,
                 "rows_consumed_in_epoch": in_epoch * args.grad_accum * plan.rows_per_micro_step,
                 "signature": run_signature, "model": str(args.model), "train": str(args.train), "lr": lr,
                 "is_moe": is_moe, "seed": args.seed, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        ckpt.save_checkpoint(accelerator, model, tokenizer, out_dir, step, state, is_moe=is_moe,
                             max_ckpts=args.max_ckpts, renamer=renamer, log=log)

    # ------------------------------------------------------------------------------------------------------ loop
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               disable=not main_proc or args.no_progress, dynamic_ncols=True)
    step = start_step
    stop_at = min(total_steps, args.stop_at_step) if args.stop_at_step else total_steps
    last_saved = last_eval = -1
    if resume_from is not None and resume_from.parent.resolve() == out_dir.resolve():
        last_saved = start_step  # that checkpoint is already here
    model.train()
    device = accelerator.device
    routing = None
    if moe is not None and hasattr(moe, "RoutingStats"):
        routing = moe.RoutingStats(unwrapped).__enter__()  # counts expert selections for the logs
    window = {"tokens": 0, "flops": 0.0, "seconds": 0.0}
    while step < stop_at:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        loader = torch.utils.data.DataLoader(rows, batch_sampler=plan.batches(rank, in_epoch), collate_fn=collator,
                                             num_workers=num_workers, pin_memory=on_gpu,
                                             persistent_workers=False)
        batches = iter(loader)
        while in_epoch < steps_per_epoch and step < stop_at:
            t_step, cpu_step = time.time(), time.process_time()
            m = plan.micro_steps_in(in_epoch)
            micro = [next(batches) for _ in range(m)]
            local = torch.tensor([sum(int((b["labels"] != -100).sum()) for b in micro),
                                  sum(b["num_tokens"] for b in micro),
                                  sum(b["doc_len_sq"] for b in micro)], dtype=torch.float64, device=device)
            counts = accelerator.reduce(local, reduction="sum")
            n_label = max(counts[0].item(), 1.0)
            ce_total = torch.zeros((), dtype=torch.float64, device=device)
            aux_total = 0.0
            for i, batch in enumerate(micro):
                accelerator.sync_gradients = i == m - 1
                ce_sum, aux = forward_loss(model, batch, device, is_moe=is_moe, moe=moe)
                loss = ce_sum * (args.grad_accum * world / n_label)
                if aux is not None:
                    loss = loss + aux * (args.grad_accum / m)
                    aux_total += float(aux.detach())
                accelerator.backward(loss)
                ce_total += ce_sum.detach().double()
            lr_used = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            in_epoch += 1
            bar.update(1)
            if step % args.log_every == 0 or step == stop_at:
                ce_global = accelerator.reduce(ce_total, reduction="sum").item()
                dt = time.time() - t_step
                cpu = time.process_time() - cpu_step
                tokens = counts[1].item()
                flops = 6.0 * n_flop_params * tokens + 12.0 * n_layers * hidden * counts[2].item()
                window["tokens"] += tokens
                window["seconds"] += dt
                window["flops"] += flops
                rec = {"step": step, "epoch": epoch, "loss": ce_global / n_label, "lr": lr_used,
                       "grad_norm": grad_norm(engine), "tokens": int(tokens), "label_tokens": int(counts[0].item()),
                       "step_seconds": dt, "step_cpu_seconds": cpu, "tokens_per_second": tokens / dt}
                if peak:
                    rec["mfu"] = flops / (dt * peak * world)
                if aux is not None and aux.requires_grad:
                    rec["aux_loss"] = aux_total / m
                metrics = {f"train/{k}": v for k, v in rec.items() if k != "step" and v is not None}
                if routing is not None:
                    metrics.update(routing_metrics(accelerator, routing))
                accelerator.log(metrics, step=step)
                if main_proc:
                    with metrics_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr_used:.2e}",
                                tok_s=f"{rec['tokens_per_second']:.0f}", refresh=False)
            if eval_every > 0 and step % eval_every == 0 and step < total_steps:
                run_eval(step)
                last_eval = step
                model.train()
                if routing is not None:
                    routing.reset()  # the dev forwards are not training routing
            if save_every > 0 and step % save_every == 0 and step < stop_at:
                save(step)
                last_saved = step
    bar.close()
    if step != last_saved and save_every >= 0:
        save(step)
    if step >= total_steps and eval_every >= 0 and last_eval != step:
        run_eval(step)
    if window["seconds"] > 0:
        summary = {"steps": step - start_step, "tokens_per_second": window["tokens"] / window["seconds"]}
        if peak:
            summary["mfu"] = window["flops"] / (window["seconds"] * peak * world)
        log(f"[train] {'finished' if step >= total_steps else f'stopped at step {step} (--stop-at-step)'}: "
            + json.dumps(summary))
    accelerator.end_training()
    return 0


# ------------------------------------------------------------------------------------------------ step pieces
def model_inputs(batch: dict, device, *, is_moe: bool) -> dict:
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
              "position_ids": batch["position_ids"].to(device, non_blocking=True),
              "use_cache": False}
    if "cu_seq_lens_q" in batch:  # flattened rows for flash-attention varlen
        for k in ("cu_seq_lens_q", "cu_seq_lens_k"):
            inputs[k] = batch[k].to(device, non_blocking=True)
        inputs["max_length_q"] = inputs["max_length_k"] = batch["max_length_q"]
    if is_moe:
        inputs["language_ids"] = batch["language_ids"].to(device, non_blocking=True)
    return inputs


def token_losses(logits, labels):
    """Per-position cross-entropy of predicting ``labels[t+1]`` from position ``t`` (0 where ignored), fp32."""
    import torch.nn.functional as F

    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    v = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, v).float(), shift.reshape(-1), ignore_index=-100,
                           reduction="none").view(shift.shape), shift


def forward_loss(model, batch, device, *, is_moe: bool, moe=None):
    """Summed token cross-entropy of one micro-batch (and the MoE auxiliary loss, or None)."""
    import torch.nn.functional as F

    out = model(**model_inputs(batch, device, is_moe=is_moe))
    labels = batch["labels"].to(device, non_blocking=True)
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
    logits = out.logits
    ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shift.reshape(-1), ignore_index=-100,
                             reduction="sum")
    aux = None
    if is_moe and moe is not None and hasattr(moe, "aux_loss"):
        aux = moe.aux_loss(model.module if hasattr(model, "module") else model)
        if aux is not None and not hasattr(aux, "detach"):
            aux = None if aux == 0 else logits.new_tensor(float(aux))
    return ce_sum, aux


def grad_norm(engine) -> float | None:
    try:
        g = engine.get_global_grad_norm()
    except AttributeError:
        return None
    if g is None:
        return None
    return float(g.item() if hasattr(g, "item") else g)


def routing_metrics(accelerator, routing) -> dict:
    """Expert load per MoE layer since the last call (all ranks, padding excluded): the share of routed token
    slots each expert got, and the load imbalance max/mean (1.0 = perfectly balanced)."""
    import torch

    blocks = routing.blocks
    table = torch.zeros(len(blocks), blocks[0].num_experts, dtype=torch.float64)
    for i, block in enumerate(blocks):
        for counts in routing.counts.get(block.layer_idx, {}).values():
            table[i] += counts.double()
    routing.reset()
    table = accelerator.reduce(table.to(accelerator.device), reduction="sum").cpu()
    out = {}
    for i, block in enumerate(blocks):
        total = table[i].sum().item()
        if total <= 0:
            continue
        share = table[i] / total
        out[f"routing/layer{block.layer_idx}/imbalance"] = float(share.max() * share.numel())
        for e, v in enumerate(share.tolist()):
            out[f"routing/layer{block.layer_idx}/expert{e}"] = v
    return out


def flatten_dict(d, prefix="") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten_dict(v, f"{prefix}{k}/"))
    else:
        out[prefix.rstrip("/")] = d
    return out


# --------------------------------------------------------------------------------------------------- dev eval
def load_dev(path, limit: int | None) -> list[dict]:
    from src.common.io import iter_jsonl

    records = list(iter_jsonl(path))
    if limit is not None and 0 < limit < len(records):
        # Evenly spread, so that a small limit still covers every language of the (language-grouped) dev set.
        records = [records[(i * len(records)) // limit] for i in range(limit)]
    return records


def load_scorer(log):
    try:
        from src.evaluate.engine import predict
        from src.evaluate.scoring import score
    except ImportError as e:
        log(f"[train] dev evaluation disabled: step 4's scorer is not importable ({e})")
        return None, None
    return predict, score


def evaluate_dev(accelerator, model, tokenizer, records, predict, score, args, save_dir: Path) -> dict:
    """Each rank predicts a disjoint, equally long shard (so ZeRO-3's collective forwards stay in step; transformers
    syncs generation across ranks under ZeRO-3 by itself); rank 0 gathers, scores and returns flat metrics."""
    import torch
    from accelerate.utils import gather_object

    from src.common.io import write_json, write_jsonl

    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(records)
    per = math.ceil(n / world)
    padded = records + [records[-1]] * (per * world - n)
    shard = padded[rank * per:(rank + 1) * per]
    kwargs = dict(batch_size=args.dev_batch_size, max_new_tokens=args.dev_max_new_tokens, mode=args.dev_mode,
                  progress=accelerator.is_main_process)
    params = inspect.signature(predict).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params or any(p.kind == p.VAR_KEYWORD for p in params.values())}
    was_training = model.training
    model.eval()
    model.config.use_cache = True
    try:
        with torch.no_grad():
            preds = predict(model, tokenizer, shard, **kwargs)
    finally:
        model.config.use_cache = False
        model.train(was_training)
    gathered = gather_object([list(preds)])
    if not accelerator.is_main_process:
        return {}
    predictions = [p for part in gathered for p in part][:n]
    result = score(predictions)
    write_jsonl(save_dir / "predictions.jsonl", predictions)
    write_json(save_dir / "score.json", result)
    return dev_metrics(result)


def dev_metrics(result: dict) -> dict:
    """Step 4's score as ``dev/...`` scalars: overall, major/minor averages and accuracy per language."""
    out = {}
    if isinstance(result.get("accuracy_items"), (int, float)):
        out["dev/accuracy"] = float(result["accuracy_items"])
    for avg in ("major_average", "minor_average"):
        if isinstance(result.get(avg), dict) and isinstance(result[avg].get("accuracy"), (int, float)):
            out[f"dev/{avg}/accuracy"] = float(result[avg]["accuracy"])
    for lang, entry in (result.get("languages") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("accuracy"), (int, float)):
            out[f"dev/language/{lang}/accuracy"] = float(entry["accuracy"])
    return out


def format_dev(res: dict) -> str:
    parts = [f"accuracy {res.get('dev/accuracy', float('nan')):.3f}"]
    for avg in ("major", "minor"):
        if f"dev/{avg}_average/accuracy" in res:
            parts.append(f"{avg} {res[f'dev/{avg}_average/accuracy']:.3f}")
    langs = " ".join(f"{k.split('/')[2]} {v:.2f}" for k, v in res.items() if k.startswith("dev/language/"))
    return ", ".join(parts) + (f" | {langs}" if langs else "")


def materialize_copy(accelerator, plugin, model, tokenizer, tmp_dir: Path, *, is_moe: bool, dtype, writer: bool):
    """A plain (unpartitioned) copy of a ZeRO-3 model on every rank, through a temporary HF folder."""
    import deepspeed

    from src.models.loading import load_model

    from . import lora

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if writer:
            if lora.is_lora(model):  # the adapter only: loading it applies it to --model again, merged
                lora.save_adapter_files(model, None, tmp_dir)
            elif is_moe:
                moe_module().save_moe(model, None, tmp_dir)
            else:
                model.save_pretrained(tmp_dir, safe_serialization=True)
    accelerator.wait_for_everyone()
    with no_zero3_init(plugin):
        copy_ = load_model(tmp_dir, torch_dtype=dtype, device=accelerator.device)
    copy_.eval()
    return copy_


if __name__ == "__main__":
    sys.exit(main())
