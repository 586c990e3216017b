"""score.py: ROUGE-1 exactly as the official scorer computes it, checked against hand-counted morphemes;
BERTScore and BLEURT on tiny local models built here, checked against computations written in the tests;
minimum-Bayes-risk selection, checked by brute force."""
from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

import score  # import-light by design: no torch, no model
from conftest import REPO_ROOT, assert_one_line_error, run_script, sample_texts

def f1(overlap: int, n_hyp: int, n_ref: int) -> float:
    p, r = Fraction(overlap, n_hyp), Fraction(overlap, n_ref)
    return float(2 * p * r / (p + r))


@pytest.fixture(scope="module")
def morphs():
    return score.mecab_morphs()


@pytest.mark.parametrize("hyp, ref, hyp_tokens, ref_tokens, expected", [
    # particles: 는/에 match, the verb endings do not. 3 of 6 vs 3 of 5.
    ("나는 학교에 갔다.", "저는 학교에 갑니다!",
     ["나", "는", "학교", "에", "갔", "다"], ["저", "는", "학교", "에", "갑니다"], f1(3, 6, 5)),
    # numbers are their own morpheme; "3" never matches "세"; punctuation (…) disappears. 4 of 8 each.
    ("두 화자는 3시에 만났다.", "화자들은 세 시에 만났습니다…",
     ["두", "화자", "는", "3", "시", "에", "만났", "다"], ["화자", "들", "은", "세", "시", "에", "만났", "습니다"], 0.5),
    # speaker ids: lowercased and split into letters + digits, so the id matches across 은/는. 5 of 11 vs 5 of 9.
    ("SD2000691은 영화를 좋아한다고 말했습니다.", "sd2000691는 영화가 좋다고 했다",
     ["sd", "2000691", "은", "영화", "를", "좋", "아", "한다고", "말", "했", "습니다"],
     ["sd", "2000691", "는", "영화", "가", "좋", "다고", "했", "다"], 0.5),
    # clipped counts: three 학교 in the hypothesis match the reference's one. 1 of 3 vs 1 of 4.
    ("학교 학교 학교", "학교에 갔다", ["학교", "학교", "학교"], ["학교", "에", "갔", "다"], f1(1, 3, 4)),
    # an empty (or punctuation-only) hypothesis scores 0
    ("", "학교에 갔다", [], ["학교", "에", "갔", "다"], 0.0),
    ("~~~!!", "학교에 갔다", [], ["학교", "에", "갔", "다"], 0.0),
])
def test_rouge1_matches_hand_computation(morphs, hyp, ref, hyp_tokens, ref_tokens, expected):
    assert score.rouge_tokens(hyp, morphs) == hyp_tokens
    assert score.rouge_tokens(ref, morphs) == ref_tokens
    assert score.rouge1_f1(hyp_tokens, ref_tokens) == pytest.approx(expected)


def test_rouge1_is_the_per_sample_mean_and_keeps_1000_words(morphs):
    scores = score.rouge1_scores(["나는 학교에 갔다.", "학교 학교 학교"], ["저는 학교에 갑니다!", "학교에 갔다"])
    assert scores == pytest.approx([6 / 11, 2 / 7])
    assert len(score.rouge_tokens("가 " * 1500, morphs)) == 1000


# ---------------------------------------------------------------------------------------------
# BERTScore and BLEURT on tiny local models, checked against computations written here in torch
# ---------------------------------------------------------------------------------------------

TINY_BERT_POSITIONS = 128  # short enough that a looping summary must be truncated
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A random 3-layer BERT with a WordPiece vocabulary trained on the sample texts, saved like the Hub's
    bert-base-multilingual-cased (vocab.txt, do_lower_case false) but without model_max_length."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    wordpiece = BertWordPieceTokenizer(lowercase=False, strip_accents=False)
    wordpiece.train_from_iterator(sample_texts(), vocab_size=800, special_tokens=BERT_SPECIALS, show_progress=False)
    (out / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in sorted(wordpiece.get_vocab().items(), key=lambda kv: kv[1])), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}), encoding="utf-8")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=TINY_BERT_POSITIONS)).save_pretrained(out)
    return out


