"""The competition's score: ROUGE-1, BERTScore and BLEURT as teddysum/korean_evaluation computes them,
and minimum-Bayes-risk selection among candidate summaries by the same metrics.

infer.py scores with these functions (`python infer.py --score pred.json --ref dev.json`) and selects with
them (`python infer.py --select a.json b.json --output best.json`); they import nothing heavy at module
level, and each learned metric loads its model only when asked for.

- ROUGE-1 is exactly the official scorer's (lowercase, non-[A-Za-z0-9가-힣] -> space, Mecab morphemes,
  clipped unigram F1).
- BERTScore is bert_score's own computation with the official settings (bert-base-multilingual-cased,
  layer 9, no idf, no baseline rescaling, batch 64, the slow BERT tokenizer); an empty candidate scores 0.
- BLEURT runs the PyTorch port of BLEURT-20 (lucadiliello/BLEURT-20) on transformers' RemBERT, the same
  architecture, with the original's tokenization and activation (see bleurt_scorer).
- The output guard flags summaries outside a length band taken from the training summaries, or caught in a
  repetition loop (guard_flags); infer.py reports the flags and can regenerate just those summaries.

    result = score_predictions(ids, predictions, references, ["rouge1", "bertscore", "bleurt"], console)
    result["means"], result["final"], result["items"]
"""
from __future__ import annotations

import collections
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common import UserError, read_json, write_text_atomic
from prep import load_competition_file
from targets import flatten_structured

KNOWN_METRICS = ("rouge1", "bertscore", "bleurt")
BERTSCORE_MODEL = "bert-base-multilingual-cased"
BERTSCORE_LAYERS = 9  # bert_score's tuned layer for bert-base-multilingual-cased, which the official scorer uses
BERTSCORE_BATCH = 64  # bert_score's default, as evaluate.load("bertscore") runs it
BLEURT_MODEL = "lucadiliello/BLEURT-20"  # PyTorch port of Google's BLEURT-20 (the official checkpoint)
BLEURT_BATCH = 16
LEADERBOARD_LABEL = "final (R1 + BERTScore + BLEURT) / 3"

Scorer = Callable[[list[str], list[str]], list[float]]  # (hypotheses, references) -> one value per pair


@dataclass(frozen=True)
class MetricModels:
    """Which models the learned metrics load (infer.py's --bertscore_model, --bertscore_layers, --bleurt_model)."""
    bertscore_model: str = BERTSCORE_MODEL
    bertscore_layers: int = BERTSCORE_LAYERS
    bleurt_model: str = BLEURT_MODEL


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
    tokens = {text: rouge_tokens(text, morphs) for text in {*predictions, *references}}  # MBR pairs repeat texts
    return [rouge1_f1(tokens[p], tokens[r]) for p, r in zip(predictions, references)]


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bertscore_tokenizer(name: str, config):
    """The tokenizer the official scorer used: for BERT models the slow (pure Python) BertTokenizer of
    transformers 4, kept in transformers 5 as BertTokenizerLegacy (AutoTokenizer now always returns the fast
    one). A tokenizer saved without model_max_length reports 1e30, which bert_score passes on as the
    truncation length (OverflowError in transformers 5): cap it at the model's positions, as transformers 4's
    built-in table did for the Hub models (512)."""
    from transformers import AutoTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    tokenizer = (BertTokenizerLegacy if config.model_type == "bert" else AutoTokenizer).from_pretrained(name)
    tokenizer.model_max_length = min(tokenizer.model_max_length, config.max_position_embeddings)
    return tokenizer


