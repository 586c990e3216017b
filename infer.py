"""Generate summaries for a competition file (a submission), and score them when references exist.

Terminal:
    python infer.py --input data/일상대화요약_test.json                 # newest outputs/*/final -> submission.json
    python infer.py --input data/일상대화요약_dev.json --output dev_pred.json   # dev has outputs: scored too
    python infer.py --model outputs/run1/final --input data/일상대화요약_test.json --batch_size 16
    python infer.py --score dev_pred.json --ref data/일상대화요약_dev.json    # score a file, no model loaded
    python infer.py --select a.json b.json c.json --output best.json      # per record, the consensus output
    python infer.py --input data/일상대화요약_test.json --num_samples 8      # greedy + 8 samples, consensus kept
    python infer.py --model outputs/run1 --input data/일상대화요약_dev.json   # every checkpoint of a run, scored: a table
    python infer.py --input data/일상대화요약_test.json --retry_empty         # redo only the summaries that came out empty
    python infer.py --input data/일상대화요약_test.json --regenerate_flagged  # redo only what the output guard flagged
    python infer.py --model outputs/run1/final --input data/일상대화요약_train.json --num_samples 8 \
        --preference_out data/prepared/preference.jsonl                    # DPO/KTO pairs: best vs worst candidate

Colab:
    !python infer.py --input data/일상대화요약_test.json --output submission.json

An interrupted run keeps every finished batch in `<output>.partial.jsonl` (and, with --num_samples, every
finished record's candidates in `<output>.candidates.jsonl`); the same command resumes.
The prompt comes from prep.py (`build_messages`), the same function training used, so the two cannot drift.

vLLM instead of Unsloth's generate() (from the vLLM venv, see README):
    .venv-vllm/bin/python infer.py --engine vllm --input data/일상대화요약_test.json

Model loading and the two engines live in generate.py; the metrics in score.py; the partial and candidates
files and the submission's checks in progress.py; the preference pairs (--preference_out) in preference.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (UserError, check_environment, checkpoint_dirs, filter_known_noise, is_complete_checkpoint,
                    parse_settings, read_json, read_trainer_state, run_cli, shell_command, write_text_atomic)
from prep import load_competition_file, validate_competition_data
from generate import (EngineSettings, Sampling, chat_prompt, check_engine_settings, default_load_in_4bit,
                      free_accelerator_memory, open_engine, read_run_config, resolve_model, run_config_source,
                      shorten_to_fit, trained_prompt_settings)
from score import (BERTSCORE_LAYERS, BERTSCORE_MODEL, BLEURT_MODEL, KNOWN_METRICS, MetricModels, guard_report,
                   length_band, load_scorers, pair_by_id, print_scores, read_candidate_files, score_predictions,
                   score_with, select_candidates, write_scores)
from preference import CHOSEN, check_preference_paths, check_preference_settings, write_preference_data
from progress import (append_partial, as_prose, candidates_path, check_resume_settings, describe_generation,
                      empty_summaries_error, file_sha256, flag_malformed_structure, flatten_predictions,
                      generated_with, generation_settings, guard_summary, load_partial, next_repetition_penalty,
                      partial_path, print_guard, regeneration_targets, rows_from_output, write_candidates,
                      write_submission)
from targets import clean_record


@dataclass
class InferSettings(EngineSettings):
    input: str = field(default="data/일상대화요약_test.json", metadata={"help": (
        "competition JSON to summarize (test, dev or train)")})
    model: str | None = field(default=None, metadata={"help": (
        "trained final/ or checkpoint-N/ folder, train.py merge output, merged model folder or Hub id; a train.py "
        "output_dir scores every checkpoint on --input (dev) and prints a table; default: newest outputs/*/final")})
    output: str | None = field(default=None, metadata={"help": (
        "file to write (never the input file); default: submission.json for a full run over a test file (no "
        "outputs), else <input name>[_limit<N>]_pred.json")})
    batch_size: int = field(default=8, metadata={"help": (
        "unsloth engine: most prompts per generate() call (--max_batch_tokens also limits it)")})
    max_new_tokens: int = field(default=1024, metadata={"help": "generation budget per summary"})
    repetition_penalty: float | None = field(default=None, metadata={"help": (
        "1.0 = off; ~1.1 curbs repetition loops; default 1.0, and with --retry_empty / --regenerate_flagged 0.1 "
        "above what those items were generated with")})
    limit: int | None = field(default=None, metadata={"help": (
        "only the first N records (smoke test, not a submission): written to <input name>_limit<N>_pred.json "
        "unless --output")})
    overwrite: bool = field(default=False, metadata={"help": (
        "let a --limit run replace an existing --output file (without it, a run that is not a full submission "
        "never replaces a file)")})
    retry_empty: bool = field(default=False, metadata={"help": (
        "regenerate only the items whose summary came out empty, with this command's generation settings; every "
        "other item is kept")})
    regenerate_flagged: bool = field(default=False, metadata={"help": (
        "regenerate only the items the output guard flags (outside the length band, looping or empty), with a "
        "repetition penalty; every other item is kept")})
    max_seq_length: int | None = field(default=None, metadata={"help": (
        "prompt + summary token limit; default: the training run's, else 8192")})
    load_in_4bit: bool | None = field(default=None, metadata={"help": (
        "load the base model in 4 bit; default: as run_config.json says, else off for a folder of full weights "
        "(merged), else on")})
    eval: bool | None = field(default=None, metadata={"help": (
        "score against the input's outputs; default: on when every output is non-empty")})
    score: str | None = field(default=None, metadata={"help": (
        "score this existing prediction file against --ref (no model is loaded)")})
    ref: str | None = field(default=None, metadata={"help": (
        "reference file for --score (and for --select: score each file and the selection)")})
    metrics: list[str] = field(default_factory=lambda: ["rouge1", "bertscore", "bleurt"], metadata={"help": (
        "metrics to compute; bertscore/bleurt are skipped with the reason when their model cannot be loaded")})
    bertscore_model: str = field(default=BERTSCORE_MODEL, metadata={"help": (
        "BERTScore model, Hub id or local folder (the official scorer's)")})
    bertscore_layers: int = field(default=BERTSCORE_LAYERS, metadata={"help": (
        "BERTScore uses this layer's embeddings (the official scorer: 9)")})
    bleurt_model: str = field(default=BLEURT_MODEL, metadata={"help": (
        "BLEURT-20 in the bleurt-pytorch port's format (config.json, spm.model, weights), Hub id or local folder")})
    select: list[str] | None = field(default=None, metadata={"help": (
        "prediction files of one input: per record keep the output that agrees most with the others' (minimum "
        "Bayes risk) and write it to --output; ties go to the earlier file; no generation model is loaded")})
    select_metric: list[str] = field(default_factory=lambda: ["rouge1", "bertscore"], metadata={"help": (
        "agreement measure for --select / --num_samples: the mean of these metrics (bertscore when its model "
        "loads)")})
    num_samples: int = field(default=0, metadata={"help": (
        "also sample N summaries per record and keep, among them and the greedy one, the one that agrees most with "
        "the others (0 = greedy only)")})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature for --num_samples"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling for --num_samples"})
    seed: int = field(default=42, metadata={"help": (
        "random seed for --num_samples (a resumed run samples the rest afresh)")})
    scores_file: str | None = field(default=None, metadata={"help": (
        "per-item scores and output-guard flags; default: scores.json next to the output (or the --score file); a "
        "run that is not scored writes <output name>.guard.json")})
    preference_out: str | None = field(default=None, metadata={"help": (
        "also write DPO/KTO preference pairs here (JSONL; needs --num_samples and an input with references): every "
        "candidate scored against its reference; per record the best (see --chosen) and the worst")})
    preference_metric: list[str] = field(default_factory=lambda: ["rouge1", "bertscore", "bleurt"], metadata={"help": (
        "--preference_out scores each candidate by the mean of these (the leaderboard's); one whose model cannot be "
        "loaded is left out, and each row's 'metric' names those used")})
    # 0: the best and worst of N samples make a pair whenever their scores differ, as in MBR-ranked DPO (Yang et al.,
    # NAACL 2024); the margins printed at the end show where a threshold would cut.
    min_margin: float = field(default=0.0, metadata={"help": (
        "--preference_out keeps a pair only when the chosen and rejected scores differ by at least this (and by more "
        "than 0)")})
    chosen: str = field(default="best", metadata={"help": (
        "--preference_out: the chosen side is the best-scoring candidate (best), or the record's reference summary "
        "(reference)"), "choices": CHOSEN})


# What a checkpoint's predictions file depends on: a rerun with the same values keeps the file. The metrics'
# models only change how it is scored, so a change there rescores the files and generates nothing.
GENERATION_SETTINGS = ("limit", "max_new_tokens", "repetition_penalty", "max_seq_length", "load_in_4bit",
                       "num_samples", "temperature", "top_p", "seed")
SAMPLING_SETTINGS = ("temperature", "top_p", "seed")  # matter only with --num_samples
METRIC_COLUMNS = {"rouge1": "R1", "bertscore": "BERTScore", "bleurt": "BLEURT"}
LOADED_SCORERS: dict[tuple, tuple[dict, dict]] = {}  # a checkpoint table loads the metrics' models once, for all


# ---- Small pure functions: the input and output, settings and next commands, the checkpoint table's rows ---------

def input_kind(records: list[dict]) -> str:
    """"references" when every record has an `output` (dev: scored), "test" when none has, else "mixed"."""
    filled = sum(bool(r["output"].strip()) for r in records)
    return "references" if filled == len(records) else "test" if filled == 0 else "mixed"


def mode_line(kind: str, evaluate: bool, records: list[dict]) -> str:
    """Which mode this run is in and why, so a dev-like file with a few blank outputs is never silently taken for
    test."""
    if kind == "references":
        return ("mode: generate and score: every record has an 'output' (a reference file such as dev)" if evaluate
                else "mode: generate only, no scoring: scoring turned off with --no-eval")
    if kind == "test":
        return "mode: generate only, no scoring: no record has an 'output' (a test file)"
    empty = [r["id"] for r in records if not r["output"].strip()]
    return (f"mode: generate only, no scoring: {len(records) - len(empty)} of {len(records)} records have an "
            f"'output' but {len(empty)} are empty (first {empty[0]!r}), and scoring needs every reference")


def default_output(input_path: str | Path, kind: str, limit: int | None) -> Path:
    """submission.json only for a full run over a test file; `<input>[_limit<N>]_pred.json` otherwise, so scoring
    dev or a --limit smoke test never replaces the test submission."""
    if kind == "test" and limit is None:
        return Path("submission.json")
    return Path(f"{Path(input_path).stem}{f'_limit{limit}' if limit else ''}_pred.json")


def ids_and_texts(submission: list[dict]) -> tuple[list[str], list[str]]:
    return [r["id"] for r in submission], [r["output"] for r in submission]


def metric_models(cfg: InferSettings) -> MetricModels:
    return MetricModels(cfg.bertscore_model, cfg.bertscore_layers, cfg.bleurt_model)


def metric_settings(cfg: InferSettings) -> dict[str, dict]:
    """Per metric, what its value depends on besides the predictions and references."""
    return {"rouge1": {}, "bertscore": {"model": cfg.bertscore_model, "layers": cfg.bertscore_layers},
            "bleurt": {"model": cfg.bleurt_model}}


def table_generation(cfg: InferSettings) -> dict:
    """The generation settings of this command, as a checkpoint's row records them."""
    return {key: getattr(cfg, key) for key in GENERATION_SETTINGS if cfg.num_samples or key not in SAMPLING_SETTINGS}