def bertscore_by_hand(bert_dir: Path, layer: int, hypothesis: str, reference: str) -> float:
    """BERTScore F1 from its definition: layer-`layer` embeddings, cosine similarity, each token of one side
    matched greedily to the other side (its [CLS]/[SEP] included), averaged over real tokens (idf off)."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertModel

    if not hypothesis.strip():
        return 0.0
    tokenizer = BertWordPieceTokenizer(str(bert_dir / "vocab.txt"), lowercase=False, strip_accents=False)
    tokenizer.enable_truncation(TINY_BERT_POSITIONS)
    model = BertModel.from_pretrained(bert_dir).eval()

    def embed(text: str) -> torch.Tensor:
        ids = torch.tensor([tokenizer.encode(text).ids])
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states[layer][0]
        return states / states.norm(dim=-1, keepdim=True)

    hyp, ref = embed(hypothesis), embed(reference)
    similarity = hyp @ ref.T
    precision = similarity.max(dim=1).values[1:-1].mean()
    recall = similarity.max(dim=0).values[1:-1].mean()
    return float(2 * precision * recall / (precision + recall))


BLEURT_SPECIALS = ["[CLS]", "[SEP]", "[MASK]"]
BLEURT_CONFIG = {"model_type": "bleurt", "architectures": ["BleurtForSequenceClassification"], "embedding_size": 16,
                 "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "hidden_act": "gelu", "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}


def port_weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of bleurt-pytorch's BleurtForSequenceClassification (as its module tree names them)."""
    e, h, i = config["embedding_size"], config["hidden_size"], config["intermediate_size"]
    shapes = {"bleurt.embeddings.word_embeddings.weight": (config["vocab_size"], e),
              "bleurt.embeddings.position_embeddings.weight": (config["max_position_embeddings"], e),
              "bleurt.embeddings.token_type_embeddings.weight": (config["type_vocab_size"], e),
              "bleurt.embeddings.LayerNorm.weight": (e,), "bleurt.embeddings.LayerNorm.bias": (e,),
              "bleurt.encoder.embedding_projection.weight": (h, e), "bleurt.encoder.embedding_projection.bias": (h,),
              "bleurt.pooler.dense.weight": (h, h), "bleurt.pooler.dense.bias": (h,),
              "classifier.weight": (1, h), "classifier.bias": (1,)}
    for n in range(config["num_hidden_layers"]):
        layer = f"bleurt.encoder.layer.{n}"
        for name, (rows, cols) in {"attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
                                   "attention.output.dense": (h, h), "intermediate.dense": (i, h), "output.dense": (h, i)}.items():
            shapes[f"{layer}.{name}.weight"], shapes[f"{layer}.{name}.bias"] = (rows, cols), (rows,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{layer}.{norm}.weight"], shapes[f"{layer}.{norm}.bias"] = (h,), (h,)
    return shapes


@pytest.fixture(scope="module")
def tiny_bleurt_dir(tmp_path_factory) -> Path:
    """A random 2-layer BLEURT-20-style model in the bleurt-pytorch port's format: config.json (model_type
    bleurt, embeddings smaller than the hidden size), spm.model, pytorch_model.bin with the port's names
    and its position_ids buffer."""
    import io

    import sentencepiece
    import torch

    out = tmp_path_factory.mktemp("tiny_bleurt")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sample_texts()), model_writer=model, vocab_size=1200,
                                             hard_vocab_limit=False, character_coverage=1.0, user_defined_symbols=BLEURT_SPECIALS,
                                             pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, minloglevel=2)
    (out / "spm.model").write_bytes(model.getvalue())
    config = {**BLEURT_CONFIG, "vocab_size": sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()}
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    generator = torch.Generator().manual_seed(0)
    weights = {name: 0.3 * torch.randn(shape, generator=generator) for name, shape in port_weight_shapes(config).items()}
    weights["bleurt.embeddings.position_ids"] = torch.arange(config["max_position_embeddings"]).expand((1, -1))
    torch.save(weights, out / "pytorch_model.bin")
    return out