def bertscore_scorer(models: MetricModels) -> Scorer:
    """F1 of bert_score (idf off, no rescaling, batch 64) with models.bertscore_layers layers.

    Empty candidates are scored 0 here, bert_score's own rule, without passing them in: bert_score 0.3.13
    builds their input with build_inputs_with_special_tokens, which transformers 5's fast tokenizers lack."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models.bertscore_model)
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and not 1 <= models.bertscore_layers <= layers:
        raise UserError(f"--bertscore_layers {models.bertscore_layers}: "
                        f"{models.bertscore_model} has layers 1..{layers}")
    from bert_score.utils import bert_cos_score_idf, get_model

    tokenizer = bertscore_tokenizer(models.bertscore_model, config)
    device = torch_device()
    model = get_model(models.bertscore_model, models.bertscore_layers).to(device)
    idf_weights = collections.defaultdict(lambda: 1.0)  # bert_score's idf=False: every token 1, [CLS]/[SEP] 0
    idf_weights[tokenizer.sep_token_id] = idf_weights[tokenizer.cls_token_id] = 0

    def score(hypotheses: list[str], references: list[str]) -> list[float]:
        scored = [i for i, text in enumerate(hypotheses) if text.strip()]
        f1 = [0.0] * len(hypotheses)
        if scored:
            values = bert_cos_score_idf(model, [references[i] for i in scored], [hypotheses[i] for i in scored],
                                        tokenizer, idf_weights, batch_size=BERTSCORE_BATCH, device=device)[:, 2]
            for i, value in zip(scored, values.tolist()):
                f1[i] = value
        return f1

    return score


def model_file(model: str, *names: str) -> Path:
    """The first of `names` in a local model folder, else from the Hub (its cache, or a download)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if not Path(model).is_dir() and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise FileNotFoundError(f"{model}: model folder not found (and not a Hub id)")
    missing: Exception | None = None
    for name in names:
        if Path(model).is_dir():
            if (Path(model) / name).is_file():
                return Path(model) / name
            missing = FileNotFoundError(f"{model}/{name} not found")
            continue
        try:
            return Path(hf_hub_download(model, name))
        except EntryNotFoundError as err:
            missing = err
    raise missing


def bleurt_rembert_weights(port_weights: dict, hidden_size: int) -> dict:
    """The port's state dict under transformers' RemBERT names: the architecture is the same (BERT layers
    behind a projection of smaller embeddings); a port without that projection gets the identity."""
    import torch

    weights = {}
    for name, tensor in port_weights.items():
        if name.endswith("position_ids"):
            continue  # a buffer the port saved, not a weight
        name = name.replace("bleurt.", "rembert.", 1).replace(".embedding_projection.", ".embedding_hidden_mapping_in.")
        weights[name] = tensor
    weights.setdefault("rembert.encoder.embedding_hidden_mapping_in.weight", torch.eye(hidden_size))
    weights.setdefault("rembert.encoder.embedding_hidden_mapping_in.bias", torch.zeros(hidden_size))
    return weights


def bleurt_pair_ids(reference: list[int], candidate: list[int], max_length: int, cls: int,
                    sep: int) -> tuple[list[int], list[int]]:
    """(input ids, segment ids) as the original's encode_example builds them: the longer side loses its last
    token until both fit, then [CLS] reference [SEP] candidate [SEP]."""
    reference, candidate = list(reference), list(candidate)
    while len(reference) + len(candidate) > max_length - 3:
        (reference if len(reference) > len(candidate) else candidate).pop()
    ids = [cls, *reference, sep, *candidate, sep]
    return ids, [0] * (len(reference) + 2) + [1] * (len(candidate) + 1)