def settings_flags(values: dict, defaults: dict) -> list[str]:
    """The command-line flags that set `values` where they differ from `defaults` (None: left to the default)."""
    flags: list[str] = []
    for key, value in values.items():
        if value is None or value == defaults.get(key):
            continue
        if isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no-{key}")
        else:
            flags += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return flags


def infer_command(cfg: InferSettings, **changes) -> str:
    """This run's command line (every flag it set), with `changes`: a next step to paste as it is."""
    flags = settings_flags(asdict(dataclasses.replace(cfg, **changes)), asdict(InferSettings()))
    return shell_command("python", "infer.py", *flags)


def table_next_command(best: dict, generation: dict) -> str:
    """The test-file command for the best checkpoint, with the generation flags the table was scored with."""
    flags = settings_flags({k: v for k, v in generation.items() if k != "limit"}, asdict(InferSettings()))
    return shell_command("python", "infer.py", "--model", best["path"], "--input", "data/일상대화요약_test.json", *flags)


def is_training_run(path: Path) -> bool:
    """A train.py output_dir (checkpoint-N/ and final/ inside), as opposed to a model folder."""
    return (path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()
            and (bool(checkpoint_dirs(path)) or (path / "final" / "adapter_config.json").is_file()))


def run_models(run_dir: Path) -> list[Path]:
    """Complete checkpoints by step, then final/; a checkpoint cut short by a kill is left out."""
    models = [path for path in reversed(checkpoint_dirs(run_dir)) if is_complete_checkpoint(path)]
    if (run_dir / "final" / "adapter_config.json").is_file():
        models.append(run_dir / "final")
    return models


def training_facts(model_dir: Path) -> dict:
    """Step, epoch and the last logged train / eval loss: from trainer_state.json, or final/'s run_config.json."""
    state = read_trainer_state(model_dir)
    if state is None:
        config = read_run_config(model_dir)
        return {"step": config.get("global_step"), "epoch": config.get("epoch"),
                "train_loss": config.get("train_loss"), "eval_loss": config.get("eval_loss")}
    history = state.get("log_history", [])
    train = [entry["loss"] for entry in history if "loss" in entry]
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    return {"step": state["global_step"], "epoch": state.get("epoch"),
            "train_loss": train[-1] if train else None, "eval_loss": evals[-1] if evals else None}


