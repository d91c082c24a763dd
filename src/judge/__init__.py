"""Judged open answers (LLMZoo-style): open questions answered by several checkpoints, compared by a judge model.

questions.py reads the questions, answer.py makes the answers, prompts.py builds the judge's messages, judging.py
sends them, parse.py reads the judge's replies, verdicts.py turns them into per-pair outcomes, stats.py computes the
numbers and report.py writes them; util/judge.py is the entry point (docs/judge.md).
"""
