"""The training mixture: the priority/epoch table, epoch copies ("entries") and the priority-sampled order.

Order (docs/reference.md, "Priority sampling"): every epoch copy of every record is one entry with weight = its source's priority. The
reference draws ``torch.multinomial(weights, N, replacement=False)``: sequential weighted sampling without
replacement, which caps N at 2^24. Here each entry gets an exponential arrival time ``Exp(1) / priority`` and the
entries are sorted by it. The first arrival among entries is entry i with probability w_i / sum(w), and by
memorylessness the rest follow the same rule among those left, so the permutation has exactly the reference's
distribution, without a cap, in O(N log N). Keys are float64: float32 keys would tie for about a third of 50M entries
(measured), and ties would then be broken by entry index instead of at random.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

DEFAULT_PRIORITIES = Path(__file__).with_name("priorities.yaml")


@dataclass(frozen=True)
class Rule:
    pattern: str
    priority: float
    epochs: float
    origin: str  # the file the rule came from


def _number(value, what: str, where: str, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        raise ValueError(f"{where}: {what} must be a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return value


def load_rules(path: Path) -> tuple[list[Rule], bool]:
    """Rules of a priority file (YAML or JSON) and whether the default rules still apply after them."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot parse the priority table: {e}") from None
    inherit = True
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"rules", "inherit_defaults"})
        if unknown:
            raise ValueError(f"{path}: unknown keys {', '.join(unknown)} (expected 'rules', 'inherit_defaults')")
        inherit = data.get("inherit_defaults", True)
        if not isinstance(inherit, bool):
            raise ValueError(f"{path}: inherit_defaults must be true or false")
        data = data.get("rules")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of rules under 'rules'")
    rules = []
    for i, r in enumerate(data):
        where = f"{path}: rule {i}"
        if not isinstance(r, dict) or set(r) != {"pattern", "priority", "epochs"}:
            raise ValueError(f"{where}: expected exactly the keys pattern, priority, epochs; got {r!r}")
        if not isinstance(r["pattern"], str) or not r["pattern"]:
            raise ValueError(f"{where}: pattern must be a non-empty string")
        rules.append(Rule(r["pattern"], _number(r["priority"], "priority", where, 0, True),
                          _number(r["epochs"], "epochs", where, 0, False), str(path)))
    return rules, inherit


class PriorityTable:
    """Ordered pattern rules; the first match decides a source's priority and epochs."""

    def __init__(self, rules: list[Rule]):
        self.rules = list(rules)

    @classmethod
    def load(cls, override: Path | None = None) -> "PriorityTable":
        rules, _ = load_rules(DEFAULT_PRIORITIES)
        if override is None:
            return cls(rules)
        extra, inherit = load_rules(override)
        return cls(extra + rules if inherit else extra)

    def match(self, source: str) -> Rule | None:
        return next((r for r in self.rules if fnmatch.fnmatchcase(source, r.pattern)), None)

    def resolve(self, sources: list[str]) -> list[Rule]:
        """The rule of every source; ValueError listing all sources that match none."""
        found = [self.match(s) for s in sources]
        missing = [s for s, r in zip(sources, found) if r is None]
        if missing:
            raise ValueError(
                f"{len(missing)} training source(s) match no priority rule: {', '.join(missing)}. Add rules for "
                f"them in a --priorities file (patterns tried in order: {', '.join(r.pattern for r in self.rules)})")
        return found

    def unused(self, sources: list[str]) -> list[str]:
        """Patterns no source used (a table key missing from the data: reported, not an error)."""
        used = {self.match(s).pattern for s in sources if self.match(s)}
        return [r.pattern for r in self.rules if r.pattern not in used]

    def to_list(self) -> list[dict]:
        return [asdict(r) for r in self.rules]


def entries_per_source(n_records: int, epochs: float) -> int:
    """The reference's int(n * epochs), guarded against float error (0.29 * 100 = 28.999...)."""
    return int(math.floor(round(n_records * epochs, 6)))


def build_entries(record_source: np.ndarray, source_epochs: list[float]) -> np.ndarray:
    """Entry -> record index (int32). Per source, in source-id order: its records in input order, repeated so that a
    source of n records gets int(n * epochs) entries, entry j being its record j mod n (docs/reference.md, "Priority sampling")."""
    record_source = np.asarray(record_source)
    by_source = np.argsort(record_source, kind="stable").astype(np.int32)
    counts = np.bincount(record_source, minlength=len(source_epochs))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for s, epochs in enumerate(source_epochs):
        recs = by_source[bounds[s]:bounds[s + 1]]
        k = entries_per_source(len(recs), epochs)
        if k and len(recs):
            parts.append(np.tile(recs, -(-k // len(recs)))[:k])
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def exponential_order(weights: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of range(len(weights)) distributed as sequential weighted sampling without replacement."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_exponential(len(weights))  # float64: see the module docstring on ties
    keys /= weights
    return np.argsort(keys, kind="stable")


def curriculum(lengths: np.ndarray, is_qa: np.ndarray, bins: int = 20) -> dict:
    """Share of pretraining (``is_qa``: pretrain-QA or raw text) vs SFT tokens in each 1/bins of training (by token
    position), entries in order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return {"bins": bins, "qa_token_share": [], "sft_token_share": []}
    mid = np.cumsum(lengths) - lengths / 2  # an entry belongs to the bin of its middle token
    b = np.minimum((mid * bins / total).astype(np.int64), bins - 1)
    all_tok = np.bincount(b, weights=lengths, minlength=bins)
    qa_tok = np.bincount(b, weights=lengths * is_qa, minlength=bins)
    share = np.divide(qa_tok, all_tok, out=np.zeros(bins), where=all_tok > 0)
    return {"bins": bins, "qa_token_share": [round(float(x), 4) for x in share],
            "sft_token_share": [round(float(1 - x), 4) if t > 0 else 0.0 for x, t in zip(share, all_tok)]}


def plot_curriculum(curr: dict, path: Path, title: str, overall_qa_share: float | None = None,
                    label: str = "pretrain-QA (*_qa)") -> None:
    """Stacked step plot of the pretraining (``label``: pretrain-QA and/or raw text) / SFT token shares per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = curr["bins"]
    edges = np.linspace(0, 100, bins + 1)
    x = np.repeat(edges, 2)[1:-1]  # a step per bin
    qa = np.repeat(np.array(curr["qa_token_share"], dtype=float) * 100, 2)
    sft = np.repeat(np.array(curr["sft_token_share"], dtype=float) * 100, 2)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    if len(qa):
        ax.stackplot(x, qa, sft, labels=[label, "SFT"], colors=["#4C72B0", "#DD8452"], alpha=0.85)
    if overall_qa_share is not None:
        ax.axhline(overall_qa_share * 100, color="black", lw=1, ls="--",
                   label=f"{label.split(' (')[0]} share overall ({overall_qa_share:.0%}): a uniform shuffle")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("training progress (% of tokens, in stored row order)")
    ax.set_ylabel("share of tokens (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
