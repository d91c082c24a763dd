"""Forward+backward time of our SparseMoeBlock vs transformers' Qwen2MoeSparseMoeBlock and vs the ideal.

    python bench/moe_block_speed.py [--tokens-tiny 4096 --tokens-05b 1024 --repeats 5] [--cpu-time]

Same shapes (E=7, k=2), same weights, same routing for both blocks. "ideal" is the dense MLP run k times on the same
tokens: the matmul work every top-k MoE must do, with no routing, sorting or per-expert weights. transformers' block
always carries a shared expert; it gets width 0 here (output exactly 0), as in our Qwen2-MoE export. Repeats are
interleaved across the three and the minimum is reported (other jobs on the machine only ever add time).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import Qwen2MoeConfig  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP, Qwen2MoeSparseMoeBlock  # noqa: E402

from src.models.moe import MoESettings, SparseMoeBlock  # noqa: E402

EXPERTS, TOP_K = 7, 2


def build(hidden: int, intermediate: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    config = Qwen2MoeConfig(hidden_size=hidden, intermediate_size=intermediate, moe_intermediate_size=intermediate,
                            shared_expert_intermediate_size=0, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                            norm_topk_prob=True, hidden_act="silu")
    config._experts_implementation = "grouped_mm"  # transformers' default for its MoE models
    theirs = Qwen2MoeSparseMoeBlock(config)
    dense = Qwen2MoeMLP(config, intermediate_size=intermediate)
    settings = MoESettings(EXPERTS, TOP_K, (0,), norm_topk_prob=True)
    ours = SparseMoeBlock(hidden, intermediate, dense.act_fn, settings, layer_idx=0)
    with torch.no_grad():
        for p in [*theirs.parameters(), *dense.parameters()]:
            p.normal_(0.0, 0.02)
        theirs.gate.weight.normal_(0.0, 1.0)  # a router that spreads tokens over all experts
        ours.gate.weight.copy_(theirs.gate.weight)
        ours.experts.gate_up_proj.copy_(theirs.experts.gate_up_proj)
        ours.experts.down_proj.copy_(theirs.experts.down_proj)
    return ours.train(), theirs.train(), dense.train()


def step(run, x: torch.Tensor, grad: torch.Tensor, module: torch.nn.Module, clock) -> float:
    module.zero_grad(set_to_none=True)
    x.grad = None
    start = clock()
    run(x).backward(grad)
    return clock() - start


def bench(name: str, hidden: int, intermediate: int, tokens: int, repeats: int, clock=time.perf_counter
          ) -> dict[str, float]:
    torch.manual_seed(0)
    ours, theirs, dense = build(hidden, intermediate)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    grad = torch.randn(1, tokens, hidden)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff < 1e-5, f"blocks disagree ({diff})"
    runs = {
        "ours": (ours, ours),
        "transformers": (theirs, theirs),
        "ideal (dense MLP x k)": (lambda h: torch.cat([dense(h) for _ in range(TOP_K)]), dense),
    }
    grads = {"ideal (dense MLP x k)": grad.repeat(TOP_K, 1, 1)}
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for label, (run, module) in runs.items():
            times[label].append(step(run, x, grads.get(label, grad), module, clock))
    best = {label: min(t[1:]) for label, t in times.items()}
    ideal = best["ideal (dense MLP x k)"]
    print(f"\n{name}: H={hidden} I={intermediate} E={EXPERTS} k={TOP_K}, {tokens} tokens, fwd+bwd, "
          f"{torch.get_num_threads()} threads, {'CPU' if clock is time.thread_time else 'wall'} time, "
          f"best of {repeats}")
    for label, seconds in best.items():
        print(f"  {label:24s} {seconds * 1000:9.1f} ms   {seconds / ideal:5.2f}x ideal")
    print(f"  ours / transformers      {best['ours'] / best['transformers']:5.2f}")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-tiny", type=int, default=4096)
    parser.add_argument("--tokens-05b", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, timed in thread CPU time: stable on a machine shared with other jobs")
    args = parser.parse_args(argv)
    clock = time.perf_counter
    if args.cpu_time:  # thread CPU time only counts this thread's work, so run on one thread
        clock = time.thread_time
        torch.set_num_threads(1)
    bench("tiny", 64, 256, args.tokens_tiny, args.repeats, clock)
    bench("Qwen2-0.5B-sized", 896, 4864, args.tokens_05b, args.repeats, clock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
