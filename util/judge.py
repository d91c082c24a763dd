"""Judged open answers (LLMZoo-style): open medical questions answered by a baseline and one or more models, each
model's answer compared with the baseline's by a judge model behind any OpenAI-compatible server.

    python -m util.judge --baseline models/Qwen2-0.5B --model ckpts/run/checkpoint-500 \\
        --judge-base http://127.0.0.1:8000 [--judge-model NAME] [--mode score|order] [--orders 2|1] \\
        [--questions FILE ...] [--out results/judge]

The judge's API key comes from the environment (OPENAI_API_KEY) only. Writes OUT/answers.jsonl and, per mode,
OUT/MODE/judgments.jsonl (the judge's prompts and raw replies), pairs.jsonl, results.json and results.md; a rerun
resumes. What each number means and where this differs from LLMZoo's code: docs/judge.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from src.common import cli
from src.common.chat_formats import FORMAT_NAMES
from src.common.defaults import repo_relative
from src.common.errors import UsageError, require_at_least
from src.judge.parse import PARSERS
from src.judge.prompts import DEFAULT_PROMPTS
from src.judge.questions import DEFAULT_QUESTIONS
from src.judge.run import MODES, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m util.judge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("questions and answers")
    g.add_argument("--questions", type=Path, action="append", help="JSON Lines of {id, query[, label, language]} "
                   f"(repeatable; default {repo_relative(DEFAULT_QUESTIONS)})")
    g.add_argument("--limit", type=int, help="the first N questions of each language")
    g.add_argument("--skip-label", action="append", default=[], metavar="LABEL",
                   help="leave out questions with this label (repeatable; LLMZoo's metric leaves out coding, math)")
    g.add_argument("--baseline", required=True, metavar="[NAME=]FOLDER[@URL]",
                   help="the model every other one is compared with: a checkpoint folder (in-process) or FOLDER@URL "
                        "(served; FOLDER names its tokenizer)")
    g.add_argument("--model", action="append", required=True, metavar="[NAME=]FOLDER[@URL]",
                   help="a model to compare with the baseline (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default 512)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    g.add_argument("--top-p", type=float, default=0.7, help="with --temperature above 0 (default 0.7)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=42, help="sampling seed per question, and the bootstrap's")
    g.add_argument("--format", choices=FORMAT_NAMES, help="chat format (default: from each model)")
    g = p.add_argument_group("the judge")
    g.add_argument("--judge-base", default=os.environ.get("OPENAI_BASE_URL"),
                   help="the judge server's URL (default: $OPENAI_BASE_URL); its key: $OPENAI_API_KEY")
    g.add_argument("--judge-model", help="the judge model's name (default: the one model the server serves)")
    g.add_argument("--mode", choices=MODES, default="score",
                   help="score: both answers rated 1-10; order: the answers ranked with '>' and '='")
    g.add_argument("--orders", type=int, choices=(1, 2), default=2,
                   help="2 (default): every pair judged with each answer shown first; 1: the baseline always shown "
                        "first (LLMZoo)")
    g.add_argument("--parser", choices=PARSERS, default="robust", help="how replies are read (docs/judge.md)")
    g.add_argument("--prompt-file", type=Path, default=DEFAULT_PROMPTS,
                   help="judge instructions ({key: {role, prompt}}; LLMZoo's prompt_all.json works)")
    g.add_argument("--prompt-key", help="the entry of --prompt-file (default: the mode's name)")
    g.add_argument("--judge-max-tokens", type=int, default=1024)
    g.add_argument("--judge-timeout", type=float, default=300.0, help="seconds per judge request")
    g.add_argument("--concurrency", type=int, default=4, help="judge requests in flight")
    g.add_argument("--max-requests", type=int, help="requests this run may send to servers (judge and served "
                   "answers); it stops cleanly when they are spent")
    g = p.add_argument_group("output")
    g.add_argument("--bootstrap", type=int, default=1000, help="resamples of the ratio's 95%% interval (0: none)")
    g.add_argument("--out", type=Path, default=Path("results/judge"))
    g.add_argument("--overwrite", action="store_true", help="start afresh: remove this run's earlier answers and "
                   "this mode's judgments in --out")
    g.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_at_least(args, {"--limit": 1, "--max-new-tokens": 1, "--judge-max-tokens": 1, "--concurrency": 1,
                            "--max-requests": 0, "--bootstrap": 0})
    if not args.judge_base:
        raise UsageError("--judge-base", "required (or set OPENAI_BASE_URL): the URL of the judge's "
                                         "OpenAI-compatible server")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature" if args.temperature < 0 else "--top-p", "out of range")
    args.questions = args.questions or [DEFAULT_QUESTIONS]
    return run(args)


if __name__ == "__main__":
    sys.exit(cli.run(main))
