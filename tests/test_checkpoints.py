"""Choosing and combining checkpoints through the real command lines: every checkpoint carries run_config.json,
`infer.py --model RUN_DIR` scores each checkpoint into a table, `train.py merge` combines adapters, and
`--save_merged` folders load in 16 bit with the run's settings.

The model runs reuse conftest's `memorized_run` (60 steps, one checkpoint per step, all kept): checkpoint-20 is
an early, barely trained state of the same run; checkpoint-60 and final/ have memorized the 4 summaries.
Generation loads the base in 16 bit and stops after 48 new tokens, for speed.
"""
from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

import pytest

import generate
import infer
from conftest import MEMORIZE_FLAGS, assert_one_line_error, run_script
from score import rouge1_scores, score_with
from test_score import tiny_bert_dir  # noqa: F401  (a fixture: a 3-layer BERT for BERTScore)

TABLE_FLAGS = ["--no-load_in_4bit", "--max_new_tokens", "48", "--batch_size", "4", "--metrics", "rouge1"]
EARLY, LAST = "checkpoint-20", "checkpoint-60"


def read(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def last_line(result) -> str:
    """A user error after the libraries' own load-time warnings."""
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def memorized_input(memorized_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("input") / "memorized.json"
    path.write_text(json.dumps(memorized_run["records"], ensure_ascii=False, indent=2), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def table_run(memorized_run, memorized_input, tmp_path_factory) -> dict:
    """The memorized run's output_dir with an early checkpoint, the last one and final/, scored by infer.py."""
    root = tmp_path_factory.mktemp("table")
    run, cwd = root / "run", root / "work"
    cwd.mkdir()
    for name in (EARLY, LAST, "final"):
        shutil.copytree(memorized_run["run"] / name, run / name)
    started = time.perf_counter()
    result = run_script(["infer.py", "--model", run, "--input", memorized_input, *TABLE_FLAGS], cwd=cwd)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    print(f"first table run: {time.perf_counter() - started:.1f} s")
    return {"run": run, "cwd": cwd, "result": result, "table": read(cwd / "memorized_pred.checkpoints.json")}


# ---------------------------------------------------------------------------------------------
# Every checkpoint carries the run's settings (issue 8 item 8)
# ---------------------------------------------------------------------------------------------

def test_every_checkpoint_carries_the_runs_settings(memorized_run):
    final = read(memorized_run["run"] / "final" / "run_config.json")
    early = read(memorized_run["run"] / EARLY / "run_config.json")
    for key in ("base_model", "max_seq_length", "load_in_4bit", "system_prompt", "clean_inputs", "settings"):
        assert early[key] == final[key], key
    assert (early["global_step"], early["epoch"]) == (20, 20.0) and (final["global_step"], final["epoch"]) == (60, 60.0)
    assert early["train_loss"] > final["train_loss"]


def test_infer_on_a_checkpoint_uses_the_runs_max_seq_length(memorized_run, memorized_input, tmp_path):
    """The run trained at max_seq_length 1024; without its run_config infer.py would assume 8192 and generate."""
    result = run_script(["infer.py", "--model", memorized_run["run"] / EARLY, "--input", memorized_input,
                         "--no-load_in_4bit", "--max_new_tokens", "1000"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert last_line(result) == "error: --max_new_tokens 1000 leaves no room for the prompt in max_seq_length 1024"


def test_a_checkpoint_without_run_config_borrows_its_runs(tmp_path):
    run = tmp_path / "run"
    for name, config in [("final", {"system_prompt": True, "clean_inputs": True, "max_seq_length": 2048, "global_step": 9}),
                         ("checkpoint-3", None), ("checkpoint-6", {"system_prompt": True, "global_step": 6})]:
        (run / name).mkdir(parents=True)
        (run / name / "adapter_config.json").write_text("{}", encoding="utf-8")
        if config:
            (run / name / "run_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert generate.find_run_config(run / "checkpoint-6") == {"system_prompt": True, "global_step": 6}
    assert generate.find_run_config(run / "checkpoint-3") == {"system_prompt": True, "clean_inputs": True, "max_seq_length": 2048}
    assert generate.run_config_source(run / "checkpoint-3") == run / "final"  # what infer.py and train.py merge name
    (run / "final" / "run_config.json").unlink()
    assert generate.find_run_config(run / "checkpoint-3") == {"system_prompt": True}
    assert generate.run_config_source(run / "checkpoint-3") == run / "checkpoint-6"
    assert generate.find_run_config(tmp_path / "other") == {} and generate.run_config_source(tmp_path / "other") is None


# ---------------------------------------------------------------------------------------------
# The checkpoint table (issue 9 item 2)
# ---------------------------------------------------------------------------------------------

def test_table_ranks_the_memorized_checkpoint_above_the_early_one(table_run, memorized_run):
    table, cwd = table_run["table"], table_run["cwd"]
    rows = {row["checkpoint"]: row for row in table["rows"]}
    assert list(rows) == [EARLY, LAST, "final"]
    assert table["best"] == LAST
    assert rows[LAST]["score"] > rows[EARLY]["score"] + 0.5
    assert (rows[EARLY]["step"], rows[LAST]["step"], rows["final"]["step"]) == (20, 60, 60)
    assert rows[EARLY]["train_loss"] > rows[LAST]["train_loss"] and rows[LAST]["eval_loss"] is not None
    assert rows["final"]["same_weights_as"] == LAST and rows["final"]["score"] == rows[LAST]["score"]
    references = [record["output"] for record in memorized_run["records"]]
    for name in (EARLY, LAST):  # each checkpoint's own predictions file, scored independently here
        predictions = [record["output"] for record in read(cwd / f"memorized_pred.{name}.json")]
        assert rows[name]["rouge1"] == pytest.approx(sum(rouge1_scores(predictions, references)) / len(references))
    out = table_run["result"].stdout
    assert "checkpoints (scores x100)" in out and "final (= checkpoint-60)" in out
    assert f"best by mean of rouge1: {LAST}" in out
    # The next step keeps the generation flags the table was scored with (issue 17 item 4).
    next_line = next(line for line in out.splitlines() if "next: " in line).split("next: ", 1)[1]
    assert shlex.split(next_line) == ["python", "infer.py", "--model", str(table_run["run"] / LAST),
                                      "--input", "data/일상대화요약_test.json", "--max_new_tokens", "48", "--no-load_in_4bit"]


def test_best_checkpoint_is_the_highest_score_and_a_tie_goes_to_the_earlier():
    rows = [{"checkpoint": "checkpoint-1", "score": 0.5}, {"checkpoint": "checkpoint-2", "score": 0.7},
            {"checkpoint": "checkpoint-3", "score": 0.7}, {"checkpoint": "checkpoint-4", "score": None, "error": "empty"}]
    assert infer.best_row(rows)["checkpoint"] == "checkpoint-2"
    assert infer.best_row(rows[3:]) is None


def test_training_facts_come_from_trainer_state(tmp_path):
    history = [{"loss": 3.0, "step": 1}, {"eval_loss": 2.9, "step": 1}, {"loss": 2.0, "step": 2}, {"eval_loss": 2.5, "step": 2}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 2, "epoch": 1.5, "log_history": history}), encoding="utf-8")
    assert infer.training_facts(tmp_path) == {"step": 2, "epoch": 1.5, "train_loss": 2.0, "eval_loss": 2.5}


def test_table_rerun_keeps_finished_checkpoints(table_run, memorized_input):
    cwd = table_run["cwd"]
    before = {path.name: path.read_bytes() for path in cwd.glob("memorized_pred.checkpoint-*")}
    result = run_script(["infer.py", "--model", table_run["run"], "--input", memorized_input, *TABLE_FLAGS], cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{EARLY}: finished by an earlier run" in result.stdout and f"{LAST}: finished by an earlier run" in result.stdout
    assert "loading model" not in result.stdout
    assert {path.name: path.read_bytes() for path in cwd.glob("memorized_pred.checkpoint-*")} == before
    assert read(cwd / "memorized_pred.checkpoints.json")["best"] == LAST


def copy_table_work(table_run, tmp_path: Path) -> Path:
    """The first table's folder (predictions, scores, table), to rerun in without touching the module's."""
    work = tmp_path / "work"
    shutil.copytree(table_run["cwd"], work)
    return work


def predictions_bytes(cwd: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in cwd.glob("memorized_pred.checkpoint-*.json") if ".scores" not in path.name}


def test_table_rescores_without_generating_when_only_the_metrics_change(table_run, memorized_input, tiny_bert_dir,
                                                                         tmp_path):
    """Issue 17 items 1 and 3: a BERTScore model that cannot be loaded, then one that can: both reruns keep every
    predictions file; the second fills BERTScore in and keeps ROUGE-1's values."""
    cwd = copy_table_work(table_run, tmp_path)
    before, first = predictions_bytes(cwd), {row["checkpoint"]: row for row in table_run["table"]["rows"]}
    flags = [*TABLE_FLAGS[:-2], "--metrics", "rouge1", "bertscore", "--bertscore_layers", "2"]
    offline = run_script(["infer.py", "--model", table_run["run"], "--input", memorized_input, *flags,
                          "--bertscore_model", tmp_path / "no such model"], cwd=cwd)
    assert offline.returncode == 0, offline.stdout[-3000:] + offline.stderr[-3000:]
    assert "bertscore skipped" in offline.stdout and "loading model" not in offline.stdout
    assert f"{EARLY}: finished by an earlier run" in offline.stdout

    started = time.perf_counter()
    result = run_script(["infer.py", "--model", table_run["run"], "--input", memorized_input, *flags,
                         "--bertscore_model", tiny_bert_dir], cwd=cwd)
    print(f"rescore-only rerun: {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "loading model" not in result.stdout and f"{EARLY}: predictions kept from an earlier run" in result.stdout
    assert predictions_bytes(cwd) == before
    rows = {row["checkpoint"]: row for row in read(cwd / "memorized_pred.checkpoints.json")["rows"]}
    for name in (EARLY, LAST, "final"):
        assert rows[name]["rouge1"] == first[name]["rouge1"] and rows[name]["bertscore"] is not None
        assert rows[name]["score"] == pytest.approx((rows[name]["rouge1"] + rows[name]["bertscore"]) / 2)
    scores = read(cwd / f"memorized_pred.{LAST}.scores.json")
    assert scores["computed"] == ["bertscore", "rouge1"] and all("guard" in item for item in scores["items"])
    assert "best by mean of bertscore, rouge1" in result.stdout


def test_a_retry_of_the_table_applies_to_each_checkpoints_file(table_run, memorized_input, tmp_path):
    """Issue 17 item 1: the retry the table suggests regenerates only empty summaries in each file, and a plain
    rerun afterwards keeps every checkpoint (it used to regenerate them all)."""
    cwd = copy_table_work(table_run, tmp_path)
    before = predictions_bytes(cwd)
    args = ["infer.py", "--model", table_run["run"], "--input", memorized_input, *TABLE_FLAGS]
    retry = run_script([*args, "--retry_empty", "--repetition_penalty", "1.1"], cwd=cwd)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    assert "--retry_empty: regenerating 0 of 4 summaries" in retry.stdout and "loading model" not in retry.stdout
    plain = run_script(args, cwd=cwd)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    assert f"{EARLY}: finished by an earlier run" in plain.stdout and "loading model" not in plain.stdout
    assert predictions_bytes(cwd) == before


def test_table_checks_the_scorers_before_generating(table_run, memorized_input, tiny_bert_dir, tmp_path):
    """Issue 17 item 2: a BERTScore layer the model lacks ends the table before any checkpoint generates."""
    result = run_script(["infer.py", "--model", table_run["run"], "--input", memorized_input, *TABLE_FLAGS[:-2],
                         "--metrics", "rouge1", "bertscore", "--bertscore_model", tiny_bert_dir,
                         "--bertscore_layers", "9"], cwd=tmp_path)
    assert_one_line_error(result, "--bertscore_layers 9", "has layers 1..3")
    assert "loading model" not in result.stdout and list(tmp_path.iterdir()) == []


def test_a_metric_that_fails_while_scoring_costs_that_metric_only():
    def out_of_memory(hypotheses: list[str], references: list[str]) -> list[float]:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    result = score_with({"rouge1": rouge1_scores, "bertscore": out_of_memory}, {}, ["a"], ["오늘 날씨가 좋다"], ["오늘 날씨가 좋다"])
    assert result["means"] == {"rouge1": 1.0} and result["mean_of_computed"] == 1.0
    reason = "failed while scoring (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB)"
    assert result["skipped"] == {"bertscore": reason}
    kept = score_with({"rouge1": rouge1_scores}, {"bleurt": "offline"}, ["a"], ["x"], ["y"], known={"bleurt": [0.25]})
    assert kept["means"] == {"rouge1": 0.0, "bleurt": 0.25} and kept["skipped"] == {}


def test_a_table_an_older_infer_wrote_keeps_its_predictions(tmp_path):
    """Tables from before issue 17 held one "settings" for all rows: their rows are read with those settings."""
    settings = {"input_sha256": "abc", "limit": None, "max_new_tokens": 48, "repetition_penalty": None,
                "max_seq_length": None, "load_in_4bit": False, "metrics": ["rouge1"], "bertscore_model": "bert",
                "bertscore_layers": 9, "bleurt_model": "bleurt", "num_samples": 0, "temperature": 0.7, "top_p": 0.95,
                "seed": 42}
    path = tmp_path / "pred.checkpoints.json"
    rows = [{"checkpoint": EARLY, "score_of": ["rouge1"]}]
    path.write_text(json.dumps({"settings": settings, "rows": rows}), encoding="utf-8")
    table = infer.read_table(path, "abc")
    assert table["generation"] == infer.table_generation(infer.InferSettings(max_new_tokens=48, load_in_4bit=False))
    assert table["rows"][EARLY]["metric_settings"] == {"rouge1": {}}
    assert table["rows"][EARLY]["generation"] == table["generation"]
    assert infer.read_table(path, "another input") == {"generation": None, "rows": {}}


def test_table_needs_references(table_run, tmp_path, repo_root):
    result = run_script(["infer.py", "--model", table_run["run"], "--input", repo_root / "data/sample/test.json"], cwd=tmp_path)
    assert_one_line_error(result, "test.json", "training run", "reference 'output'")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# train.py merge (issue 9 item 4)
# ---------------------------------------------------------------------------------------------

def test_merged_cat_with_weights_1_0_regenerates_the_first_adapter(table_run, memorized_run, memorized_input, tmp_path):
    run = memorized_run["run"]
    merged = tmp_path / "merged"
    result = run_script(["train.py", "merge", "--adapters", run / "final", run / EARLY, "--method", "cat",
                         "--weights", "1", "0", "--output_dir", merged], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read(merged / "adapter_config.json")["r"] == 32, "cat: the rank is the sum of the ranks"
    config = read(merged / "run_config.json")
    assert config["merge"]["method"] == "cat" and config["merge"]["weights"] == [1.0, 0.0]
    assert [a["global_step"] for a in config["merge"]["adapters"]] == [60, 20] and "global_step" not in config
    assert config["max_seq_length"] == 1024 and config["system_prompt"] is False
    assert (merged / "tokenizer.json").is_file() and (merged / "chat_template.jinja").is_file()

    result = run_script(["infer.py", "--model", merged, "--input", memorized_input, "--output", "merged_pred.json", *TABLE_FLAGS],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outputs = lambda path: [record["output"] for record in read(path)]  # noqa: E731
    first, second = outputs(table_run["cwd"] / f"memorized_pred.{LAST}.json"), outputs(table_run["cwd"] / f"memorized_pred.{EARLY}.json")
    assert first != second, "the two adapters must write different summaries for this test to mean anything"
    assert outputs(tmp_path / "merged_pred.json") == first


def lora_updates(adapter_dir: Path) -> dict:
    """Each module's LoRA update delta-W = scaling x B @ A (float64), from the saved adapter alone."""
    import torch
    from safetensors.torch import load_file

    config = read(adapter_dir / "adapter_config.json")
    scaling = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    tensors = {k: v.double() for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    return {key.replace(".lora_A.weight", ""): scaling * torch.matmul(tensors[key.replace("lora_A", "lora_B")], a)
            for key, a in tensors.items() if key.endswith(".lora_A.weight")}


@pytest.mark.parametrize("method", ["cat", "svd", "linear", "ties", "dare_ties", "dare_linear"])
def test_merging_copies_of_one_adapter_with_default_weights_gives_that_adapter(memorized_run, tmp_path, method):
    """PEFT 0.21.2 weighs the methods differently (linear / dare_linear sum sqrt(w)-scaled factors, ties /
    dare_ties average them): with the default weights, n copies of one adapter must give that adapter's update
    back for every method (density 1: nothing pruned, so the copies are exactly one adapter)."""
    final = memorized_run["run"] / "final"
    copies = [shutil.copytree(final, tmp_path / name) for name in ("a", "b", "c")]
    density = ["--density", "1"] if method in ("ties", "dare_ties", "dare_linear") else []
    result = run_script(["train.py", "merge", "--adapters", *copies, "--method", method, *density,
                         "--output_dir", tmp_path / "merged"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    original, merged = lora_updates(final), lora_updates(tmp_path / "merged")
    assert original.keys() == merged.keys()
    for key, update in original.items():
        ratio = float((merged[key] * update).sum() / (update * update).sum())  # the share of the update merged back
        assert abs(ratio - 1) < 0.02, f"{method}: {key}: {ratio:.3f} x the adapter's update"
        assert float((merged[key] - update).norm() / update.norm()) < 0.02, f"{method}: {key}"


def test_dare_merges_repeat_with_one_seed_and_differ_with_another(memorized_run, tmp_path):
    run = memorized_run["run"]
    merge = ["train.py", "merge", "--adapters", run / "final", run / EARLY, "--method", "dare_linear",
             "--density", "0.5"]
    for name, seed in (("one", "1"), ("again", "1"), ("other", "2")):
        result = run_script([*merge, "--seed", seed, "--output_dir", tmp_path / name], cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    weights = {name: (tmp_path / name / "adapter_model.safetensors").read_bytes() for name in ("one", "again", "other")}
    assert weights["one"] == weights["again"] and weights["one"] != weights["other"]
    assert read(tmp_path / "one" / "run_config.json")["merge"]["seed"] == 1


def fake_adapter(path: Path, rank: int, base: str = "tiny") -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "base_model_name_or_path": base}), encoding="utf-8")
    (path / "run_config.json").write_text(json.dumps({"system_prompt": False, "max_seq_length": 1024}), encoding="utf-8")
    return path


@pytest.mark.parametrize("args, fragments", [
    (["--method", "linear"], ["--method linear needs equal LoRA ranks, got [8, 16]", "cat is exact", "rank 24"]),
    (["--method", "ties"], ["needs equal LoRA ranks"]),
    (["--method", "cat", "--weights", "1"], ["--weights: 1 given for 2 adapters"]),
    (["--method", "cat", "--density", "0.5"], ["--density applies to ties, dare_ties, dare_linear"]),
])
def test_merge_refuses_before_loading_a_model(tmp_path, args, fragments):
    a, b = fake_adapter(tmp_path / "a", 8), fake_adapter(tmp_path / "b", 16)
    result = run_script(["train.py", "merge", "--adapters", a, b, *args, "--output_dir", tmp_path / "out"], cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_merge_refuses_other_bases_missing_density_and_an_existing_output(tmp_path):
    a, b, c = fake_adapter(tmp_path / "a", 8), fake_adapter(tmp_path / "b", 8), fake_adapter(tmp_path / "c", 8, base="other")
    merge = ["train.py", "merge", "--output_dir", tmp_path / "out", "--adapters"]
    assert_one_line_error(run_script([*merge, a, c], cwd=tmp_path), "different base models")
    assert_one_line_error(run_script([*merge, a, b, "--method", "dare_ties"], cwd=tmp_path), "needs --density in (0, 1]")
    assert_one_line_error(run_script([*merge, a], cwd=tmp_path), "two or more --adapters")
    (tmp_path / "out").mkdir()
    assert_one_line_error(run_script([*merge, a, b], cwd=tmp_path), "out: exists", "--overwrite_output_dir")


def test_merge_borrows_a_checkpoints_missing_settings_from_its_run_or_refuses(tmp_path):
    """A checkpoint-N/ without run_config.json takes its run's (as infer.py does), so a system-prompt run is not merged
    with a plain one unnoticed; an adapter whose settings cannot be found at all is refused."""
    plain = fake_adapter(tmp_path / "plain", 8)
    system = fake_adapter(tmp_path / "run" / "final", 8)
    (system / "run_config.json").write_text(json.dumps({"system_prompt": True}), encoding="utf-8")
    checkpoint = fake_adapter(tmp_path / "run" / "checkpoint-5", 8)
    (checkpoint / "run_config.json").unlink()
    merge = ["train.py", "merge", "--output_dir", tmp_path / "out", "--adapters"]
    assert_one_line_error(run_script([*merge, plain, checkpoint], cwd=tmp_path), "system_prompt differs")
    lonely = fake_adapter(tmp_path / "lonely" / "final", 8)
    (lonely / "run_config.json").unlink()
    assert_one_line_error(run_script([*merge, plain, lonely], cwd=tmp_path), f"--adapters {lonely}: no run_config.json",
                          "prompt settings are unknown")
    assert not (tmp_path / "out").exists()


def test_merge_help_explains_the_rank_rules():
    result = run_script(["train.py", "merge", "--help"])
    assert result.returncode == 0 and "usage: train.py merge" in result.stdout
    text = " ".join(result.stdout.split())
    assert "cat = exact" in text and "rank = sum of the ranks" in text and "equal ranks" in text


# ---------------------------------------------------------------------------------------------
# --save_merged folders (issue 8 item 10)
# ---------------------------------------------------------------------------------------------

def test_save_merged_writes_run_config_and_infer_loads_it_in_16_bit(tiny_model_dir, memorized_run, memorized_input, tmp_path):
    data = tmp_path / "data"  # the memorized rows without dev: one quick step, no evaluation
    data.mkdir()
    for name in ("train.jsonl", "stats.json"):
        shutil.copy(memorized_run["prepared"] / name, data / name)
    result = run_script(["train.py", "--model", tiny_model_dir, "--data", data, "--output_dir", tmp_path / "run", "--max_steps", "1",
                         "--no-load_in_4bit", "--save_merged", "--lora_r", "8", "--lora_alpha", "8",
                         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--max_seq_length", "1024"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    merged = tmp_path / "run" / "merged"
    config = read(merged / "run_config.json")
    assert config["load_in_4bit"] is False and config["max_seq_length"] == 1024
    assert config["merged_from"] == str(tmp_path / "run" / "final") and not (merged / "adapter_config.json").exists()

    result = run_script(["infer.py", "--model", merged, "--input", memorized_input, "--max_new_tokens", "1000"], cwd=tmp_path)
    assert last_line(result) == "error: --max_new_tokens 1000 leaves no room for the prompt in max_seq_length 1024"
    assert "4-bit = False" in result.stdout + result.stderr


def test_a_folder_of_full_weights_without_run_config_loads_in_16_bit(tiny_model_dir, memorized_input, tmp_path):
    result = run_script(["infer.py", "--model", tiny_model_dir, "--input", memorized_input, "--max_new_tokens", "8190"], cwd=tmp_path)
    assert last_line(result) == "error: --max_new_tokens 8190 leaves no room for the prompt in max_seq_length 8192"
    assert "4-bit = False" in result.stdout + result.stderr and "4-bit = True" not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The output guard's band does not depend on the current folder (issue 17 item 9)
# ---------------------------------------------------------------------------------------------

def test_guard_band_is_the_same_from_any_working_directory(chatty_model_dir, memorize_data, tmp_path):
    """train.py run from the kit folder with a relative --data (as README shows): infer.py from that folder and from
    another one must find the same training rows, hence the same length band."""
    kit, elsewhere = tmp_path / "kit", tmp_path / "elsewhere"
    shutil.copytree(memorize_data["prepared"], kit / "prepared")
    elsewhere.mkdir()
    result = run_script(["train.py", "--model", chatty_model_dir, "--data", "prepared", "--output_dir", "run",
                         *MEMORIZE_FLAGS, "--max_steps", "1", "--learning_rate", "1e-6", "--no-load_in_4bit"],
                        cwd=kit, timeout=1800)  # barely trained: the chatty base still answers (not empty)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = kit / "records.json"
    records.write_text(json.dumps(memorize_data["records"], ensure_ascii=False), encoding="utf-8")
    guards = []
    for cwd in (kit, elsewhere):
        result = run_script(["infer.py", "--model", kit / "run" / "final", "--input", records,
                             "--output", cwd / "pred.json", "--limit", "1", *TABLE_FLAGS, "--max_new_tokens", "24"],
                            cwd=cwd)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        guards.append(read(cwd / "scores.json")["guard"])
    assert guards[0]["band_chars"] == guards[1]["band_chars"] and guards[0]["band_source"] == guards[1]["band_source"]
    assert "competition summaries in" in guards[1]["band_source"], guards[1]["band_source"]