def bleurt_scorer(models: MetricModels) -> Scorer:
    """BLEURT scores from the PyTorch port's files (config.json, spm.model, weights), run as the TF original.

    bleurt-pytorch itself no longer imports under transformers 5 (find_pruneable_heads_and_indices,
    tokenization_bert_fast, get_extended_attention_mask and get_head_mask are gone), so its weights are
    loaded into transformers' RemBERT. Two choices follow the TF original rather than the port: the
    SentencePiece pieces come straight from spm.model (the port converts it to a `tokenizers` pipeline), and
    GELU is the tanh approximation of bleurt/lib/modeling.py (the port's config says the exact erf GELU).
    Predictions are reference-candidate pairs exactly as BleurtScorer.score encodes them (max length = the
    model's positions, 512 for BLEURT-20); an empty candidate is scored by the model, as the original does.
    """
    import sentencepiece
    import torch
    from transformers import RemBertConfig, RemBertForSequenceClassification

    config = json.loads(model_file(models.bleurt_model, "config.json").read_text(encoding="utf-8"))
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(model_file(models.bleurt_model, "spm.model")))
    weights_path = model_file(models.bleurt_model, "model.safetensors", "pytorch_model.bin")
    if weights_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        port_weights = load_file(str(weights_path))
    else:
        port_weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    hidden = config["hidden_size"]
    model = RemBertForSequenceClassification(RemBertConfig(
        vocab_size=config["vocab_size"], hidden_size=hidden, num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
        input_embedding_size=config.get("embedding_size") or hidden, hidden_act="gelu_new",
        max_position_embeddings=config["max_position_embeddings"], type_vocab_size=config.get("type_vocab_size", 2),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12), pad_token_id=config.get("pad_token_id", 0), num_labels=1,
    ))
    model.load_state_dict(bleurt_rembert_weights(port_weights, hidden), strict=True)
    device = torch_device()
    model.to(device).eval()
    cls, sep, max_length = pieces.piece_to_id("[CLS]"), pieces.piece_to_id("[SEP]"), config["max_position_embeddings"]

    def score(hypotheses: list[str], references: list[str]) -> list[float]:
        pairs = [bleurt_pair_ids(pieces.encode(r), pieces.encode(h), max_length, cls, sep)
                 for h, r in zip(hypotheses, references)]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))  # similar lengths share a batch: less padding
        scores = [0.0] * len(pairs)
        with torch.inference_mode():
            for start in range(0, len(order), BLEURT_BATCH):
                batch = order[start:start + BLEURT_BATCH]
                width = max(len(pairs[i][0]) for i in batch)
                ids = torch.tensor([pairs[i][0] + [0] * (width - len(pairs[i][0])) for i in batch], device=device)
                segments = torch.tensor([pairs[i][1] + [0] * (width - len(pairs[i][1])) for i in batch], device=device)
                mask = torch.tensor([[1] * len(pairs[i][0]) + [0] * (width - len(pairs[i][0])) for i in batch],
                                    device=device)
                logits = model(input_ids=ids, token_type_ids=segments, attention_mask=mask).logits[:, 0]
                for i, value in zip(batch, logits.tolist()):
                    scores[i] = value
        return scores

    return score


LEARNED_METRICS = {  # name -> (python module it needs, install hint, loader of its scorer)
    "bertscore": ("bert_score", "pip install bert-score==0.3.13", bertscore_scorer),
    "bleurt": ("sentencepiece", "pip install sentencepiece", bleurt_scorer),
}


def load_scorers(metrics: list[str], models: MetricModels, console) -> tuple[dict[str, Scorer], dict[str, str]]:
    """({metric: scorer}, {metric: why it was skipped}); a learned metric is skipped only when its package is
    missing or its model cannot be loaded (offline, not on the Hub, missing files), and the reason says which."""
    scorers: dict[str, Scorer] = {"rouge1": rouge1_scores} if "rouge1" in metrics else {}
    skipped: dict[str, str] = {}
    for name, (module, hint, load) in LEARNED_METRICS.items():
        if name not in metrics:
            continue
        if importlib.util.find_spec(module) is None:
            skipped[name] = f"package {module} not installed ({hint})"
            continue
        model = models.bertscore_model if name == "bertscore" else models.bleurt_model
        try:
            scorers[name] = load(models)
        except (OSError, ValueError) as err:  # offline / not cached / no such repo or file: ROUGE-1 still stands
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            skipped[name] = f"model {model} could not be loaded ({type(err).__name__}: {first_line})"
    for name, reason in skipped.items():
        console.print(f"[yellow]{name} skipped: {reason}")
    return scorers, skipped


