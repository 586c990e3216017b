"""Resumable progress of an infer.py run and the submission it ends in.

- `<output>.partial.jsonl`: every finished batch of summaries (load_partial / append_partial), under a header
  fingerprint of the input, model and prompt settings, so a rerun of the same command resumes it;
- `<output>.candidates.jsonl`: with --num_samples, every finished record's greedy summary and samples (the same
  format); preference.py builds its pairs from it;
- the submission: the input list with `output` filled in, checked as the official scorer would check it;
- how each summary was generated (for --retry_empty / --regenerate_flagged) and the output guard's report.

infer.py is the only caller; nothing here loads a model.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from common import UserError, dump_submission_json, read_json, write_text_atomic
from score import guard_flags
from targets import flatten_structured, looks_structured


def partial_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".partial.jsonl")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def candidates_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".candidates.jsonl")


def load_partial(path: Path, fingerprint: dict) -> dict[str, dict]:
    """{id: row} from an earlier run for the same input and model (the last row of an id wins);
    a torn last line is ignored."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    made_for = (header.get("fingerprint") or {}).get("target_format", "prose")
    if made_for != fingerprint.get("target_format", "prose"):
        raise UserError(f"{path}: holds summaries of a --target_format {made_for} model, and this model was trained "
                        f"with --target_format {fingerprint.get('target_format', 'prose')}; delete it to start over")
    if header.get("fingerprint") != fingerprint:
        raise UserError(f"{path}: left by a run with a different input, model or prompt settings; delete it to start "
                        "over, or rerun that command")
    rows = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a batch cut off mid-write by a kill: it is generated again
        rows[row["id"]] = row
    return rows


def jsonl_text(rows: list[dict]) -> str:
    """One JSON line per row, Korean as it is."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def append_partial(path: Path, fingerprint: dict, rows: list[dict]) -> None:
    """Append finished rows in one write + fsync, so a kill loses at most the batch in flight."""
    text = jsonl_text(rows)
    if not path.is_file():
        text = jsonl_text([{"fingerprint": fingerprint}]) + text
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_candidates(path: Path, fingerprint: dict, rows: list[dict]) -> None:
    """The candidates file rewritten whole under the same header (each row with its `chosen` index)."""
    write_text_atomic(path, jsonl_text([{"fingerprint": fingerprint}, *rows]))


def as_prose(text: str, target_format: str) -> dict:
    """A partial-file row's text: a structured model's sections flattened to the one paragraph the submission,
    scoring, the guard and --select see; a text that did not parse is marked, for the guard to flag."""
    if target_format != "structured":
        return {"output": text}
    prose, well_formed = flatten_structured(text)
    return {"output": prose} if well_formed else {"output": prose, "malformed_structure": True}


def flatten_predictions(texts: list[str], where: str, console) -> list[str]:
    """Prediction files for --score / --select may hold a structured model's raw text: scored as prose."""
    structured = [looks_structured(text) for text in texts]
    if any(structured):
        console.print(f"[yellow]{where}: {sum(structured)} predictions hold ## headings or - bullets; "
                      "flattened to prose")
    return [flatten_structured(text)[0] if is_structured else text for text, is_structured in zip(texts, structured)]


def flag_malformed_structure(guard: dict, ids: list[str]) -> None:
    """Add the guard flag of a structured generation that did not parse (it was flattened all the same)."""
    for item_id in ids:
        guard["flags"][item_id].append("structure: not the trained sections (flattened)")
    guard["flagged"] = [i for i in guard["flags"] if guard["flags"][i]]


def build_submission(raw_records: list[dict], outputs: dict[str, str]) -> list[dict]:
    """The input list, same order and fields, with `output` filled in."""
    return [{**record, "output": outputs.get(record["id"], "")} for record in raw_records]


def check_submission(submission: list[dict], raw_records: list[dict], path: str | Path) -> None:
    """Refuse a submission the official scorer would reject: count, order, ids, fields, empty outputs."""
    if len(submission) != len(raw_records):
        raise UserError(f"{path}: submission has {len(submission)} records, input has {len(raw_records)}")
    for index, (sub, raw) in enumerate(zip(submission, raw_records)):
        if sub.get("id") != raw.get("id"):
            raise UserError(f"{path}: record {index}: id {sub.get('id')!r} differs from the input's {raw.get('id')!r}")
        if {k: v for k, v in sub.items() if k != "output"} != {k: v for k, v in raw.items() if k != "output"}:
            raise UserError(f"{path}: record {index} (id {sub['id']!r}): fields other than 'output' changed")
        if not isinstance(sub.get("output"), str) or not sub["output"].strip():
            raise UserError(f"{path}: record {index} (id {sub['id']!r}): field 'output' is empty")


