"""One judged evaluation, start to end: read the questions, make the answers, ask the judge, write the results.

    OUT/run.json               the generation settings (a rerun with others is refused without --overwrite)
    OUT/answers.jsonl          every answer, appended as made
    OUT/MODE/run.json          the judge's settings for that mode (score or order)
    OUT/MODE/judgments.jsonl   every request to the judge and its raw reply, appended as made
    OUT/MODE/pairs.jsonl       per question and model: parsed values and verdicts
    OUT/MODE/results.json|md   the numbers

Answers are shared by both modes, so a second run in the other mode into the same OUT only asks the judge.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from src.common.errors import UsageError
from src.common.io import write_json
from src.common.locks import hold
from src.common.openai_client import SERVER_DEFAULT, ApiError, OpenAIClient
from src.common.rerun import check_rerun, normalised
from src.judge.answer import Generation, ModelSpec, answer_all, answer_counts, parse_spec
from src.judge.budget import Budget
from src.judge.judging import judge_all, judge_settings, plan
from src.judge.prompts import load_prompt
from src.judge.questions import read_questions
from src.judge.report import left_out_text, write_results
from src.judge.verdicts import ORDERS, build_pair

ANSWERS = "answers.jsonl"
MODES = ("score", "order")


def model_specs(args) -> tuple[ModelSpec, list[ModelSpec]]:
    baseline = parse_spec(args.baseline, "--baseline")
    models = [parse_spec(m, "--model") for m in args.model]
    names = [baseline.name] + [m.name for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError("--model", f"two models are named {twice[0]!r}; name them apart as NAME=FOLDER")
    return baseline, models


def judge_client(args) -> tuple[OpenAIClient, str]:
    """The judge's client and the name its judgments are recorded under: --judge-model, the one model the server
    lists, or for transformers serve (which answers with the one model it serves) its URL."""
    from src.generation.backends import name_served_model

    client = OpenAIClient(args.judge_base, args.judge_model, timeout=args.judge_timeout)
    if client.model:
        return client, client.model
    try:
        name_served_model(client, client.engine())
    except ApiError as e:
        raise UsageError("--judge-model", f"{e}") from None
    return client, client.base if client.model == SERVER_DEFAULT else client.model


def prepare_out(args, generation: dict, judging: dict) -> tuple[Path, Path]:
    """Take OUT (one run at a time), refuse earlier outputs made with other settings, start afresh on --overwrite."""
    out = Path(args.out)
    mode_dir = out / args.mode
    hold(out, "judge")
    check_rerun(out, "run.json", generation, args.overwrite, "judge (answers)")
    check_rerun(mode_dir, "run.json", judging, args.overwrite, f"judge ({args.mode} mode)")
    if args.overwrite:
        (out / ANSWERS).unlink(missing_ok=True)
        shutil.rmtree(mode_dir, ignore_errors=True)
    mode_dir.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {"settings": normalised(generation)})
    write_json(mode_dir / "run.json", {"settings": normalised(judging)})
    return out, mode_dir


def run(args) -> int:
    questions, skipped = read_questions(args.questions, args.limit, tuple(args.skip_label))
    baseline, models = model_specs(args)
    gen = Generation(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty, args.seed,
                     args.format)
    prompt = load_prompt(args.prompt_file, args.prompt_key or args.mode)
    client, judge = judge_client(args)
    settings = judge_settings(judge, prompt, args.judge_max_tokens)
    out, mode_dir = prepare_out(args, gen.settings(), settings)
    budget, progress = Budget(args.max_requests), not args.no_progress
    answers, answered = answer_all([baseline, *models], questions, gen, out / ANSWERS, budget, progress)
    orders = ORDERS[:args.orders]
    tasks, waiting = plan(questions, [m.name for m in models], baseline.name, orders, answers, prompt, settings)
    with client:
        rows, judged = judge_all(client, tasks, settings, mode_dir / "judgments.jsonl", budget, args.concurrency,
                                 progress)
    pairs = [build_pair(q, m.name, {o: rows.get((q.key, m.name, o), {}).get("reply") for o in orders}, args.mode,
                        args.parser, prompt.role) for q in questions for m in models]
    missing = len(questions) * len(models) * len(orders) - len(rows)
    meta = {"settings": {"mode": args.mode, "judge": judge, "prompt": prompt.source, "parser": args.parser,
                         "orders": list(orders), "baseline": baseline.name, "models": [m.name for m in models],
                         "questions": [str(p) for p in args.questions], "generation": gen.settings(),
                         "bootstrap": args.bootstrap},
            "complete": missing == 0,
            "counts": {"questions": len(questions), "skipped_questions": dict(skipped), "answers": answered,
                       "answers_per_model": answer_counts(answers, [baseline.name] + [m.name for m in models]),
                       "judgments": judged, "missing_judgments": missing, "waiting_for_answers": waiting},
            "languages": list(dict.fromkeys(q.language for q in questions))}
    results = write_results(mode_dir, meta, pairs, rows, args.bootstrap, args.seed)
    print_summary(results, budget, mode_dir, answered, judged, skipped)
    return 0


def print_summary(results: dict, budget: Budget, mode_dir: Path, answered: dict, judged: dict, skipped) -> None:
    for model, groups in results["models"].items():
        n = groups["overall"]
        ratio = "–" if n["ratio"] is None else f"{n['ratio']:.1f}%"
        print(f"[judge] {model} vs {results['settings']['baseline']}: ratio {ratio}, win/tie/lose "
              f"{n['wins']}/{n['ties']}/{n['losses']}, {n['unreadable']} unreadable of {n['pairs']} pairs")
    if budget.spent:
        print(f"[judge] stopped: the request budget (--max-requests {budget.limit}) is spent; left: "
              f"{answered['left']} answers, {results['counts']['missing_judgments']} judgments; rerun to continue")
    left_out = left_out_text(skipped)
    print(f"[judge] read {results['counts']['questions']} questions ({', '.join(results['languages'])}; left out: "
          f"{left_out}); answers {answered['new']} new, {answered['reused']} reused; judgments {judged['new']} new, "
          f"{judged['reused']} reused, {len(results['unreadable'])} unreadable; wrote {mode_dir}/results.json, "
          f"results.md, pairs.jsonl")
