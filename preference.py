"""Preference data for DPO / KTO from a trained model's own summaries, scored against the references.

    python infer.py --model outputs/run1/final --input data/일상대화요약_train.json --num_samples 8 \\
        --preference_out data/prepared/preference.jsonl

infer.py generates each record's candidates (the greedy summary and --num_samples samples, kept in
`<output>.candidates.jsonl`, so a rerun samples nothing again) and then calls write_preference_data: every
candidate is scored against its record's reference with the competition metrics (--preference_metric; the
metrics' models run once over all candidates of all records), and per record the best candidate (or the
reference itself, --chosen reference) and the worst make a DPO pair, kept when their scores differ by at least
--min_margin. One JSON line per pair, as PREF_FORMAT / docs/infer.md "Preference data for DPO/KTO" describe: the prompt
is prep.build_messages' for the record, the same as the SFT rows'; train.py --stage kto reads each pair as a
desirable and an undesirable row.
"""
from __future__ import annotations

import collections
import statistics
from pathlib import Path

from common import UserError, write_text_atomic
from generate import trained_base_model, trained_prompt_settings
from prep import build_messages
from progress import candidates_path, jsonl_text, partial_path
from score import KNOWN_METRICS, Scorer, score_with
from targets import clean_record

CHOSEN = ("best", "reference")  # --chosen: the best-scoring candidate, or the record's reference summary


def candidates_base_model(model_name: str, run_config: dict) -> str:
    """The SFT run's base model; a merged folder or Hub id without a run_config is its own base."""
    if run_config.get("base_model") or (Path(model_name) / "adapter_config.json").is_file():
        return trained_base_model(Path(model_name), run_config)
    return model_name


def pair_prompt(record: dict, settings: dict) -> list[dict]:
    """The record's prompt messages exactly as prep.py renders an SFT row's (and infer.py prompts the model)."""
    record = clean_record(record)[0] if settings["clean_inputs"] else record
    return build_messages(record, settings["system_prompt"], settings["target_format"])


def score_candidates(candidates: list[list[str]], references: list[str], scorers: dict[str, Scorer],
                     skipped: dict[str, str]) -> tuple[list[list[float]], list[str], dict[str, str]]:
    """(per record, each candidate's score: the mean of the metrics computed; those metrics, in leaderboard order;
    {metric: why it was not computed}).

    Every (candidate, reference) pair of every record goes through the metrics in one call each, so the learned
    metrics' models run once over everything; a text sampled twice for a record is scored once."""
    pairs = list(dict.fromkeys((text, ref) for texts, ref in zip(candidates, references) for text in texts))
    result = score_with(scorers, skipped, [str(k) for k in range(len(pairs))], [text for text, _ in pairs],
                        [ref for _, ref in pairs])
    computed = [name for name in KNOWN_METRICS if name in result["computed"]]
    if not computed:
        raise UserError(f"--preference_metric: none could be computed ({'; '.join(result['skipped'].values())})")
    value = {pair: sum(item[name] for name in computed) / len(computed) for pair, item in zip(pairs, result["items"])}
    scores = [[value[(text, ref)] for text in texts] for texts, ref in zip(candidates, references)]
    return scores, computed, result["skipped"]


def best_and_worst(scores: list[float]) -> tuple[int, int]:
    """(index of the highest score, index of the lowest): a tie for best goes to the earliest candidate (the greedy
    summary comes first), a tie for worst to the latest, so that two candidates of equal score are still a pair."""
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(reversed(range(len(scores))), key=scores.__getitem__)
    return best, worst


def build_pair(record: dict, texts: list[str], scores: list[float], *, chosen: str, reference_score: float | None,
               metric: list[str], base_model: str, settings: dict) -> dict:
    """One preference row (PREF_FORMAT): chosen = the best candidate or, with chosen="reference", the record's
    reference (scored against itself, so its score is on the same scale); rejected = the worst candidate."""
    best, worst = best_and_worst(scores)
    if chosen == "reference":
        chosen_text, chosen_score = record["output"], reference_score
    else:
        chosen_text, chosen_score = texts[best], scores[best]
    return {"id": record["id"], "prompt": pair_prompt(record, settings),
            "chosen": [{"role": "assistant", "content": chosen_text}],
            "rejected": [{"role": "assistant", "content": texts[worst]}],
            "chosen_score": chosen_score, "rejected_score": scores[worst], "margin": chosen_score - scores[worst],
            "metric": "+".join(metric), "base_model": base_model, "prompt_settings": settings}


def skip_reason(row: dict, min_margin: float) -> str | None:
    """Why a pair teaches nothing, or None to keep it: the same text on both sides, no score difference, or less
    difference than --min_margin."""
    if row["chosen"][0]["content"] == row["rejected"][0]["content"]:
        return "chosen and rejected are the same text"
    if row["margin"] <= 0:
        return "the rejected candidate scores as high as the chosen one"
    if row["margin"] < min_margin:
        return f"margin below --min_margin {min_margin}"
    return None


