"""What prep.py writes and shows: the rows of train.jsonl/dev.jsonl (Row), the stages each source's rows pass (counted
in stats.json and the printed table), length percentiles, the lengths histogram, and the all-or-nothing write of the
output folder.

Imports only dedup.py (the leak thresholds the stage help quotes), so prep.py builds on it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dedup import LEAK_MIN_SHARE, LEAK_MIN_STRETCH

STAGES = ("loaded", "sampled", "unusable", "leak", "duplicate", "too_long", "cut", "kept")
# With --pseudo_labels, their dev-reference check comes after the leak check (runs without them keep STAGES).
PSEUDO_LABEL_STAGES = (*STAGES[:4], "dev_reference", *STAGES[4:])
STAGE_HELP = {
    "loaded": "rows read",
    "sampled": "rows left after --limit",
    "unusable": "rows without a usable user/assistant exchange (empty text, roles out of order)",
    "leak": (f"rows holding {LEAK_MIN_SHARE:.0%}+ of a dev/test dialogue's text in stretches of {LEAK_MIN_STRETCH}+ "
             "characters in its order (any layout), removed; each listed under 'leaks'"),
    "dev_reference": ("pseudo-labels whose summary is a dev reference or nearly (3-gram Jaccard >= dedup_threshold), "
                      "removed; each listed under pseudo_labels.dev_references"),
    "duplicate": ("near-duplicates (MinHash LSH, 3-gram Jaccard >= dedup_threshold) of an earlier kept augmentation "
                  "row, removed"),
    "too_long": "rows over --max_seq_length, removed",
    "cut": "competition rows shortened by dropping middle utterances",
    "kept": "rows written",
}


@dataclass
class Row:
    """One training row in TRL's conversational prompt/completion form, plus where it came from."""

    id: str
    source: str
    prompt: list[dict]
    completion: list[dict]
    tokens: int = 0

    def to_json(self) -> str:
        row = {"id": self.id, "source": self.source, "prompt": self.prompt, "completion": self.completion}
        return json.dumps(row, ensure_ascii=False)


def dialogue_kinds(ids: list[str], files: dict[str, list[tuple[str, dict]]]) -> dict[str, int]:
    """How many of `ids` are ids of each file's (source, record) pairs (the first file that has it), and of none."""
    known = {kind: {record["id"] for _, record in pairs} for kind, pairs in files.items()}
    kinds = dict.fromkeys([*files, "other"], 0)
    for record_id in ids:
        kinds[next((kind for kind, found in known.items() if record_id in found), "other")] += 1
    return kinds


def length_percentiles(train_rows: list[Row], dev_rows: list[Row]) -> dict[str, dict[str, int]]:
    return {
        "train_tokens": percentiles([r.tokens for r in train_rows]),
        "dev_tokens": percentiles([r.tokens for r in dev_rows]),
        "prompt_chars": percentiles([sum(len(m["content"]) for m in r.prompt) for r in train_rows]),
        "summary_chars": percentiles([len(r.completion[0]["content"]) for r in train_rows]),
    }


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    data = np.asarray(values)
    return {f"p{q}": int(np.percentile(data, q, method="lower")) for q in (50, 90, 99)} | {"max": int(data.max())}


def plot_lengths(path: Path, groups: dict[str, list[Row]]) -> None:
    """Histogram of prompt and summary lengths (characters), competition vs augmentation rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, part in zip(axes, ("prompt", "completion")):
        lengths = {label: [sum(len(m["content"]) for m in getattr(row, part)) for row in rows]
                   for label, rows in groups.items()}
        every = [n for values in lengths.values() for n in values] or [0]
        edges = np.histogram_bin_edges(every, bins=40)  # shared by both groups: their bars compare
        for label, values in lengths.items():
            if values:
                ax.hist(values, bins=edges, alpha=0.6, label=f"{label} ({len(values)})")
        ax.set_title("prompt" if part == "prompt" else "summary / answer")
        ax.set_xlabel("characters")
        ax.set_ylabel("rows")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_outputs(out: Path, files: dict[str, Any]) -> None:
    """Write every file into a temp dir next to `out`, then move them in: no half-written output."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for name, content in files.items():
            if callable(content):
                content(staging / name)
            else:
                (staging / name).write_text(content, encoding="utf-8")
        for name in files:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def rich_table(title: str, header: list[str], rows: list[list[str]]) -> Any:
    """A titled table: the first column names the row, the others hold right-aligned figures."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column(header[0])
    for name in header[1:]:
        table.add_column(name, justify="right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def summary_tables(counts: dict[str, dict[str, int]], stages: tuple[str, ...],
                   lengths: dict[str, dict[str, int]]) -> list:
    """The tables prep.py ends with: rows per source and stage, and the length percentiles of the train rows."""
    keys = ["p50", "p90", "p99", "max"]
    return [rich_table("rows per source and stage", ["stage", *counts],
                       [[stage, *(str(source[stage]) for source in counts.values())] for stage in stages]),
            rich_table("lengths (train rows)", ["measure", *keys],
                       [[name, *(str(values[k]) for k in keys)] for name, values in lengths.items() if values])]