def bleurt_by_hand(bleurt_dir: Path, reference: str, candidate: str) -> float:
    """BLEURT from the TF original's recipe, in plain torch: SentencePiece pieces, the longer side trimmed
    until [CLS] ref [SEP] cand [SEP] fits, BERT layers (tanh GELU) behind the embedding projection, the
    pooled [CLS] through the regression head."""
    import math

    import sentencepiece
    import torch

    config = json.loads((bleurt_dir / "config.json").read_text(encoding="utf-8"))
    w = torch.load(bleurt_dir / "pytorch_model.bin", weights_only=True)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(bleurt_dir / "spm.model"))
    ref = [pieces.piece_to_id(p) for p in pieces.encode_as_pieces(reference)]
    cand = [pieces.piece_to_id(p) for p in pieces.encode_as_pieces(candidate)]
    while len(ref) + len(cand) > config["max_position_embeddings"] - 3:
        (ref if len(ref) > len(cand) else cand).pop()
    cls, sep = pieces.piece_to_id("[CLS]"), pieces.piece_to_id("[SEP]")
    ids = torch.tensor([cls, *ref, sep, *cand, sep])
    segments = torch.tensor([0] * (len(ref) + 2) + [1] * (len(cand) + 1))

    def linear(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], config["layer_norm_eps"])

    x = w["bleurt.embeddings.word_embeddings.weight"][ids] + w["bleurt.embeddings.position_embeddings.weight"][:len(ids)] \
        + w["bleurt.embeddings.token_type_embeddings.weight"][segments]
    x = linear(norm(x, "bleurt.embeddings.LayerNorm"), "bleurt.encoder.embedding_projection")
    heads, size = config["num_attention_heads"], config["hidden_size"] // config["num_attention_heads"]
    for n in range(config["num_hidden_layers"]):
        layer = f"bleurt.encoder.layer.{n}"
        q, k, v = (linear(x, f"{layer}.attention.self.{p}").view(len(ids), heads, size).transpose(0, 1) for p in ("query", "key", "value"))
        context = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(size), dim=-1) @ v
        x = norm(linear(context.transpose(0, 1).reshape(len(ids), -1), f"{layer}.attention.output.dense") + x, f"{layer}.attention.output.LayerNorm")
        inner = linear(x, f"{layer}.intermediate.dense")
        inner = 0.5 * inner * (1 + torch.tanh(math.sqrt(2 / math.pi) * (inner + 0.044715 * inner ** 3)))
        x = norm(linear(inner, f"{layer}.output.dense") + x, f"{layer}.output.LayerNorm")
    return float(linear(torch.tanh(linear(x[0], "bleurt.pooler.dense")), "classifier")[0])