def margin_stats(margins: list[float]) -> dict[str, float]:
    return {"min": min(margins), "median": statistics.median(margins), "max": max(margins)} if margins else {}


def check_preference_settings(cfg, training_run: bool) -> None:
    """The settings-only refusals (infer.py's check_settings calls this before anything is loaded)."""
    if cfg.min_margin < 0:
        raise UserError(f"--min_margin {cfg.min_margin}: must be 0 or more (the least score difference between "
                        "chosen and rejected)")
    if not cfg.preference_out:
        return
    if cfg.score or cfg.select:
        raise UserError("--preference_out: pairs are made from generated candidates; leave out --score / --select")
    if training_run:
        raise UserError(f"--preference_out: --model {cfg.model} is a training run; give the one model whose "
                        f"summaries make the pairs (e.g. {Path(cfg.model) / 'final'})")
    if cfg.num_samples < 1:
        raise UserError("--preference_out needs --num_samples N (N >= 1): each record's pair is drawn from its "
                        "greedy summary and N samples")


def check_preference_paths(cfg, output: Path, kind: str, target_format: str) -> None:
    """Refusals that need the input read and the model's run_config: checked before any generation."""
    if not cfg.preference_out:
        return
    if kind != "references":
        raise UserError(f"{cfg.input}: --preference_out scores the candidates against the references: every record "
                        "needs its 'output' (use the train or dev file)")
    if target_format == "structured":
        raise UserError("--preference_out: this model was trained with --target_format structured, and its candidates "
                        "are kept flattened to prose; pairs of prose would pull it away from its sections")
    path = Path(cfg.preference_out)
    if path.is_dir():
        raise UserError(f"--preference_out {path} is a folder: give a file name")
    taken = {"the input file": Path(cfg.input), "--output": output, "the candidates file": candidates_path(output),
             "the partial file": partial_path(output)}
    for name, other in taken.items():
        if path.resolve() == other.resolve():
            raise UserError(f"--preference_out {path} is {name}: choose another name")


def print_preference_stats(cfg, rows: list[dict], reasons: dict[str, str | None], kept: list[dict], console) -> None:
    """Pairs kept, the margins' spread, and the records skipped, grouped by why."""
    stats = margin_stats([row["margin"] for row in kept])
    chosen = "the reference" if cfg.chosen == "reference" else "the best candidate"
    console.print(f"pairs kept: {len(kept)} of {len(rows)} records (chosen: {chosen}; rejected: the worst candidate; "
                  f"--min_margin {cfg.min_margin})")
    if stats:
        console.print("margins: " + ", ".join(f"{key} {value:.4f}" for key, value in stats.items()))
    why = collections.Counter(reason for reason in reasons.values() if reason)
    for reason, count in why.items():
        first = next(record_id for record_id, found in reasons.items() if found == reason)
        console.print(f"[yellow]skipped {count} records: {reason} (first id {first!r})", highlight=False)


def write_preference_data(cfg, records: list[dict], candidates: dict[str, list[str]], scorers: dict[str, Scorer],
                          skipped: dict[str, str], model_name: str, run_config: dict, console) -> None:
    """Score every record's candidates (and, with --chosen reference, the reference) against the reference, build
    one pair per record, keep those skip_reason lets through, write them to --preference_out and print the counts."""
    settings, base_model = trained_prompt_settings(run_config), candidates_base_model(model_name, run_config)
    texts = [candidates[record["id"]] for record in records]
    references = [record["output"] for record in records]
    with_reference = cfg.chosen == "reference"
    to_score = [[*row, ref] if with_reference else row for row, ref in zip(texts, references)]
    console.rule(f"preference pairs: scoring {sum(map(len, to_score))} texts of {len(records)} records "
                 "against their references")
    scores, metric, not_computed = score_candidates(to_score, references, scorers, skipped)
    if not_computed:
        console.print(f"preference scores: the mean of {', '.join(metric)} only, as each row's \"metric\" "
                      f"records; not computed: {'; '.join(f'{k}: {v}' for k, v in not_computed.items())}",
                      markup=False, style="yellow", highlight=False, soft_wrap=True)
    rows = [build_pair(record, row, row_scores[:len(row)], chosen=cfg.chosen, metric=metric, base_model=base_model,
                       reference_score=row_scores[-1] if with_reference else None, settings=settings)
            for record, row, row_scores in zip(records, texts, scores)]
    reasons = {row["id"]: skip_reason(row, cfg.min_margin) for row in rows}
    kept = [row for row in rows if reasons[row["id"]] is None]
    print_preference_stats(cfg, rows, reasons, kept, console)
    if not kept:
        raise UserError(f"{cfg.input}: no preference pair kept of {len(rows)} records (reasons above); lower "
                        "--min_margin, or sample more (--num_samples) or more diversely (--temperature)")
    write_text_atomic(cfg.preference_out, jsonl_text(kept))
    console.print(f"{len(kept)} preference pairs -> {cfg.preference_out}")