def weights_sha256(model_dir: Path) -> str | None:
    """Identifies the adapter: final/ often holds the last checkpoint's very weights, and a retrain replaces
    checkpoints."""
    path = model_dir / "adapter_model.safetensors"
    return file_sha256(path) if path.is_file() else None


def scores_row(result: dict) -> dict:
    """The table's score columns from a scores.json: each metric's mean and the competition score (their mean)."""
    return {**{name: result["means"].get(name) for name in METRIC_COLUMNS},
            "score": result.get("mean_of_computed"), "score_of": result.get("computed", []),
            "metric_settings": result.get("metric_settings", {})}


def best_row(rows: list[dict]) -> dict | None:
    """Highest competition score; on a tie the earlier (fewer steps) wins."""
    scored = [row for row in rows if row.get("score") is not None]
    return max(scored, key=lambda row: row["score"]) if scored else None


def score_label(rows: list[dict]) -> str:
    computed = {name for row in rows if row.get("score") is not None for name in row["score_of"]}
    return "final" if computed == set(METRIC_COLUMNS) else "mean of " + ", ".join(sorted(computed) or ["nothing"])


def upgrade_table(table: dict) -> dict:
    """A table an older infer.py wrote (one "settings" for every row): each row gets the settings it was made with,
    so that its predictions are kept too."""
    settings = table["settings"]
    generation = table_generation(InferSettings(**{key: settings[key] for key in GENERATION_SETTINGS}))
    models = metric_settings(InferSettings(**{key: settings[key] for key in ("bertscore_model", "bertscore_layers",
                                                                              "bleurt_model")}))
    rows = [{**row, "generation": generation, "metric_settings": {m: models[m] for m in row.get("score_of", [])}}
            for row in table.get("rows", [])]
    return {"input_sha256": settings.get("input_sha256"), "generation": generation, "rows": rows}


def read_table(path: Path, input_sha256: str) -> dict:
    """An earlier run of the same table on the same input: {"generation", "rows" by checkpoint name}."""
    table = read_json(path) if path.is_file() else None
    if isinstance(table, dict) and "settings" in table and "generation" not in table:
        table = upgrade_table(table)
    if not isinstance(table, dict) or table.get("input_sha256") != input_sha256:
        return {"generation": None, "rows": {}}
    return {"generation": table.get("generation"), "rows": {row["checkpoint"]: row for row in table.get("rows", [])}}


def reusable_predictions(previous: dict, row: dict, generation: dict | None) -> bool:
    """An earlier row whose predictions file this command would generate again, byte for byte."""
    return (previous.get("weights_sha256") == row["weights_sha256"] and previous.get("generation") == generation
            and previous.get("predictions") == row["predictions"] and Path(row["predictions"]).is_file()
            and not previous.get("error"))


def metrics_to_rescore(previous: dict, wanted: dict[str, dict], loaded: set[str]) -> tuple[set[str], set[str]]:
    """(metrics whose earlier values still hold, metrics to compute now): a value holds when it was computed with
    this command's metric settings; a wanted metric without one is computed when its model loads now."""
    valid = {name for name, settings in previous.get("metric_settings", {}).items() if wanted.get(name) == settings}
    return valid, {name for name in wanted if name in loaded and name not in valid}


# ---- Checks, and the metrics' models (each loaded once) ----------------------------------------------------------