def score_with(scorers: dict[str, Scorer], skipped: dict[str, str], ids: list[str], predictions: list[str],
               references: list[str], known: dict[str, list[float]] | None = None) -> dict:
    """Per-item and mean scores from loaded scorers and the per-item values `known` from an earlier scoring of the
    same predictions; "final" (overall and per item) is the leaderboard's mean, present only when all three metrics ran.
    A metric that fails while scoring (out of memory, say) is skipped with the reason: the others still count."""
    known = known or {}
    skipped = {name: reason for name, reason in skipped.items() if name not in known}
    per_metric = {}
    for name in (m for m in KNOWN_METRICS if m in scorers or m in known):
        if name in known:
            per_metric[name] = known[name]
            continue
        try:
            per_metric[name] = scorers[name](predictions, references)
        except (UserError, RuntimeError, ValueError, OSError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            skipped[name] = f"failed while scoring ({type(err).__name__}: {first_line})"
    means = {name: sum(values) / len(values) for name, values in per_metric.items()}
    complete = set(means) == set(KNOWN_METRICS)
    items = [
        {"id": i, **{name: values[k] for name, values in per_metric.items()}, "pred_chars": len(p), "ref_chars": len(r)}
        for k, (i, p, r) in enumerate(zip(ids, predictions, references))
    ]
    for item in items if complete else []:  # the item's own leaderboard-style score, for error analysis
        item["final"] = sum(item[name] for name in KNOWN_METRICS) / len(KNOWN_METRICS)
    mean = sum(means.values()) / len(means) if means else None
    return {"means": means, "final": mean if complete else None, "mean_of_computed": mean,
            "label": LEADERBOARD_LABEL if complete else f"mean of {', '.join(sorted(means))} only",
            "computed": sorted(means), "skipped": skipped, "items": items}


def score_predictions(ids: list[str], predictions: list[str], references: list[str], metrics: list[str], console,
                      models: MetricModels = MetricModels()) -> dict:
    """Per-item and mean scores for `metrics`; a learned metric whose package or model is unavailable is
    skipped with the reason. Returns {"means", "final" (the leaderboard score, None unless all three ran),
    "mean_of_computed", "label", "computed", "skipped", "items" (id, each metric, pred_chars, ref_chars)}."""
    scorers, skipped = load_scorers(metrics, models, console)
    return score_with(scorers, skipped, ids, predictions, references)


def print_scores(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title="scores (x100)")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in result["means"].items():
        table.add_row(name, f"{100 * value:.2f}")
    for name in result["skipped"]:
        table.add_row(name, "skipped", style="dim")
    if result["mean_of_computed"] is not None:
        table.add_row(result["label"], f"{100 * result['mean_of_computed']:.2f}", style="bold")
    console.print(table)
    lengths = [item["pred_chars"] for item in result["items"]]
    console.print(f"summary length: mean {sum(lengths) / len(lengths):.0f} chars (references "
                  f"{sum(i['ref_chars'] for i in result['items']) / len(lengths):.0f})")


# ---------------------------------------------------------------------------------------------
# Minimum Bayes risk: per item, the candidate that agrees most with the others
# ---------------------------------------------------------------------------------------------

def mbr_utilities(candidates: list[list[str]], utility: Scorer) -> list[list[float]]:
    """For every item, each candidate's mean utility against the item's other candidates.

    ROUGE-1 F1 and BERTScore F1 are symmetric, so each unordered pair is scored once, in one call for all
    items (one model pass). A lone candidate gets 0."""
    pairs = [(item, i, j) for item, texts in enumerate(candidates)
             for i in range(len(texts)) for j in range(i + 1, len(texts))]
    values = utility([candidates[k][i] for k, i, _ in pairs], [candidates[k][j] for k, _, j in pairs]) if pairs else []
    totals = [[0.0] * len(texts) for texts in candidates]
    for (item, i, j), value in zip(pairs, values):
        totals[item][i] += value
        totals[item][j] += value
    return [[total / max(len(row) - 1, 1) for total in row] for row in totals]


def mbr_choice(utilities: list[float], texts: list[str] | None = None) -> int:
    """Index of the highest mean utility; a tie goes to the earliest candidate. Given the texts, an empty one is
    never chosen while a non-empty one exists: two empty candidates agree perfectly with each other."""
    allowed = [i for i in range(len(utilities)) if texts is None or texts[i].strip()] or list(range(len(utilities)))
    return max(allowed, key=utilities.__getitem__)


def mean_utility(scorers: dict[str, Scorer]) -> Scorer:
    """One utility per pair: the mean of the given metrics."""
    def utility(hypotheses: list[str], references: list[str]) -> list[float]:
        per_metric = [scorer(hypotheses, references) for scorer in scorers.values()]
        return [sum(values) / len(values) for values in zip(*per_metric)]

    return utility


def select_candidates(candidates: list[list[str]], scorers: dict[str, Scorer]) -> tuple[list[int], list[list[float]]]:
    """(chosen index per item, each candidate's mean utility): minimum-Bayes-risk selection with the mean of
    `scorers` (from load_scorers) as the utility."""
    utilities = mbr_utilities(candidates, mean_utility(scorers))
    return [mbr_choice(row, texts) for row, texts in zip(utilities, candidates)], utilities


def read_candidate_files(paths: list[str], order: list[str] | None = None) -> tuple[list[dict], list[list[str]]]:
    """(records of the first file, per record the outputs of every file in the given order). The records follow
    `order` (the ids of --ref) when given; without it every file must list the ids in the first file's order, since
    the selection is written in that order and the leaderboard takes only the input's. Mismatches name the file."""
    files = [load_competition_file(path)[0] for path in paths]
    ids = order or [record["id"] for record in files[0]]
    candidates: list[list[str]] = [[] for _ in ids]
    for path, records in zip(paths, files):
        file_ids = [record["id"] for record in records]
        check_same_ids(path, file_ids, paths[0], ids)
        if order is None:
            check_same_order(path, file_ids, paths[0], ids)
        by_id = {record["id"]: record["output"] for record in records}
        for row, record_id in zip(candidates, ids):
            row.append(by_id[record_id])
    first_by_id = {record["id"]: record for record in files[0]}
    return [first_by_id[record_id] for record_id in ids], candidates


def check_same_order(path: str, ids: list[str], expected_path: str, expected_ids: list[str]) -> None:
    """Refuse a file that lists the same ids as another in a different order (or one twice)."""
    position = next((k for k, (a, b) in enumerate(zip(ids, expected_ids)) if a != b), None)
    if position is not None or len(ids) != len(expected_ids):
        position = len(expected_ids) if position is None else position
        found = ids[position] if position < len(ids) else "nothing"
        expected = expected_ids[position] if position < len(expected_ids) else "nothing"
        raise UserError(f"{path}: record {position} is id {found!r} where {expected_path} has {expected!r}: the files "
                        "list the records in different orders; pass --ref with the competition file to write its order")


def check_same_ids(path: str, ids: list[str], expected_path: str, expected_ids: list[str]) -> None:
    """Refuse a file whose ids differ from another's, counting both kinds of mismatch."""
    missing = [i for i in expected_ids if i not in set(ids)]
    extra = [i for i in ids if i not in set(expected_ids)]
    if missing or extra:
        raise UserError(f"{path}: ids do not match {expected_path}: {len(missing)} missing (first {missing[:1]}), "
                        f"{len(extra)} not in {expected_path} (first {extra[:1]})")


def pair_by_id(predictions: list[dict], references: list[dict], pred_path: str,
               ref_path: str) -> tuple[list[str], list[str], list[str]]:
    """(ids, predicted outputs, reference outputs) matched by id; every mismatch is reported."""
    ref_by_id = {r["id"]: r["output"] for r in references}
    pred_ids = [p["id"] for p in predictions]
    check_same_ids(pred_path, pred_ids, ref_path, list(ref_by_id))
    empty_refs = [i for i, out in ref_by_id.items() if not out.strip()]
    if empty_refs:
        raise UserError(f"{ref_path}: record id {empty_refs[0]!r}: field 'output' is empty; "
                        "references need summaries to score against")
    return pred_ids, [p["output"] for p in predictions], [ref_by_id[i] for i in pred_ids]


def write_scores(result: dict, path: Path, console) -> None:
    write_text_atomic(path, json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    console.print(f"per-item scores -> {path}")


# ---------------------------------------------------------------------------------------------
# Output guard: summaries unlike the training summaries (length) or caught in a repetition loop
# ---------------------------------------------------------------------------------------------

# The competition's 608 train+dev references run from 148 to 1011 characters (median 415, 80% in
# 270-644): the band when the training rows of the model cannot be found.
REFERENCE_SUMMARY_CHARS = (148, 1011)
BAND_PERCENTILES = (1, 99)  # the band leaves out the training set's own rare outliers
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_REPEATED_SENTENCE_CHARS = 10  # shorter sentences ("네.") may repeat for real
# A piece of up to 60 characters written three or more times back to back (longer pieces end in a
# sentence, which the repeated-sentence check catches); only a run of MIN_LOOP_CHARS counts, so
# reduplication such as "하나 하나" or "무슨 무슨" is left alone.
REPEATED_RUN = re.compile(r"(?=((\S.{0,59}?)\2{2,}))", re.S)
MIN_LOOP_CHARS = 30


def nearest_rank(sorted_values: list[int], percent: float) -> int:
    return sorted_values[round(percent / 100 * (len(sorted_values) - 1))]


def training_summary_lengths(prepared: Path) -> list[int]:
    """Character lengths of the competition summaries among prep.py's train rows (augmentation rows
    answer other questions, so their lengths say nothing about a summary's), as prose: a structured run's
    sections are measured flattened, as infer.py's guard sees its generations."""
    stats = read_json(prepared / "stats.json")
    settings = stats.get("settings", {}) if isinstance(stats, dict) else {}
    sources = set(settings.get("train", [])) | ({settings.get("dev")} if settings.get("train_on_dev") else set())
    markers = [f'"source": {json.dumps(source, ensure_ascii=False)}' for source in sources]
    structured = isinstance(stats, dict) and stats.get("target_format") == "structured"
    lengths = []
    with open(prepared / "train.jsonl", encoding="utf-8") as handle:
        for line in handle:
            if any(marker in line for marker in markers):  # skips parsing what may be 100k augmentation rows
                row = json.loads(line)
                if row.get("source") in sources:
                    text = row["completion"][-1]["content"].strip()
                    lengths.append(len(flatten_structured(text)[0] if structured else text))
    return lengths


def length_band(run_config: dict) -> tuple[int, int, str]:
    """(shortest, longest, where from) for a summary: the 1st-99th percentile of the competition summaries
    the model was trained on (prep.py's rows, found through run_config.json), else the competition's references.
    data_dir is absolute; an older run_config.json has only settings.data, as typed (relative to where train.py ran)."""
    data = run_config.get("data_dir") or run_config.get("settings", {}).get("data")
    prepared = Path(data) if data else None
    if prepared and (prepared / "train.jsonl").is_file() and (prepared / "stats.json").is_file():
        lengths = sorted(training_summary_lengths(prepared))
        if lengths:
            low, high = (nearest_rank(lengths, q) for q in BAND_PERCENTILES)
            return low, high, (f"p{BAND_PERCENTILES[0]}-p{BAND_PERCENTILES[1]} of the {len(lengths)} competition "
                               f"summaries in {prepared / 'train.jsonl'}")
    return (*REFERENCE_SUMMARY_CHARS,
            "the range of the competition's train+dev references (the model's training rows were not found)")


def repetition_loop(text: str) -> str | None:
    """What repeats when the text loops (a sentence said twice or more, or a short piece written over and
    over), else None."""
    sentences = [" ".join(sentence.split()) for sentence in SENTENCE_END.split(text.strip())]
    repeated = collections.Counter(s for s in sentences if len(s) >= MIN_REPEATED_SENTENCE_CHARS).most_common(1)
    if repeated and repeated[0][1] > 1:
        sentence, count = repeated[0]
        return f"sentence written {count}x: {sentence[:40]}"
    for match in REPEATED_RUN.finditer(text):
        run, piece = match.group(1), match.group(2)
        if len(run) >= MIN_LOOP_CHARS:
            return f"{piece[:40]!r} written {len(run) // len(piece)}x in a row"
    return None


def guard_flags(text: str, band: tuple[int, int]) -> list[str]:
    """Why a summary looks degenerate: its length outside the band, a repetition loop; [] when it looks fine."""
    low, high = band
    flags = []
    if len(text) < low:
        flags.append(f"short: {len(text)} chars < {low}")
    elif len(text) > high:
        flags.append(f"long: {len(text)} chars > {high}")
    loop = repetition_loop(text)
    if loop:
        flags.append(f"loop: {loop}")
    return flags


def guard_report(ids: list[str], texts: list[str], band: tuple[int, int, str]) -> dict:
    """The guard's verdict for scores.json: the band, where it came from, and the flags per item."""
    flags = {item_id: guard_flags(text, band[:2]) for item_id, text in zip(ids, texts)}
    return {"band_chars": list(band[:2]), "band_source": band[2], "flagged": [i for i in ids if flags[i]],
            "flags": flags}
