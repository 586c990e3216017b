"""The competition's score: ROUGE-1, BERTScore and BLEURT as teddysum/korean_evaluation computes them.

infer.py scores with these functions (`python infer.py --score pred.json --ref dev.json`); they import
nothing heavy at module level, and each metric loads its model only when asked for.

ROUGE-1 is exactly the official scorer's (lowercase, non-[A-Za-z0-9가-힣] -> space, Mecab morphemes,
clipped unigram F1); BERTScore and BLEURT are computed when their packages and models are available.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import re
from pathlib import Path
from typing import Callable

from prep import UserError, write_text_atomic

KNOWN_METRICS = ("rouge1", "bertscore", "bleurt")
BERTSCORE_MODEL = "bert-base-multilingual-cased"
BLEURT_MODEL = "lucadiliello/BLEURT-20"  # PyTorch port of BLEURT-20 (pip install git+https://github.com/lucadiliello/bleurt-pytorch)


NON_SCORED_CHARS = re.compile(r"[^A-Za-z0-9가-힣]")
ROUGE_WORD_LIMIT = 1000  # the official scorer keeps the first 1000 whitespace words of each text


def rouge_tokens(text: str, morphs: Callable[[str], list[str]]) -> list[str]:
    """The official preprocessing: first 1000 words, lowercase, non-[A-Za-z0-9가-힣] -> space, Mecab morphemes."""
    words = " ".join(text.split("\n")).split()[:ROUGE_WORD_LIMIT]
    cleaned = NON_SCORED_CHARS.sub(" ", " ".join(words).lower()).strip()
    return " ".join(morphs(cleaned)).split()


def rouge1_f1(hypothesis: list[str], reference: list[str]) -> float:
    """Clipped unigram overlap F1 (alpha 0.5); 0 when either side is empty or nothing overlaps."""
    overlap = sum((collections.Counter(hypothesis) & collections.Counter(reference)).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / len(hypothesis), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def mecab_morphs() -> Callable[[str], list[str]]:
    from mecab import MeCab

    tagger = MeCab()
    return lambda text: tagger.morphs(text) if text else []


def rouge1_scores(predictions: list[str], references: list[str]) -> list[float]:
    morphs = mecab_morphs()
    return [rouge1_f1(rouge_tokens(p, morphs), rouge_tokens(r, morphs)) for p, r in zip(predictions, references)]


def bertscore_scores(predictions: list[str], references: list[str]) -> list[float]:
    import bert_score

    _, _, f1 = bert_score.score(predictions, references, model_type=BERTSCORE_MODEL, idf=False, rescale_with_baseline=False, verbose=False)
    return [float(x) for x in f1]


def bleurt_scores(predictions: list[str], references: list[str], batch_size: int = 16) -> list[float]:
    import torch
    from bleurt_pytorch import BleurtForSequenceClassification, BleurtTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = BleurtTokenizer.from_pretrained(BLEURT_MODEL)
    model = BleurtForSequenceClassification.from_pretrained(BLEURT_MODEL).to(device).eval()
    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(predictions), batch_size):
            inputs = tokenizer(references[start:start + batch_size], predictions[start:start + batch_size], padding="longest", truncation=True, max_length=512, return_tensors="pt").to(device)
            scores += model(**inputs).logits.flatten().tolist()
    return scores


OPTIONAL_METRICS = {  # name -> (python module it needs, install hint, scorer)
    "bertscore": ("bert_score", "pip install bert-score", bertscore_scores),
    "bleurt": ("bleurt_pytorch", "pip install git+https://github.com/lucadiliello/bleurt-pytorch", bleurt_scores),
}


def score_predictions(ids: list[str], predictions: list[str], references: list[str], metrics: list[str], console) -> dict:
    """Per-item and mean scores; a metric whose package or model is unavailable is skipped with the reason."""
    per_metric: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    if "rouge1" in metrics:
        per_metric["rouge1"] = rouge1_scores(predictions, references)
    for name, (module, hint, scorer) in OPTIONAL_METRICS.items():
        if name not in metrics:
            continue
        if importlib.util.find_spec(module) is None:
            skipped[name] = f"package {module} not installed ({hint})"
            continue
        try:
            per_metric[name] = scorer(predictions, references)
        except Exception as err:  # offline or no hub access: the model cannot be fetched; ROUGE-1 still stands
            skipped[name] = f"model could not be loaded ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
    for name, reason in skipped.items():
        console.print(f"[yellow]{name} skipped: {reason}")
    means = {name: sum(values) / len(values) for name, values in per_metric.items()}
    items = [
        {"id": i, **{name: values[k] for name, values in per_metric.items()}, "pred_chars": len(p), "ref_chars": len(r)}
        for k, (i, p, r) in enumerate(zip(ids, predictions, references))
    ]
    return {"means": means, "mean_of_computed": sum(means.values()) / len(means) if means else None,
            "computed": sorted(means), "skipped": skipped, "items": items}


def print_scores(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title="scores (x100)")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in result["means"].items():
        table.add_row(name, f"{100 * value:.2f}")
    for name, reason in result["skipped"].items():
        table.add_row(name, "skipped", style="dim")
    if result["mean_of_computed"] is not None:
        label = "final (mean of all three)" if set(result["computed"]) == set(KNOWN_METRICS) else f"mean of {', '.join(result['computed'])} only"
        table.add_row(label, f"{100 * result['mean_of_computed']:.2f}", style="bold")
    console.print(table)
    lengths = [item["pred_chars"] for item in result["items"]]
    console.print(f"summary length: mean {sum(lengths) / len(lengths):.0f} chars (references "
                  f"{sum(i['ref_chars'] for i in result['items']) / len(lengths):.0f})")


def pair_by_id(predictions: list[dict], references: list[dict], pred_path: str, ref_path: str) -> tuple[list[str], list[str], list[str]]:
    """(ids, predicted outputs, reference outputs) matched by id; every mismatch is reported."""
    ref_by_id = {r["id"]: r["output"] for r in references}
    pred_ids = [p["id"] for p in predictions]
    missing = [i for i in ref_by_id if i not in set(pred_ids)]
    extra = [i for i in pred_ids if i not in ref_by_id]
    if missing or extra:
        raise UserError(f"{pred_path}: ids do not match {ref_path}: {len(missing)} missing (first {missing[:1]}), {len(extra)} not in the reference (first {extra[:1]})")
    empty_refs = [i for i, out in ref_by_id.items() if not out.strip()]
    if empty_refs:
        raise UserError(f"{ref_path}: record id {empty_refs[0]!r}: field 'output' is empty; references need summaries to score against")
    return pred_ids, [p["output"] for p in predictions], [ref_by_id[i] for i in pred_ids]


def write_scores(result: dict, path: Path, console) -> None:
    write_text_atomic(path, json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    console.print(f"per-item scores -> {path}")