def check_settings(cfg: InferSettings) -> None:
    """Refuse a setting that cannot work, before any file is read or model loaded."""
    check_engine_settings(cfg)
    for name in ("metrics", "select_metric", "preference_metric"):
        unknown = [m for m in getattr(cfg, name) if m not in KNOWN_METRICS]
        if unknown:
            raise UserError(f"--{name}: unknown {unknown}; choose from {list(KNOWN_METRICS)}")
    if cfg.num_samples < 0:
        raise UserError("--num_samples must be 0 (greedy only) or more")
    if cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        raise UserError("--temperature must be positive and --top_p in (0, 1]")
    for name in ("batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError("--limit must be at least 1")
    if cfg.repetition_penalty is not None and cfg.repetition_penalty <= 0:
        raise UserError("--repetition_penalty must be positive (1.0 = off)")
    if cfg.num_samples and (cfg.retry_empty or cfg.regenerate_flagged):
        raise UserError("--retry_empty / --regenerate_flagged regenerate greedy summaries; leave out --num_samples")
    check_preference_settings(cfg, bool(cfg.model) and is_training_run(Path(cfg.model)))


def metric_scorers(cfg: InferSettings, console) -> tuple[dict, dict]:
    """(scorers of --metrics, {metric: why it was skipped}), loaded on first use; a setting no model can take
    (--bertscore_layers beyond the model's) ends the run here."""
    key = (tuple(name for name in KNOWN_METRICS if name in cfg.metrics), metric_models(cfg))
    if key not in LOADED_SCORERS:
        LOADED_SCORERS[key] = load_scorers(list(key[0]), key[1], console)
    return LOADED_SCORERS[key]


def preference_scorers(cfg: InferSettings, console) -> tuple[dict, dict]:
    """metric_scorers for --preference_metric: the same models as scoring's when the metrics are the same."""
    return metric_scorers(dataclasses.replace(cfg, metrics=cfg.preference_metric), console)


def selection_scorers(cfg: InferSettings, console, with_references: bool) -> tuple[dict, dict, dict]:
    """(scorers for reporting, what was skipped, the agreement scorers among them): every model loads once."""
    wanted = {*cfg.select_metric, *(cfg.metrics if with_references else [])}
    scorers, skipped = load_scorers([m for m in KNOWN_METRICS if m in wanted], metric_models(cfg), console)
    agreement = {name: scorers[name] for name in cfg.select_metric if name in scorers}
    if not agreement:
        raise UserError(f"--select_metric {' '.join(cfg.select_metric)}: none of them could be loaded")
    return scorers, skipped, agreement


# ---- The modes that take files already written: --score, --select ------------------------------------------------

def score_only(cfg: InferSettings, console) -> None:
    """`--score PRED --ref REF`: no model, no torch."""
    if not cfg.ref:
        raise UserError("--score needs --ref REF.json (the file with the reference summaries)")
    predictions, _ = load_competition_file(cfg.score)
    references, _ = load_competition_file(cfg.ref)
    ids, preds, refs = pair_by_id(predictions, references, cfg.score, cfg.ref)
    preds = flatten_predictions(preds, cfg.score, console)
    console.rule(f"scoring {cfg.score} against {cfg.ref} ({len(ids)} items)")
    result = score_predictions(ids, preds, refs, cfg.metrics, console, metric_models(cfg))
    print_scores(result, console)
    write_scores(result, Path(cfg.scores_file or Path(cfg.score).with_name("scores.json")), console)


def print_selection(sources: list[str], chosen: list[int], results: list[dict] | None, agreement: list[str],
                    console) -> None:
    """How often each source won and, with references, each source's scores next to the selection's."""
    from rich.table import Table

    table = Table(title=f"minimum Bayes risk selection (agreement: mean of {', '.join(agreement)})")
    score_columns = [*results[0]["means"], results[0]["label"]] if results else []
    for column in ("candidates", "chosen", *score_columns):
        table.add_column(column, justify="left" if column == "candidates" else "right")
    for index, source in enumerate([*sources, "selection"]):
        wins = chosen.count(index) if index < len(sources) else len(chosen)
        row = [source, f"{wins} ({100 * wins / len(chosen):.0f}%)"]
        if results:
            row += [f"{100 * value:.2f}" for value in results[index]["means"].values()]
            row += [f"{100 * results[index]['mean_of_computed']:.2f}"]
        table.add_row(*row, style="bold" if index == len(sources) else None)
    console.print(table)


def check_empty_candidates(paths: list[str], ids: list[str], candidates: list[list[str]], console) -> None:
    """Refuse a record whose every candidate is empty, naming a file that holds one; name the files whose empty
    outputs will never be chosen (a non-empty candidate always wins over an empty one)."""
    for record_id, texts in zip(ids, candidates):
        if not any(text.strip() for text in texts):
            raise UserError(f"{paths[0]}: record id {record_id!r}: field 'output' is empty, as in every --select "
                            "file; regenerate it (python infer.py --retry_empty) before selecting")
    for index, path in enumerate(paths):
        empty = [record_id for record_id, texts in zip(ids, candidates) if not texts[index].strip()]
        if empty:
            console.print(f"[yellow]{path}: {len(empty)} empty outputs (first id {empty[0]!r}): another file's summary "
                          "is chosen for them")


def select_only(cfg: InferSettings, console) -> None:
    """`--select A B ... --output OUT [--ref REF]`: per record the candidate that agrees most with the others."""
    if len(cfg.select) < 2:
        raise UserError("--select needs two or more prediction files")
    if not cfg.output:
        raise UserError("--select needs --output FILE for the selected predictions")
    output = Path(cfg.output)
    if any(output.resolve() == Path(path).resolve() for path in [*cfg.select, *([cfg.ref] if cfg.ref else [])]):
        raise UserError(f"--output {output} is one of the input files: choose another name (inputs are never "
                        "overwritten)")
    ref_records = load_competition_file(cfg.ref)[0] if cfg.ref else None
    records, candidates = read_candidate_files(cfg.select, [r["id"] for r in ref_records] if ref_records else None)
    width = len(cfg.select)
    flat = flatten_predictions([text for row in candidates for text in row], "--select", console)
    candidates = [flat[k * width:(k + 1) * width] for k in range(len(candidates))]
    ids = [record["id"] for record in records]
    check_empty_candidates(cfg.select, ids, candidates, console)
    references = pair_by_id(records, ref_records, cfg.select[0], cfg.ref)[2] if cfg.ref else None
    in_order = f", in {cfg.ref}'s order" if cfg.ref else ""
    console.rule(f"selecting among {len(cfg.select)} files ({len(ids)} records){in_order}")
    scorers, skipped, agreement = selection_scorers(cfg, console, with_references=references is not None)
    chosen, _ = select_candidates(candidates, agreement)
    raw_by_id = {record["id"]: record for record in read_json(cfg.select[0])}
    submission = write_submission([raw_by_id[record_id] for record_id in ids],
                                  {i: candidates[k][chosen[k]] for k, i in enumerate(ids)}, output)
    results = None
    if references is not None:
        reporting = {name: scorer for name, scorer in scorers.items() if name in cfg.metrics}
        columns = [[row[f] for row in candidates] for f in range(width)] + [[r["output"] for r in submission]]
        results = [score_with(reporting, skipped, ids, column, references) for column in columns]
        write_scores(results[-1], Path(cfg.scores_file or output.with_name("scores.json")), console)
    print_selection(cfg.select, chosen, results, sorted(agreement), console)
    console.print(f"{len(submission)} selected summaries -> {output}")


# ---- Checkpoint table: every checkpoint of a training run, scored on dev -----------------------------------------

def print_checkpoint_table(rows: list[dict], best: dict | None, console) -> None:
    """One row per checkpoint: training facts and scores x100, the best in bold green, a failed one in red."""
    from rich.table import Table

    def number(value, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    table = Table(title="checkpoints (scores x100)")
    for column in ("checkpoint", "step", "epoch", "train loss", "eval loss", *METRIC_COLUMNS.values(),
                   score_label(rows)):
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    for row in rows:
        name = row["checkpoint"] + (f" (= {row['same_weights_as']})" if row.get("same_weights_as") else "")
        facts = [name, str(row["step"]), number(row["epoch"], 2), number(row["train_loss"]), number(row["eval_loss"])]
        if row.get("error"):
            table.add_row(*facts, *["-"] * len(METRIC_COLUMNS), "failed", style="red")
            continue
        scores = [number(None if row.get(name) is None else 100 * row[name], 2) for name in (*METRIC_COLUMNS, "score")]
        table.add_row(*facts, *scores, style="bold green" if row is best else None)
    console.print(table)


def rescore_checkpoint(row: dict, references: dict[str, str], cfg: InferSettings, valid: set[str], console) -> dict:
    """Score a checkpoint's predictions file again: the metrics in `valid` keep their per-item values, the
    others are computed; the output guard's flags are carried over. Returns the new scores.json content."""
    ids, texts = ids_and_texts(read_json(row["predictions"]))
    old = read_json(row["scores"]) if Path(row["scores"]).is_file() else {"items": []}
    old_items = old.get("items", [])
    if [item["id"] for item in old_items] != ids:
        old_items, valid = [{} for _ in ids], set()
    known = {name: [item[name] for item in old_items] for name in valid if all(name in item for item in old_items)}
    scorers, skipped = metric_scorers(cfg, console)
    to_run = {name: scorer for name, scorer in scorers.items() if name not in known}
    result = score_with(to_run, skipped, ids, texts, [references[i] for i in ids], known)
    for item, old_item in zip(result["items"], old_items):
        item["guard"] = old_item.get("guard", [])
    result["metric_settings"] = {name: metric_settings(cfg)[name] for name in result["computed"]}
    result = {**result, **({"guard": old["guard"]} if "guard" in old else {})}
    write_scores(result, Path(row["scores"]), console)
    return result


def check_table_retry(cfg: InferSettings, earlier: dict, table_path: Path) -> None:
    """A table's --retry_empty / --regenerate_flagged retries an earlier table's files: there must be one."""
    if (cfg.retry_empty or cfg.regenerate_flagged) and earlier["generation"] is None:
        raise UserError(f"{table_path}: no earlier table of this input to retry; run the table first "
                        "(the same command without --retry_empty / --regenerate_flagged)")


def checkpoint_row(cfg: InferSettings, model_dir: Path, base: Path, rows: list[dict], earlier: dict, generation: dict,
                   references: dict[str, str], console) -> dict:
    """One checkpoint's row: reused from its twin (same weights), kept or rescored from an earlier run's predictions
    file, the earlier file retried (--retry_empty / --regenerate_flagged), or generated and scored."""
    output = base.with_name(f"{base.stem}.{model_dir.name}{base.suffix}")
    scores_path = output.with_name(f"{output.stem}.scores.json")
    row = {"checkpoint": model_dir.name, "path": str(model_dir), **training_facts(model_dir),
           "weights_sha256": weights_sha256(model_dir), "predictions": str(output), "scores": str(scores_path),
           "generation": generation}
    twin = next((done for done in rows if row["weights_sha256"] and done["weights_sha256"] == row["weights_sha256"]),
                None)
    previous = earlier["rows"].get(model_dir.name, {})
    retry = cfg.retry_empty or cfg.regenerate_flagged
    if twin:
        console.print(f"{model_dir.name}: the same weights as {twin['checkpoint']}; its scores are reused")
        shared = ("predictions", "scores", "error", *METRIC_COLUMNS, "score", "score_of", "metric_settings",
                  "generation")
        return {**row, **{key: twin.get(key) for key in shared}, "same_weights_as": twin["checkpoint"]}
    if not retry and reusable_predictions(previous, row, generation):
        wanted = {name: settings for name, settings in metric_settings(cfg).items() if name in cfg.metrics}
        valid, compute = metrics_to_rescore(previous, wanted, set(metric_scorers(cfg, console)[0]))
        if not compute and valid == set(previous.get("metric_settings", {})):
            console.print(f"{model_dir.name}: finished by an earlier run ({output}); kept")
            return previous
        console.print(f"{model_dir.name}: predictions kept from an earlier run ({output}); "
                      f"scoring {', '.join(sorted(compute)) or 'again'}")
        return {**previous, **scores_row(rescore_checkpoint(row, references, cfg, valid, console))}
    console.rule(f"[bold]{model_dir.name}")
    if retry:  # the file keeps the settings it was generated with; main records each retried item's own
        row["generation"] = previous.get("generation", generation)
    try:
        main(dataclasses.replace(cfg, model=str(model_dir), output=str(output), scores_file=str(scores_path), eval=True,
                                 overwrite=True))
        row.update(scores_row(read_json(scores_path)))
    except UserError as err:  # e.g. an early checkpoint that writes empty summaries: the others still count
        console.print(f"[red]{model_dir.name} failed: {err}")
        row["error"] = str(err)
    free_accelerator_memory()
    return row


def checkpoint_table(cfg: InferSettings, console) -> None:
    """`--model RUN_DIR`: generate and score every complete checkpoint and final/ on a file with references, one
    predictions file each, and rank them by the competition score. A rerun keeps every predictions file made with
    the same generation settings (rescoring it when only the metrics changed or one was missing), and main's
    partial file keeps the finished items of the checkpoint in flight."""
    run_dir = Path(cfg.model)
    models = run_models(run_dir)
    if not models:
        raise UserError(f"{run_dir}: no complete checkpoint-N/ or final/ to compare")
    if cfg.scores_file:
        raise UserError("--scores_file: with a training run as --model every checkpoint writes its own "
                        "<output>.<checkpoint>.scores.json; leave --scores_file out")
    records, _ = load_competition_file(cfg.input)
    records = records[:cfg.limit] if cfg.limit else records
    if cfg.eval is False or not all(record["output"].strip() for record in records):
        raise UserError(f"{cfg.input}: --model {run_dir} is a training run, whose checkpoints are compared by their "
                        "scores: the input needs every reference 'output' (use the dev file)")
    base = Path(cfg.output) if cfg.output else default_output(cfg.input, "references", None)
    table_path = base.with_name(f"{base.stem}.checkpoints.json")
    input_sha256 = file_sha256(cfg.input)
    earlier = read_table(table_path, input_sha256)
    check_table_retry(cfg, earlier, table_path)
    generation = earlier["generation"] if cfg.retry_empty or cfg.regenerate_flagged else table_generation(cfg)
    console.rule("loading the metrics' models")  # a scorer that cannot work stops the table before any generation
    metric_scorers(cfg, console)
    console.rule(f"[bold]{len(models)} checkpoints of {run_dir}: {', '.join(path.name for path in models)}")

    references = {record["id"]: record["output"] for record in records}
    rows: list[dict] = []
    for model_dir in models:
        rows.append(checkpoint_row(cfg, model_dir, base, rows, earlier, generation, references, console))
        kept = [old for name, old in earlier["rows"].items() if name not in {done["checkpoint"] for done in rows}]
        table = {"input_sha256": input_sha256, "generation": generation, "rows": rows + kept,
                 "best": (best_row(rows) or {}).get("checkpoint")}
        write_text_atomic(table_path, json.dumps(table, ensure_ascii=False, indent=2) + "\n")

    from rich.markup import escape

    best = best_row(rows)
    console.rule("[bold]checkpoint table")
    print_checkpoint_table(rows, best, console)
    console.print(f"table -> {table_path}")
    if best is None:
        raise UserError(f"{run_dir}: no checkpoint could be scored (see the errors above)")
    console.print(f"best by {score_label(rows)}: [bold]{best['checkpoint']}[/bold] ({100 * best['score']:.2f}); next: "
                  + escape(table_next_command(best, generation)), soft_wrap=True)


# ---- A generation run over --input: job -> plan -> engine -> generate -> select -> check -> write -> report ------

@dataclass
class Job:
    """What a generation run works on, read and checked before any model loads."""
    records: list[dict]  # validated, cut to --limit
    raw_records: list[dict]  # kept as given: the submission changes nothing but `output`
    dropped: int  # empty utterances ignored
    total: int  # records in the input, before --limit
    limit: int | None  # --limit where it leaves records out, else None
    kind: str  # input_kind: "references", "test" or "mixed"
    evaluate: bool  # scored against the input's outputs
    output: Path
    model_name: str
    run_config: dict
    system_prompt: bool  # the prompt settings of the model's training run
    clean_inputs: bool
    target_format: str
    # What makes the prompts and the model: a partial file made with anything else is not this run's.
    fingerprint: dict
    partial: Path
    band: tuple[int, int, str]  # the output guard's length band


def choose_output(cfg: InferSettings, kind: str, limit: int | None, total: int) -> Path:
    """--output, or the default name; refuses the input file, a folder, and a --limit run over an existing file."""
    default = default_output(cfg.input, kind, limit)
    output = Path(cfg.output) if cfg.output else default
    if output.resolve() == Path(cfg.input).resolve():
        raise UserError(f"--output {output} is the input file: choose another name (the input is never overwritten)")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder: give a file name")
    if limit and output.exists() and output != default and not cfg.overwrite:
        raise UserError(f"--output {output} exists, and this --limit {limit} run covers {limit} of {total} records, "
                        f"so it does not replace it; pass --overwrite to replace it, or leave out --output (writes "
                        f"{default})")
    return output


def open_job(cfg: InferSettings) -> Job:
    """The input's records (cut to --limit), the output, the model and its training run's prompt settings, the
    partial file's fingerprint and the length band; what cannot work is refused here."""
    raw_records = read_json(cfg.input)
    records, dropped = validate_competition_data(raw_records, cfg.input)
    if not records:
        raise UserError(f"{cfg.input}: the list holds no records; nothing to summarize")
    total = len(records)
    limit = cfg.limit if cfg.limit is not None and cfg.limit < total else None
    if limit:
        records, raw_records = records[:limit], raw_records[:limit]
    kind = input_kind(records)
    output = choose_output(cfg, kind, limit, total)
    evaluate = kind == "references" if cfg.eval is None else cfg.eval
    if evaluate and kind != "references":
        raise UserError(f"{cfg.input}: --eval needs every record's 'output' filled (the references)")
    model_name, run_config = resolve_model(cfg.model)
    prompt = trained_prompt_settings(run_config)
    check_preference_paths(cfg, output, kind, prompt["target_format"])
    fingerprint = {"input_sha256": file_sha256(cfg.input),
                   "model": str(Path(model_name).resolve()) if Path(model_name).exists() else model_name,
                   **prompt, "max_seq_length": cfg.max_seq_length}
    return Job(records=records, raw_records=raw_records, dropped=dropped, total=total, limit=limit, kind=kind,
               evaluate=evaluate, output=output, model_name=model_name, run_config=run_config, **prompt,
               fingerprint=fingerprint, partial=partial_path(output), band=length_band(run_config))


def print_job(cfg: InferSettings, job: Job, console) -> None:
    """The resolved settings as a table, where the prompt settings came from, the records read and the mode."""
    from rich.table import Table

    model_name = job.model_name
    table = Table(title="infer.py settings", show_header=False)
    load_in_4bit = default_load_in_4bit(model_name, job.run_config) if cfg.load_in_4bit is None else cfg.load_in_4bit
    for key, value in {**asdict(cfg), "model": model_name, "load_in_4bit": load_in_4bit,
                       "system_prompt (from training)": job.system_prompt,
                       "clean_inputs (from training)": job.clean_inputs,
                       "target_format (from training)": job.target_format}.items():
        table.add_row(key, str(value))
    console.print(table)
    if not job.run_config and Path(model_name).is_dir():
        console.print(f"[yellow]{model_name}: no run_config.json, so the default prompt is used (no system prompt, "
                      "no input cleaning)")
    elif Path(model_name).is_dir() and (source := run_config_source(Path(model_name))) != Path(model_name):
        console.print(f"[yellow]{model_name}: no run_config.json, so its run's {source} "
                      "gives the prompt settings (as train.py merge does)")
    console.print(f"{len(job.records)} records from {cfg.input}"
                  + (f" ({job.dropped} empty utterances ignored)" if job.dropped else ""))
    console.print(f"{mode_line(job.kind, job.evaluate, job.records)} -> {job.output}")


def load_metric_models(cfg: InferSettings, job: Job, console) -> None:
    """The models of scoring's and the preference pairs' metrics load before generation: a metric setting that
    cannot work stops the run before any summary is generated."""
    if job.evaluate:
        metric_scorers(cfg, console)
    if cfg.preference_out:
        preference_scorers(cfg, console)


@dataclass
class Plan:
    """What a generation run generates, and what it finds already done."""
    rows: dict[str, dict]  # the partial file's rows by id: every summary finished so far, and how it was generated
    todo: list[dict]  # the records to generate greedy summaries for now
    generation: dict  # generation_settings for them
    sampling: dict  # the candidates file's fingerprint: one model, prompt, generation and sampling setting
    sampled: dict[str, list[str]]  # the candidates file: per record its greedy summary, then its samples


def plan_generation(cfg: InferSettings, job: Job, console) -> tuple[dict[str, dict], list[dict], dict]:
    """(rows finished so far by id, records to generate now, the generation settings for them).

    A plain run resumes the partial file with the settings it was started with. --retry_empty /
    --regenerate_flagged take every summary as it stands (the partial file, else the earlier --output)
    and pick just the empty / flagged ones, to generate with this command's settings (plan_retry).
    """
    ids = {r["id"] for r in job.records}
    rows = {i: row for i, row in load_partial(job.partial, job.fingerprint).items() if i in ids}
    if cfg.retry_empty or cfg.regenerate_flagged:
        return plan_retry(cfg, job, rows, console)
    generation = generation_settings(cfg.max_new_tokens, cfg.repetition_penalty or 1.0)
    todo = [r for r in job.records if r["id"] not in rows]
    check_resume_settings(rows, generation, len(todo), job.partial)
    if rows:
        console.print(f"resuming: {len(rows)} already finished in {job.partial}")
    return rows, todo, generation


def plan_retry(cfg: InferSettings, job: Job, rows: dict[str, dict],
               console) -> tuple[dict[str, dict], list[dict], dict]:
    """plan_generation for --retry_empty / --regenerate_flagged: every summary of the run must be there."""
    records, output = job.records, job.output
    subset = " / ".join(flag for flag, on in (("--retry_empty", cfg.retry_empty),
                                              ("--regenerate_flagged", cfg.regenerate_flagged)) if on)
    if not rows and output.is_file():
        seeded = rows_from_output(output, job.raw_records)
        # From here on the partial file is the one record of every item.
        append_partial(job.partial, job.fingerprint, seeded)
        rows = {row["id"]: row for row in seeded}
        console.print(f"{subset}: starting from the {len(rows)} summaries in {output}")
    missing = [r["id"] for r in records if r["id"] not in rows]
    if missing:
        raise UserError(f"{output}: {len(missing)} of {len(records)} records have no summary yet (first "
                        f"{missing[0]!r}); finish the run first (the same command without {subset})")
    targets = regeneration_targets(records, {i: row["output"] for i, row in rows.items()}, job.band[:2],
                                   cfg.retry_empty, cfg.regenerate_flagged)
    penalty = cfg.repetition_penalty
    if penalty is None:
        penalty = next_repetition_penalty(max((rows[r["id"]].get("repetition_penalty", 1.0) for r in targets),
                                              default=1.0))
    generation = generation_settings(cfg.max_new_tokens, penalty)
    tried = [r for r in targets if generated_with(rows[r["id"]], generation)]
    todo = [r for r in targets if not generated_with(rows[r["id"]], generation)]
    console.print(f"{subset}: regenerating {len(todo)} of {len(records)} summaries with "
                  f"{describe_generation(generation)}; the other {len(records) - len(todo)} are kept as they are")
    if tried:
        console.print(f"[yellow]{len(tried)} of the selected summaries were already generated with these settings and "
                      f"stay as they are; --repetition_penalty {next_repetition_penalty(penalty)} would try again")
    return rows, todo, generation


def plan_run(cfg: InferSettings, job: Job, console) -> Plan:
    """plan_generation, then the candidates an earlier --num_samples run left (their greedy summaries count)."""
    rows, todo, generation = plan_generation(cfg, job, console)
    sampling = {**job.fingerprint, **generation, "num_samples": cfg.num_samples, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "seed": cfg.seed}
    sampled = ({i: row["candidates"] for i, row in load_partial(candidates_path(job.output), sampling).items()}
               if cfg.num_samples else {})
    if sampled:  # an earlier run's candidates start with each record's greedy summary
        rows.update({i: {"id": i, "output": texts[0], **generation} for i, texts in sampled.items()
                     if i not in rows and texts[0]})
        todo = [r for r in todo if r["id"] not in rows]
    return Plan(rows=rows, todo=todo, generation=generation, sampling=sampling, sampled=sampled)


class LazyEngine:
    """The generation engine, loaded on first use (a resumed run with nothing left to generate loads no model).
    It holds the prompt budget the model leaves, saves each finished batch to the partial file and the plan's rows
    (each finished record's samples to the candidates file), and counts what it generated."""

    def __init__(self, cfg: InferSettings, job: Job, plan: Plan, console) -> None:
        self.cfg, self.job, self.plan, self.console = cfg, job, plan, console
        self.engine: Any = None
        self.budget = 0  # prompt tokens: max_seq_length less --max_new_tokens
        self.tokens = self.shortened = 0
        self.peak_memory = "n/a (no model loaded)"
        self.set_aside: list[str] = []  # ids out of memory even alone, left unfinished

    def load(self) -> Any:
        """The engine, loaded on the first call; refuses a --max_new_tokens that leaves no room for a prompt."""
        if self.engine is None:
            cfg = self.cfg
            self.console.rule(f"loading model ({cfg.engine} engine)")
            engine = open_engine(self.job.model_name, self.job.run_config, cfg, batch_size=cfg.batch_size,
                                 max_seq_length=cfg.max_seq_length, load_in_4bit=cfg.load_in_4bit)
            self.console.print(f"generating with {engine.served_on}", markup=False, highlight=False)
            budget = engine.max_seq_length - cfg.max_new_tokens
            if budget < 64:
                raise UserError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for the prompt in "
                                f"max_seq_length {engine.max_seq_length}")
            self.engine, self.budget = engine, budget
        return self.engine

    def prompts(self, records: list[dict]) -> list[str]:
        """The records' prompts (loading the engine), shortened to fit the budget where needed."""
        tokenizer, job = self.load().tokenizer, self.job
        count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        render = functools.partial(chat_prompt, tokenizer, system_prompt=job.system_prompt,
                                   target_format=job.target_format)
        prompts, shortened = [], 0
        for record in records:
            record = clean_record(record)[0] if job.clean_inputs else record
            prompt, was_shortened = shorten_to_fit(record, render, count_tokens, self.budget)
            prompts.append(prompt)
            shortened += was_shortened
        self.shortened += shortened
        if shortened:
            self.console.print(f"[yellow]{shortened} prompt(s) longer than {self.budget} tokens were shortened in the "
                               "middle of the conversation")
        return prompts

    def generate(self, todo: list[dict]) -> None:
        """The greedy summaries of `todo`, with the plan's generation settings."""
        prompts, cfg, generation = self.prompts(todo), self.cfg, self.plan.generation
        self.console.rule(f"generating {len(todo)} summaries ({cfg.engine} engine, batch {cfg.batch_size}, greedy, "
                          f"{describe_generation(generation)})")
        self.engine.generate(prompts, Sampling(generation["max_new_tokens"],
                                               repetition_penalty=generation["repetition_penalty"]),
                             on_batch=functools.partial(self.save_batch, todo),
                             on_set_aside=functools.partial(self.set_aside_record, todo), console=self.console)

    def save_batch(self, todo: list[dict], indices: list[int], texts: list[str], new_tokens: int) -> None:
        """A finished batch to the partial file and the plan's rows. Empty summaries are recorded too: a resume
        does not redo them with the same settings."""
        new_rows = [{"id": todo[i]["id"], **as_prose(text, self.job.target_format), **self.plan.generation}
                    for i, text in zip(indices, texts)]
        append_partial(self.job.partial, self.job.fingerprint, new_rows)
        self.plan.rows.update({row["id"]: row for row in new_rows})
        self.tokens += new_tokens

    def set_aside_record(self, todo: list[dict], index: int) -> None:
        """A record out of memory even alone: left unfinished, and named when the run stops."""
        self.set_aside.append(todo[index]["id"])

    def sample(self, todo: list[dict], greedy: dict[str, str]) -> None:
        """--num_samples summaries more for each record of `todo`, seeded with --seed."""
        prompts, cfg = self.prompts(todo), self.cfg
        from transformers import set_seed  # after the engine: unsloth must patch transformers first

        set_seed(cfg.seed)
        self.console.rule(f"sampling {cfg.num_samples} more summaries for {len(todo)} records (temperature "
                          f"{cfg.temperature}, top_p {cfg.top_p})")
        self.engine.sample(prompts, cfg.num_samples,
                           Sampling(cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                    repetition_penalty=cfg.repetition_penalty or 1.0),
                           on_prompt=functools.partial(self.save_samples, todo, greedy), console=self.console)

    def save_samples(self, todo: list[dict], greedy: dict[str, str], index: int, texts: list[str]) -> None:
        """A finished record's greedy output + samples, appended to the candidates file at once."""
        texts = [as_prose(text, self.job.target_format)["output"] for text in texts]
        row = {"id": todo[index]["id"], "candidates": [greedy.get(todo[index]["id"], ""), *texts]}
        append_partial(candidates_path(self.job.output), self.plan.sampling, [row])
        self.plan.sampled[row["id"]] = row["candidates"]

    def release(self) -> None:
        """Close the engine once generation is over: the scorers load BLEURT and BERTScore next, and vLLM keeps
        --gpu_memory_utilization of the card until its engine process ends."""
        if self.engine is not None:
            self.peak_memory = self.engine.peak_memory()
            self.console.print(f"{self.cfg.engine} engine closed before scoring: {self.engine.close()}", markup=False,
                               highlight=False)
            self.engine = None


def sample_and_select(cfg: InferSettings, job: Job, plan: Plan, engine: LazyEngine, greedy: dict[str, str],
                      console) -> dict[str, str]:
    """--num_samples: sample the records not yet in the candidates file, close the engine, then keep per record the
    candidate that agrees most with the others (BERTScore's model loads here); the file is rewritten with each
    record's `chosen` index. Returns {id: chosen output}."""
    todo = [r for r in job.records if r["id"] not in plan.sampled]
    if todo:
        engine.sample(todo, greedy)
    engine.release()
    candidates = [plan.sampled[r["id"]] for r in job.records]
    _, _, agreement = selection_scorers(cfg, console, with_references=False)
    chosen, utilities = select_candidates(candidates, agreement)
    rows = [{"id": r["id"], "candidates": texts, "chosen": index, "agreement": row}
            for r, texts, index, row in zip(job.records, candidates, chosen, utilities)]
    path = candidates_path(job.output)
    write_candidates(path, plan.sampling, rows)
    greedy_kept = chosen.count(0)
    console.print(f"minimum Bayes risk ({', '.join(sorted(agreement))}): the greedy summary kept for {greedy_kept} of "
                  f"{len(chosen)} records, a sample for {len(chosen) - greedy_kept}; candidates -> {path}")
    return {r["id"]: texts[index] for r, texts, index in zip(job.records, candidates, chosen)}


def check_finished(cfg: InferSettings, job: Job, plan: Plan, engine: LazyEngine, outputs: dict[str, str]) -> None:
    """Refuse to write a submission with a record left unfinished (out of memory even alone) or empty; the
    finished summaries stay in the partial file."""
    if engine.set_aside:
        raise UserError(f"{cfg.input}: record id {engine.set_aside[0]!r} (and {len(engine.set_aside) - 1} more): CUDA "
                        f"out of memory even alone, left unfinished; finished items are kept in {job.partial}; rerun "
                        "with a lower --max_new_tokens or --max_seq_length (delete the partial file first)")
    empty = [r["id"] for r in job.records if not outputs.get(r["id"])]
    if empty:
        raise empty_summaries_error(cfg.input, empty, plan.rows, job.partial)


def print_done(job: Job, plan: Plan, engine: LazyEngine, submission: list[dict], started: float, console) -> None:
    """The run's counts: summaries written, what was generated now, wall time and peak GPU memory."""
    lengths = [len(r["output"]) for r in submission]
    console.rule("done")
    console.print(f"{len(submission)} summaries -> {job.output} (mean {sum(lengths) / len(lengths):.0f} chars); "
                  f"generated now: {len(plan.todo)} items, {engine.tokens} tokens, {engine.shortened} prompts "
                  f"shortened; wall time {time.perf_counter() - started:.1f} s; peak GPU memory {engine.peak_memory}")
    if job.limit:
        console.print(f"[yellow]--limit {job.limit}: this file covers {job.limit} of {job.total} records; not a full "
                      "submission")


def guard_outputs(cfg: InferSettings, job: Job, plan: Plan, outputs: dict[str, str], submission: list[dict],
                  console) -> dict:
    """The output guard's report on the submission (length band, loops, a structure that did not parse), printed
    with the command that regenerates what it flags."""
    ids, texts = ids_and_texts(submission)
    rows = plan.rows
    guard = guard_report(ids, texts, job.band)
    malformed = [i for i in ids if rows.get(i, {}).get("malformed_structure") and rows[i]["output"] == outputs[i]]
    flag_malformed_structure(guard, malformed)
    flagged_penalty = max((rows.get(i, {}).get("repetition_penalty", 1.0) for i in guard["flagged"]), default=1.0)
    # --regenerate_flagged redoes greedy summaries: after --num_samples the command that runs drops the sampling.
    unsampled = {key: getattr(InferSettings, key) for key in ("num_samples", *SAMPLING_SETTINGS)}
    retry = infer_command(cfg, **unsampled, regenerate_flagged=True,
                          repetition_penalty=next_repetition_penalty(flagged_penalty)) if cfg.num_samples else None
    print_guard(guard, console, next_repetition_penalty(flagged_penalty), retry)
    return guard


def score_outputs(cfg: InferSettings, job: Job, guard: dict, submission: list[dict], console) -> None:
    """Score the submission against the input's outputs: scores.json (or --scores_file), with the guard's flags."""
    ids, texts = ids_and_texts(submission)
    console.rule("scoring against the input's outputs")
    scorers, skipped = metric_scorers(cfg, console)
    result = score_with(scorers, skipped, ids, texts, [r["output"] for r in job.records])
    result["metric_settings"] = {name: metric_settings(cfg)[name] for name in result["computed"]}
    print_scores(result, console)
    for item in result["items"]:
        item["guard"] = guard["flags"][item["id"]]
    write_scores({**result, "guard": guard_summary(guard)},
                 Path(cfg.scores_file or job.output.with_name("scores.json")), console)


def write_guard(cfg: InferSettings, job: Job, guard: dict, submission: list[dict], console) -> None:
    """An unscored run: the guard's flags per item, and the next command (the full run, or upload and a dev run)."""
    ids, texts = ids_and_texts(submission)
    # Not scores.json: a test run must not replace the dev run's scores next to it.
    items = [{"id": i, "pred_chars": len(text), "guard": guard["flags"][i]} for i, text in zip(ids, texts)]
    write_scores({"guard": guard_summary(guard), "items": items},
                 Path(cfg.scores_file or job.output.with_name(f"{job.output.stem}.guard.json")), console)
    if job.limit:  # a partial file is never a submission: the next step is the full run
        full_run = infer_command(cfg, limit=None, overwrite=False)
        console.print(f"next: the full run, {full_run}", markup=False, soft_wrap=True)
    else:
        dev_run = infer_command(cfg, input="data/일상대화요약_dev.json", output="dev_pred.json", limit=None)
        console.print(f"next: upload {shell_command(job.output)}, or score a dev run with {dev_run}", markup=False,
                      soft_wrap=True)


def main(cfg: InferSettings) -> None:
    check_environment(needs_torch=not (cfg.score or cfg.select))  # --score / --select load no generation model
    filter_known_noise()
    from rich.console import Console

    console = Console()
    check_settings(cfg)
    if cfg.score:
        score_only(cfg, console)
        return
    if cfg.select:
        select_only(cfg, console)
        return
    if cfg.model and is_training_run(Path(cfg.model)):
        checkpoint_table(cfg, console)
        return

    started = time.perf_counter()
    job = open_job(cfg)
    print_job(cfg, job, console)
    load_metric_models(cfg, job, console)
    plan = plan_run(cfg, job, console)
    engine = LazyEngine(cfg, job, plan, console)
    if plan.todo:
        engine.generate(plan.todo)
    outputs = {i: row["output"] for i, row in plan.rows.items()}
    if cfg.num_samples:
        outputs = sample_and_select(cfg, job, plan, engine, outputs, console)
    engine.release()

    check_finished(cfg, job, plan, engine, outputs)
    submission = write_submission(job.raw_records, outputs, job.output)
    job.partial.unlink(missing_ok=True)
    print_done(job, plan, engine, submission, started, console)
    guard = guard_outputs(cfg, job, plan, outputs, submission, console)
    if job.evaluate:
        score_outputs(cfg, job, guard, submission, console)
    else:
        write_guard(cfg, job, guard, submission, console)
    if cfg.preference_out:  # last: the submission and its scores are written whatever the pairs come to
        write_preference_data(cfg, job.records, plan.sampled, *preference_scorers(cfg, console), job.model_name,
                              job.run_config, console)


if __name__ == "__main__":
    run_cli(main, parse_settings(InferSettings, None, __doc__.splitlines()[0]))