def write_submission(raw_records: list[dict], outputs: dict[str, str], path: Path) -> list[dict]:
    """The input list with each record's `output` filled in, checked as the official scorer would, written
    atomically."""
    submission = build_submission(raw_records, outputs)
    check_submission(submission, raw_records, path)
    write_text_atomic(path, dump_submission_json(submission))
    return submission


def generation_settings(max_new_tokens: int, repetition_penalty: float) -> dict:
    """What a partial-file row records about how its summary was generated."""
    return {"max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty}


def generated_with(row: dict, generation: dict) -> bool:
    return all(row.get(key) == value for key, value in generation.items())


def describe_generation(generation: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in generation.items())


def next_repetition_penalty(used: float | None) -> float:
    """The penalty to try after `used` (None: an item of an existing --output, taken as generated without one)."""
    return round(max(used or 1.0, 1.0) + 0.1, 2)


def check_resume_settings(rows: dict[str, dict], generation: dict, todo: int, partial: Path) -> None:
    """A plain resume must not mix settings: the items still to generate get the finished items' settings."""
    others = {describe_generation({k: row[k] for k in generation}) for row in rows.values()
              if all(k in row for k in generation)}
    others.discard(describe_generation(generation))
    if todo and others:
        raise UserError(f"{partial}: the finished items were generated with {' / '.join(sorted(others))}; resume with "
                        "those settings, or delete it to start over (to change settings for some items only, finish "
                        "the run, then use --retry_empty or --regenerate_flagged)")


def empty_summaries_error(input_path: str, empty: list[str], rows: dict[str, dict], partial: Path) -> UserError:
    """The error for summaries that came out empty, with a retry that changes a setting the run did not use."""
    used = max((rows.get(i, {}).get("repetition_penalty", 1.0) for i in empty), default=1.0)
    return UserError(f"{input_path}: record id {empty[0]!r} (and {len(empty) - 1} more): the model generated an "
                     f"empty summary; the {len(rows) - len(empty)} other summaries are kept in {partial}; to "
                     "regenerate just these, rerun the same command with --retry_empty --repetition_penalty "
                     f"{next_repetition_penalty(used)}")


def rows_from_output(output: Path, raw_records: list[dict]) -> list[dict]:
    """The summaries of an earlier complete run's --output, as partial-file rows (how they were generated is
    unknown)."""
    previous = read_json(output)
    if not isinstance(previous, list):
        raise UserError(f"{output}: expected the JSON list of records an earlier run wrote")
    check_submission(previous, raw_records, output)
    return [{"id": record["id"], "output": record["output"]} for record in previous]


def regeneration_targets(records: list[dict], outputs: dict[str, str], band: tuple[int, int], retry_empty: bool,
                         regenerate_flagged: bool) -> list[dict]:
    """The records --retry_empty (empty summaries) and --regenerate_flagged (every guard flag) generate again."""
    return [r for r in records
            if (retry_empty and not outputs[r["id"]]) or (regenerate_flagged and guard_flags(outputs[r["id"]], band))]


def guard_summary(report: dict) -> dict:
    """What a scores or guard file records of the output guard besides its per-item flags."""
    return {key: report[key] for key in ("band_chars", "band_source", "flagged")}


def print_guard(report: dict, console, penalty: float, retry_command: str | None = None) -> None:
    """The guard's findings; `retry_command`, when given, is the full command that regenerates the flagged items."""
    flagged = report["flagged"]
    low, high = report["band_chars"]
    if not flagged:
        console.print(f"output guard: no summary outside {low}-{high} chars ({report['band_source']}) or looping")
        return
    console.print(f"[yellow]output guard: {len(flagged)} of {len(report['flags'])} summaries flagged "
                  f"(band {low}-{high} chars: {report['band_source']}; or looping):")
    for item_id in flagged[:5]:
        console.print(f"  {item_id}: {'; '.join(report['flags'][item_id])}", markup=False, highlight=False)
    if len(flagged) > 5:
        console.print(f"  ... and {len(flagged) - 5} more (all in the per-item report)")
    if retry_command:
        console.print(f"to regenerate just these (keeping the rest): {retry_command}", style="yellow", markup=False,
                      soft_wrap=True)
    else:
        console.print("[yellow]to regenerate just these (keeping the rest), rerun the same command with "
                      f"--regenerate_flagged --repetition_penalty {penalty}")
