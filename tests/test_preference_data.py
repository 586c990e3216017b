"""infer.py --preference_out (preference.py): DPO/KTO pairs from a trained model's own candidates.

The pure parts on crafted inputs; then the tiny model that conftest's `memorized_run` trained, through infer.py's
real command line: its pairs are checked against the candidates scored again, one file at a time, by
`infer.py --score`, their prompts against the SFT rows prep.py wrote, and a rerun is shown to reuse the candidates
file without loading the model. On these machines the BLEURT and BERTScore models cannot load (no Hub), so the
scores are ROUGE-1's, and the run says so.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import preference
import score
from conftest import SAMPLE_DIR, assert_one_line_error, run_script
from infer import InferSettings
from common import UserError
from prep import competition_row
from targets import clean_records

PREF_KEYS = {"id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "margin", "metric", "base_model",
             "prompt_settings"}
PROSE = {"system_prompt": False, "clean_inputs": False, "target_format": "prose"}


def sample_records(name: str = "train") -> list[dict]:
    return json.loads((SAMPLE_DIR / f"{name}.json").read_text(encoding="utf-8"))


def rouge1(hypothesis: str, reference: str) -> float:
    return score.rouge1_scores([hypothesis], [reference])[0]


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------

def test_best_and_worst_break_ties_so_equal_scores_still_make_a_pair():
    assert preference.best_and_worst([0.5, 0.9, 0.9, 0.1, 0.1]) == (1, 4)
    assert preference.best_and_worst([0.3, 0.3]) == (0, 1)
    assert preference.best_and_worst([0.2]) == (0, 0)


def test_candidates_are_scored_in_one_pass_and_regrouped():
    calls = []

    def counted_rouge1(hypotheses: list[str], references: list[str]) -> list[float]:
        calls.append(len(hypotheses))
        return score.rouge1_scores(hypotheses, references)

    a, b, c = "철수는 주말에 등산을 갔다.", "영희는 책을 읽었다.", "두 사람은 여행 계획을 세웠다."
    ref1, ref2 = "철수는 주말에 친구와 등산을 갔다.", "두 사람은 제주도 여행 계획을 세웠다."
    scores, metric, not_computed = preference.score_candidates(
        [[a, b, a], [c, ""]], [ref1, ref2], {"rouge1": counted_rouge1}, {"bleurt": "model could not be loaded"})
    assert calls == [4], "one call for every distinct (candidate, reference) pair of every record"
    assert scores == [[rouge1(a, ref1), rouge1(b, ref1), rouge1(a, ref1)], [rouge1(c, ref2), 0.0]]
    assert scores[0][0] > scores[0][1]
    assert metric == ["rouge1"] and not_computed == {"bleurt": "model could not be loaded"}
    with pytest.raises(UserError, match="--preference_metric: none could be computed"):
        preference.score_candidates([[a]], [ref1], {}, {"bleurt": "model could not be loaded"})


def test_build_pair_follows_the_format_and_skip_reasons_say_why():
    record = sample_records()[0]
    row = preference.build_pair(record, ["좋은 요약", "나쁜 요약", "보통 요약"], [0.75, 0.25, 0.5], chosen="best",
                                reference_score=None, metric=["rouge1"], base_model="base", settings=PROSE)
    assert set(row) == PREF_KEYS
    assert row["chosen"] == [{"role": "assistant", "content": "좋은 요약"}]
    assert row["rejected"] == [{"role": "assistant", "content": "나쁜 요약"}]
    assert (row["chosen_score"], row["rejected_score"], row["margin"]) == (0.75, 0.25, 0.5)
    assert row["metric"] == "rouge1" and row["prompt"] == competition_row(record, "train", False).prompt
    assert preference.skip_reason(row, 0.0) is None and preference.skip_reason(row, 0.5) is None
    assert preference.skip_reason(row, 0.6) == "margin below --min_margin 0.6"

    reference = preference.build_pair(record, ["가", "나"], [0.3, 0.1], chosen="reference", reference_score=1.0,
                                      metric=["rouge1"], base_model="base", settings=PROSE)
    assert reference["chosen"][0]["content"] == record["output"] and reference["margin"] == pytest.approx(0.9)
    tie = preference.build_pair(record, ["가", "나"], [0.3, 0.3], chosen="best", reference_score=None,
                                metric=["rouge1"], base_model="base", settings=PROSE)
    assert preference.skip_reason(tie, 0.0) == "the rejected candidate scores as high as the chosen one"
    same = preference.build_pair(record, ["가", "가"], [0.3, 0.3], chosen="best", reference_score=None,
                                 metric=["rouge1"], base_model="base", settings=PROSE)
    assert preference.skip_reason(same, 0.0) == "chosen and rejected are the same text"
    assert preference.margin_stats([0.3, 0.1, 0.2]) == {"min": 0.1, "median": 0.2, "max": 0.3}


def test_the_prompt_is_the_sft_rows_with_the_trained_prompt_settings():
    record = next(r for r in sample_records() if clean_records([r])[0][0] != r)  # one that cleaning changes
    settings = {"system_prompt": True, "clean_inputs": True, "target_format": "prose"}
    # The SFT row prep.py --clean_inputs --system_prompt writes for the record:
    sft = competition_row(clean_records([record])[0][0], "train", True, "prose")
    assert preference.pair_prompt(record, settings) == sft.prompt
    assert preference.pair_prompt(record, PROSE) != sft.prompt


def test_settings_a_pair_cannot_come_from_are_refused():
    with pytest.raises(UserError, match="is a training run"):
        preference.check_preference_settings(InferSettings(model="outputs/run1", preference_out="p.jsonl",
                                                           num_samples=2), training_run=True)
    with pytest.raises(UserError, match="leave out --score / --select"):
        preference.check_preference_settings(InferSettings(score="a.json", preference_out="p.jsonl", num_samples=2),
                                             training_run=False)
    with pytest.raises(UserError, match="--target_format structured"):
        preference.check_preference_paths(InferSettings(preference_out="p.jsonl", num_samples=2), Path("o.json"),
                                          "references", "structured")
    with pytest.raises(UserError, match="is the candidates file"):
        preference.check_preference_paths(InferSettings(preference_out="o.json.candidates.jsonl", num_samples=2),
                                          Path("o.json"), "references", "prose")


@pytest.mark.parametrize("flags, fragments", [
    (["--preference_out", "p.jsonl"], ["--preference_out needs --num_samples"]),
    (["--preference_out", "p.jsonl", "--num_samples", "1", "--min_margin", "-0.1"], ["--min_margin -0.1", "0 or more"]),
    (["--preference_out", "in.json", "--num_samples", "1"], ["--preference_out in.json is the input file"]),
    (["--preference_out", "o.json", "--output", "o.json", "--num_samples", "1"], ["o.json is --output"]),
    (["--preference_out", "p.jsonl", "--num_samples", "1", "--input", str(SAMPLE_DIR / "test.json")],
     ["test.json", "needs its 'output'"]),
])
def test_bad_preference_settings_are_one_line(tmp_path, tiny_model_dir, flags, fragments):
    (tmp_path / "in.json").write_text(json.dumps(sample_records("dev"), ensure_ascii=False), encoding="utf-8")
    before = sorted(path.name for path in tmp_path.iterdir())
    result = run_script(["infer.py", "--model", tiny_model_dir, "--input", "in.json", *flags], cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert sorted(path.name for path in tmp_path.iterdir()) == before, "nothing written"


# ---------------------------------------------------------------------------------------------
# End to end on the memorized tiny model
# ---------------------------------------------------------------------------------------------

def independent_scores(tmp_path: Path, name: str, records: list[dict], outputs: list[str]) -> dict[str, float]:
    """ROUGE-1 per record of `outputs` against the records' references, by `infer.py --score` on a file of them."""
    (tmp_path / f"{name}.json").write_text(json.dumps([{**r, "output": o} for r, o in zip(records, outputs)],
                                                      ensure_ascii=False), encoding="utf-8")
    result = run_script(["infer.py", "--score", f"{name}.json", "--ref", "in.json", "--metrics", "rouge1",
                         "--scores_file", f"{name}.scores.json"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    items = json.loads((tmp_path / f"{name}.scores.json").read_text(encoding="utf-8"))["items"]
    return {item["id"]: item["rouge1"] for item in items}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_pairs_from_a_memorized_run_match_independent_scores_and_resume(tmp_path, memorized_run):
    records, final = memorized_run["records"], memorized_run["run"] / "final"
    (tmp_path / "in.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    args = ["infer.py", "--model", final, "--input", "in.json", "--output", "pred.json", "--no-load_in_4bit",
            "--max_new_tokens", "24", "--num_samples", "2", "--temperature", "2.0", "--top_p", "1.0",
            "--select_metric", "rouge1", "--preference_out", "pref.jsonl"]
    result = run_script(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    fallback = [line for line in result.stdout.splitlines() if line.startswith("preference scores:")]
    assert len(fallback) == 1 and "mean of rouge1 only" in fallback[0]
    assert "bertscore:" in fallback[0] and "bleurt:" in fallback[0]
    assert result.stdout.count("bleurt skipped") == 1, "the metrics' models load once, for scoring and the pairs"

    candidates = {row["id"]: row["candidates"] for row in read_jsonl(tmp_path / "pred.json.candidates.jsonl")[1:]}
    assert all(len(texts) == 3 for texts in candidates.values())
    per_candidate = [independent_scores(tmp_path, f"candidate{k}", records, [candidates[r["id"]][k] for r in records])
                     for k in range(3)]
    pairs = {row["id"]: row for row in read_jsonl(tmp_path / "pref.jsonl")}
    run_config = json.loads((final / "run_config.json").read_text(encoding="utf-8"))
    sft_prompts = {row["id"]: row["prompt"] for row in read_jsonl(memorized_run["prepared"] / "train.jsonl")}
    expected_ids = []
    for record in records:
        texts, values = candidates[record["id"]], [scores[record["id"]] for scores in per_candidate]
        best = values.index(max(values))
        worst = len(values) - 1 - values[::-1].index(min(values))
        if texts[best] != texts[worst] and values[best] > values[worst]:
            expected_ids.append(record["id"])
        if record["id"] not in pairs:
            continue
        row = pairs[record["id"]]
        assert set(row) == PREF_KEYS
        assert row["chosen"] == [{"role": "assistant", "content": texts[best]}]
        assert row["rejected"] == [{"role": "assistant", "content": texts[worst]}]
        assert row["chosen_score"] == pytest.approx(values[best])
        assert row["rejected_score"] == pytest.approx(values[worst])
        assert row["margin"] == pytest.approx(values[best] - values[worst])
        assert row["metric"] == "rouge1" and row["base_model"] == run_config["base_model"]
        assert row["prompt_settings"] == PROSE
        assert row["prompt"] == sft_prompts[record["id"]], "the pair's prompt is the SFT row's"
    assert list(pairs) == expected_ids and expected_ids, "pairs for exactly the records whose best and worst differ"
    assert f"pairs kept: {len(pairs)} of {len(records)} records" in result.stdout and "margins: min" in result.stdout

    # A rerun (say, after a kill while scoring) with the reference as chosen and a margin that cuts some pairs:
    # the candidates file is reused as it stands, and no model is loaded.
    candidates_text = (tmp_path / "pred.json.candidates.jsonl").read_text(encoding="utf-8")
    (tmp_path / "pref.jsonl").unlink()
    (tmp_path / "pred.json").unlink()
    reference_scores = independent_scores(tmp_path, "reference", records, [r["output"] for r in records])
    margins = {r["id"]: reference_scores[r["id"]] - min(s[r["id"]] for s in per_candidate) for r in records}
    threshold = sorted(margins.values())[-1]
    result = run_script([*args, "--chosen", "reference", "--min_margin", str(threshold)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loading model" not in result.stdout and "sampling" not in result.stdout
    assert (tmp_path / "pred.json.candidates.jsonl").read_text(encoding="utf-8") == candidates_text
    pairs = read_jsonl(tmp_path / "pref.jsonl")
    kept = [r["id"] for r in records if margins[r["id"]] >= threshold]
    assert [row["id"] for row in pairs] == kept
    for row in pairs:
        assert row["chosen"][0]["content"] == next(r["output"] for r in records if r["id"] == row["id"])
        assert row["chosen_score"] == pytest.approx(reference_scores[row["id"]])
        assert row["margin"] == pytest.approx(margins[row["id"]])
    if len(kept) < len(records):
        assert f"skipped {len(records) - len(kept)} records: margin below --min_margin {threshold}" in result.stdout