def test_full_score_through_the_command_line(tmp_path, tiny_bert_dir, tiny_bleurt_dir):
    """`infer.py --score` with all three metrics on tiny local models: per-item BERTScore and BLEURT equal the
    hand computations, an empty prediction scores 0 in BERTScore without dropping it, an over-long one is
    truncated (not a crash), and the leaderboard mean is labelled as such."""
    refs = json.loads((REPO_ROOT / "data/sample/dev.json").read_text(encoding="utf-8"))
    outputs = ["", refs[1]["output"], " ".join([refs[2]["output"]] * 4)]
    (tmp_path / "pred.json").write_text(json.dumps([{**r, "output": o} for r, o in zip(refs, outputs)], ensure_ascii=False), encoding="utf-8")
    result = run_script(["infer.py", "--score", "pred.json", "--ref", REPO_ROOT / "data/sample/dev.json", "--bertscore_model", tiny_bert_dir,
                         "--bertscore_layers", "2", "--bleurt_model", tiny_bleurt_dir], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    scores = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert scores["skipped"] == {} and scores["computed"] == ["bertscore", "bleurt", "rouge1"]
    items = scores["items"]
    assert items[0]["bertscore"] == 0.0 and items[0]["rouge1"] == 0.0
    for item, output, ref in zip(items, outputs, refs):
        assert item["bertscore"] == pytest.approx(bertscore_by_hand(tiny_bert_dir, 2, output, ref["output"]), abs=1e-5)
        assert item["bleurt"] == pytest.approx(bleurt_by_hand(tiny_bleurt_dir, ref["output"], output), abs=1e-4)
    for name in ("rouge1", "bertscore", "bleurt"):
        assert scores["means"][name] == pytest.approx(sum(item[name] for item in items) / 3)
    assert scores["final"] == pytest.approx(sum(scores["means"].values()) / 3)
    assert [item["final"] for item in items] == pytest.approx([(i["rouge1"] + i["bertscore"] + i["bleurt"]) / 3 for i in items])
    assert scores["label"] == "final (R1 + BERTScore + BLEURT) / 3" and scores["label"] in result.stdout


def test_unloadable_model_skips_only_that_metric_with_the_reason(tmp_path):
    refs = REPO_ROOT / "data/sample/dev.json"
    result = run_script(["infer.py", "--score", refs, "--ref", refs, "--scores_file", "s.json", "--metrics", "rouge1", "bleurt",
                         "--bleurt_model", tmp_path / "no_such_model"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    scores = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert scores["means"] == {"rouge1": 1.0} and scores["final"] is None
    assert "no_such_model: model folder not found" in scores["skipped"]["bleurt"]
    assert "bleurt skipped: model" in result.stdout and "mean of rouge1 only" in result.stdout


# ---------------------------------------------------------------------------------------------
# Minimum Bayes risk selection
# ---------------------------------------------------------------------------------------------

def word_f1(a: str, b: str) -> float:
    """Clipped word-overlap F1: a utility simple enough to check MBR by hand."""
    overlap = sum((Counter(a.split()) & Counter(b.split())).values())
    return 2 * overlap / (len(a.split()) + len(b.split()))


def brute_force_mbr(candidates: list[str], utility) -> int:
    """Every ordered pair scored, means compared with the earliest candidate winning ties."""
    means = [sum(utility(c, o) for j, o in enumerate(candidates) if j != i) / (len(candidates) - 1) for i, c in enumerate(candidates)]
    return means.index(max(means))


def test_mbr_picks_the_consensus_candidate_and_ties_go_to_the_earlier_one():
    items = [
        ["a b c d", "a b c e", "x y z w", "a b f d"],  # the three a-b candidates agree; "a b c d" most
        ["p q r", "p q r"],                              # identical: a tie, the first wins
        ["m n", "o p"],                                  # no agreement at all: a tie at 0, the first wins
        ["s t u v", "k l", "s t u w", "s t x v", "k l m"],
    ]
    calls = []

    def utility(hyps: list[str], refs: list[str]) -> list[float]:
        calls.append(len(hyps))
        return [word_f1(h, r) for h, r in zip(hyps, refs)]

    utilities = score.mbr_utilities(items, utility)
    chosen = [score.mbr_choice(row) for row in utilities]
    assert chosen == [brute_force_mbr(c, word_f1) for c in items] == [0, 0, 0, 0]
    assert utilities[0] == pytest.approx([(0.75 + 0 + 0.75) / 3, (0.75 + 0 + 0.5) / 3, 0, (0.75 + 0.5 + 0) / 3])
    assert calls == [6 + 1 + 1 + 10]  # each unordered pair once, all items in one call
    assert score.mbr_choice([0.2, 0.5, 0.5]) == 1


def test_select_through_the_command_line(tmp_path):
    """Three prediction files: per record the candidate agreeing most (ROUGE-1) wins, as computed here over
    every ordered pair; the output is a valid submission; --ref prints every file's score and the selection's."""
    refs = json.loads((REPO_ROOT / "data/sample/dev.json").read_text(encoding="utf-8"))
    variants = {
        "a.json": [r["output"] for r in refs],
        "b.json": [" ".join(r["output"].split()[: len(r["output"].split()) // 2]) for r in refs],
        "c.json": ["두 화자는 날씨에 대해 이야기했습니다.", refs[1]["output"] + " 그리고 여행도 좋아한다고 말했습니다.", "엉뚱한 요약입니다."],
    }
    for name, outputs in variants.items():
        (tmp_path / name).write_text(json.dumps([{**r, "output": o} for r, o in zip(refs, outputs)], ensure_ascii=False), encoding="utf-8")
    result = run_script(["infer.py", "--select", "a.json", "b.json", "c.json", "--output", "best.json", "--select_metric", "rouge1",
                         "--ref", REPO_ROOT / "data/sample/dev.json", "--metrics", "rouge1"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    morphs = score.mecab_morphs()

    def rouge1(a: str, b: str) -> float:
        return score.rouge1_f1(score.rouge_tokens(a, morphs), score.rouge_tokens(b, morphs))

    expected = [brute_force_mbr([variants[f][k] for f in variants], rouge1) for k in range(len(refs))]
    best = json.loads((tmp_path / "best.json").read_text(encoding="utf-8"))
    assert [r["output"] for r in best] == [list(variants.values())[f][k] for k, f in enumerate(expected)]
    assert [{k: v for k, v in r.items() if k != "output"} for r in best] == [{k: v for k, v in r.items() if k != "output"} for r in refs]
    for f, name in enumerate(variants):
        wins = expected.count(f)
        assert re.search(rf"{re.escape(name)}\s.*\s{wins} \({100 * wins / 3:.0f}%\)", result.stdout), result.stdout
    selection_score = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))["means"]["rouge1"]
    assert re.search(rf"selection\s.*\s{100 * selection_score:.2f}", result.stdout), result.stdout


def test_select_refuses_mismatched_files_and_writes_nothing(tmp_path):
    refs = json.loads((REPO_ROOT / "data/sample/dev.json").read_text(encoding="utf-8"))
    (tmp_path / "a.json").write_text(json.dumps(refs, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(refs[:2], ensure_ascii=False), encoding="utf-8")
    result = run_script(["infer.py", "--select", "a.json", "b.json", "--output", "best.json", "--select_metric", "rouge1"], cwd=tmp_path)
    assert_one_line_error(result, "b.json", "1 missing", refs[2]["id"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def write_predictions(path: Path, records: list[dict], outputs: list[str]) -> None:
    rows = [{**record, "output": output} for record, output in zip(records, outputs)]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")


def test_select_never_picks_an_empty_summary_and_names_the_file_with_one(tmp_path):
    """An empty candidate ties with (or, two empties, agrees perfectly with) the others: it must still lose to any
    non-empty one; a record empty in every file is refused naming an input file, and nothing is written."""
    refs = json.loads((REPO_ROOT / "data/sample/dev.json").read_text(encoding="utf-8"))
    texts = [r["output"] for r in refs]
    write_predictions(tmp_path / "a.json", refs, ["", "", texts[2]])
    write_predictions(tmp_path / "b.json", refs, [texts[0], "", texts[2]])
    write_predictions(tmp_path / "c.json", refs, ["엉뚱한 요약입니다.", texts[1], texts[2]])
    select = ["infer.py", "--select", "a.json", "b.json", "c.json", "--output", "best.json",
              "--select_metric", "rouge1"]
    result = run_script(select, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["output"] for r in json.loads((tmp_path / "best.json").read_text(encoding="utf-8"))] == texts
    assert "a.json: 2 empty outputs" in result.stdout and "b.json: 1 empty outputs" in result.stdout

    write_predictions(tmp_path / "c.json", refs, ["엉뚱한 요약입니다.", "", texts[2]])
    result = run_script([*select[:-4], "--output", "again.json", *select[-2:]], cwd=tmp_path, timeout=300)
    assert_one_line_error(result, "a.json: record id", refs[1]["id"], "empty, as in every --select file")
    assert not (tmp_path / "again.json").exists()


def test_select_checks_the_record_order_and_follows_ref(tmp_path):
    """A file with two records swapped: without --ref the selection refuses (one line, the file and the place);
    with --ref it is written in the reference's order, whichever file is swapped."""
    refs = json.loads((REPO_ROOT / "data/sample/dev.json").read_text(encoding="utf-8"))
    texts = [r["output"] for r in refs]
    swapped = [refs[1], refs[0], *refs[2:]]
    write_predictions(tmp_path / "a.json", swapped, [r["output"] for r in swapped])
    write_predictions(tmp_path / "b.json", refs, texts)
    result = run_script(["infer.py", "--select", "b.json", "a.json", "--output", "best.json",
                         "--select_metric", "rouge1"], cwd=tmp_path, timeout=300)
    assert_one_line_error(result, "a.json: record 0 is id", refs[1]["id"], "b.json has", refs[0]["id"], "--ref")
    assert not (tmp_path / "best.json").exists()
    result = run_script(["infer.py", "--select", "a.json", "b.json", "--output", "best.json",
                         "--select_metric", "rouge1", "--ref", REPO_ROOT / "data/sample/dev.json",
                         "--metrics", "rouge1"],
                        cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    best = json.loads((tmp_path / "best.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in best] == [r["id"] for r in refs] and [r["output"] for r in best] == texts


# ---------------------------------------------------------------------------------------------
# Output guard: the length band and repetition loops
# ---------------------------------------------------------------------------------------------

LOOPING = "이 대화에서 화자들은 여행에 대해 말했습니다. " + "SD2000001은 제주도에 가고 싶다고 말했습니다. " * 3
REDUPLICATION = "SD2000001은 무슨 무슨 일이 있었는지 하나 하나 따로 따로 정리했다고 말했습니다. 네 네 하고 대답했습니다."


@pytest.mark.parametrize("text, found", [
    (LOOPING, "sentence written 3x: SD2000001은 제주도에 가고 싶다고 말했습니다."),
    ("두 화자는 취미에 대해 말했습니다. " + "그리고 " * 12, "'그리고 ' written 12x in a row"),
    ("두 화자는 취미에 대해 말했습니다. " + "그리고 " * 6, None),  # 24 characters: below MIN_LOOP_CHARS
    ("ㅋ" * 40, "'ㅋ' written 40x in a row"),
    (REDUPLICATION, None),
    ("네. 네. 네. 좋아요.", None),  # short sentences may repeat for real
])
def test_repetition_loop(text, found):
    assert score.repetition_loop(text) == found


def test_reference_summaries_raise_no_loop_flag():
    for name in ("train", "dev"):
        for record in json.loads((REPO_ROOT / "data/sample" / f"{name}.json").read_text(encoding="utf-8")):
            assert score.repetition_loop(record["output"]) is None, record["id"]


def test_guard_flags():
    band = (40, 120)
    assert score.guard_flags("두 화자는 이 대화에서 여행에 대해 말했습니다. SD2000001은 제주도가 좋다고 말했습니다.", band) == []
    assert score.guard_flags("여행 이야기.", band) == ["short: 7 chars < 40"]
    assert score.guard_flags("", band) == ["short: 0 chars < 40"]
    assert score.guard_flags("가나다라마바사 " * 20, band)[0] == "long: 160 chars > 120"
    assert score.guard_flags(LOOPING[:110], band) == [f"loop: {score.repetition_loop(LOOPING[:110])}"]


def test_length_band_comes_from_the_competition_summaries_the_model_trained_on(tmp_path):
    """prep.py's real output with augmentation rows: the band spans the 8 sample train summaries
    (144-175 chars), not the alpaca rows' short answers; without training rows it is the competition's range."""
    result = run_script(["prep.py", "--train", REPO_ROOT / "data/sample/train.json", "--dev", REPO_ROOT / "data/sample/dev.json",
                         "--test", REPO_ROOT / "data/sample/test.json",
                         "--extra", REPO_ROOT / "data/sample/extra_alpaca.json",
                         "--out", tmp_path / "prepared"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    low, high, source = score.length_band({"settings": {"data": str(tmp_path / "prepared")}})
    lengths = sorted(len(r["output"]) for r in json.loads((REPO_ROOT / "data/sample/train.json").read_text(encoding="utf-8")))
    assert (low, high) == (lengths[0], lengths[-1]) == (144, 175)
    assert "of the 8 competition summaries" in source
    assert score.length_band({})[:2] == score.length_band({"settings": {"data": str(tmp_path / "nowhere")}})[:2] == (148, 1011)
