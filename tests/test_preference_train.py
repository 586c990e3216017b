"""train.py --stage dpo|kto through its real command line on the tiny Gemma 2: starting from an early checkpoint of the
shared memorized run (which does not yet reproduce the summaries), DPO and KTO on pairs of (true summary, corrupted
summary: the checkpoint's own wrong output, else the true one scrambled) grow the reward margin and make greedy
generation (infer.py) return the true summaries; final/ is a plain LoRA adapter that carries the SFT run's settings;
the prompt carries no loss; a SIGTERM checkpoints and the same command resumes; bad input ends in one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import align
import train
from conftest import END_OF_TURN_ID, OFFLINE_ENV, REPO_ROOT, assert_one_line_error, run_script
from common import UserError, load_yaml_config
from test_train import interrupt_when, python

# The memorized run learns the 4 summaries in 60 steps; the early checkpoint is the first of these at which greedy
# decoding still gets some of them wrong (35 on a CPU without bf16, 30 with it; asserted, as the premise of the
# end-to-end tests). The pairs leave out the first summary, the last one the memorized run gets right (at step 50):
# a few preference steps are not enough for it.
EARLY_STEPS = (35, 30)
PAIRED = slice(1, None)
# One micro-batch holds the pairs (DPO) or 4 of the KTO rows; a constant learning rate, no weight decay.
SHORT_RUN = ["--lr_scheduler_type", "constant", "--warmup_steps", "0", "--weight_decay", "0",
             "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--save_total_limit", "2"]
# Pure sigmoid DPO only moves the margin; the sft term pulls greedy decoding to the chosen text in few steps (10 are
# too few on a CPU with native bf16, 20 reproduce every summary on all three kinds of CPU run).
DPO_FLAGS = ["--max_steps", "20", "--learning_rate", "5e-3", "--loss_type", "sigmoid", "sft",
             "--loss_weights", "1.0", "1.0"]
# KTO at 5e-3 drives every log-prob down within two steps and its loss saturates: a smaller step. KTO has no sft
# term: pushing the rejected texts down also bends other greedy continuations, and which summaries it reproduces
# after a few steps depends on the CPU's precision (fp32, emulated or native bf16). So KTO must reproduce more
# summaries than the early checkpoint and lose none; DPO with its sft term must reproduce them all.
KTO_FLAGS = ["--max_steps", "15", "--learning_rate", "1e-3"]

# The batch train.py's preference trainer feeds the model, through the same settings, model and trainer code.
DUMP_PREFERENCE_BATCH = """
import json, sys
import unsloth
sys.path.insert(0, sys.argv[1])
import align, train
cfg = train.parse_train_settings(sys.argv[3:])
pairs, _, _ = align.load_stage_data(cfg)
model, tokenizer = train.load_lora_model(cfg)
align.load_init_weights(model, cfg.init_adapter)
trainer = align.build_preference_trainer(cfg, model, tokenizer, pairs, train.training_args(cfg, False), [])
batch = next(iter(trainer.get_train_dataloader()))
json.dump({
    "input_ids": batch["input_ids"].tolist(), "completion_mask": batch["completion_mask"].tolist(),
    "attention_mask": batch["attention_mask"].tolist(),
    "prompt_ids": [tokenizer.apply_chat_template(p["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
                   for p in pairs],
    "answer_ids": [tokenizer(p[k][0]["content"], add_special_tokens=False)["input_ids"] for p in pairs
                   for k in ("chosen", "rejected")],
    "newline_id": tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\\n"))[0],
    "adapters": sorted(model.peft_config),
}, open(sys.argv[2], "w"))
"""


def corrupted(text: str, generated: str) -> str:
    """The model's own output when it is wrong (what infer.py --preference_out would reject), else the summary's
    second half of words before its first: the same words, wrong."""
    if generated.strip() != text.strip():
        return generated
    words = text.split(" ")
    return " ".join(words[len(words) // 2:] + words[:len(words) // 2])


def preference_pairs(rows: list[dict], generated: list[str], run_config: dict) -> list[dict]:
    """PREF_FORMAT pairs for prep's rows: the SFT prompt, the true summary chosen, a corrupted one rejected."""
    return [{"id": row["id"], "prompt": row["prompt"], "chosen": row["completion"],
             "rejected": [{"role": "assistant", "content": corrupted(row["completion"][0]["content"], output)}],
             "chosen_score": 1.0, "rejected_score": 0.2, "margin": 0.8, "metric": "rouge1",
             "base_model": run_config["base_model"],
             "prompt_settings": {key: run_config[key] for key in ("system_prompt", "clean_inputs", "target_format")}}
            for row, output in zip(rows, generated)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def greedy_outputs(model: Path, records: list[dict], tmp_path: Path) -> list[str]:
    """infer.py's greedy submission for the records, through its real command line."""
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{**r, "output": ""} for r in records], ensure_ascii=False), encoding="utf-8")
    result = run_script(["infer.py", "--model", model, "--input", test, "--output", tmp_path / "submission.json",
                         "--batch_size", "4", "--max_new_tokens", "256"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [r["output"] for r in json.loads((tmp_path / "submission.json").read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def early(memorized_run, tmp_path_factory) -> dict:
    """The memorized run's early checkpoint (EARLY_STEPS), its greedy outputs and the pairs file for the PAIRED rows."""
    out = tmp_path_factory.mktemp("early")
    lines = (memorized_run["prepared"] / "train.jsonl").read_text(encoding="utf-8").splitlines()
    rows, records = [json.loads(line) for line in lines][PAIRED], memorized_run["records"][PAIRED]
    references = [r["output"].strip() for r in records]
    for step in EARLY_STEPS:
        checkpoint = memorized_run["run"] / f"checkpoint-{step}"
        before = greedy_outputs(checkpoint, records, out)
        if before != references:
            break
    run_config = json.loads((checkpoint / "run_config.json").read_text(encoding="utf-8"))
    pairs = write_jsonl(out / "pairs.jsonl", preference_pairs(rows, before, run_config))
    return {"checkpoint": checkpoint, "run_config": run_config, "pairs": pairs, "records": records,
            "references": references, "before": before}


def stage_args(stage: str, early: dict, *flags) -> list[str]:
    """train.py's arguments for a preference stage from the early checkpoint on its pairs."""
    return [str(arg) for arg in ("train.py", "--stage", stage, "--init_adapter", early["checkpoint"],
                                 "--preference_data", early["pairs"], *flags)]


def stage_command(stage: str, early: dict, *flags) -> list[str]:
    script, *rest = stage_args(stage, early, *flags)
    return [sys.executable, str(REPO_ROOT / script), *rest]


def preference_run(stage: str, early: dict, output_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_script(stage_args(stage, early, "--output_dir", output_dir, *SHORT_RUN, *flags), cwd=output_dir.parent)


def history(run: Path) -> list[dict]:
    """The newest checkpoint's log history."""
    return json.loads((train.checkpoint_dirs(run)[0] / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]


def logged(run: Path, key: str) -> list[float]:
    return [entry[key] for entry in history(run) if key in entry]


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def reproduced(outputs: list[str], references: list[str]) -> set[int]:
    return {i for i, (output, reference) in enumerate(zip(outputs, references)) if output == reference}


@pytest.mark.parametrize("stage, flags, all_reproduced", [("dpo", DPO_FLAGS, True), ("kto", KTO_FLAGS, False)])
def test_preference_run_prefers_the_true_summaries(early, tiny_model_dir, tmp_path, stage, flags, all_reproduced):
    assert early["before"] != early["references"], "premise: the early checkpoint does not reproduce the summaries yet"
    run = tmp_path / "run"
    result = preference_run(stage, early, run, *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    margins = logged(run, "rewards/margins")
    assert len(margins) >= 2 and margins[-1] > margins[0] + 1.0, margins
    after = greedy_outputs(run / "final", early["records"], tmp_path)
    before_right, after_right = (reproduced(outputs, early["references"]) for outputs in (early["before"], after))
    assert before_right < after_right, (before_right, after_right)  # more summaries reproduced, none lost
    if all_reproduced:
        assert after == early["references"]

    final = run / "final"
    assert not [p for p in final.iterdir() if p.is_dir()], "a plain adapter: no frozen 'ref' copy beside it"
    assert not list(run.glob("checkpoint-*/ref")), "checkpoints hold the trained adapter alone"
    adapter = json.loads((final / "adapter_config.json").read_text(encoding="utf-8"))
    init = json.loads((early["checkpoint"] / "adapter_config.json").read_text(encoding="utf-8"))
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == \
        (init["r"], init["lora_alpha"], sorted(init["target_modules"]))
    config = json.loads((final / "run_config.json").read_text(encoding="utf-8"))
    for key in ("base_model", "max_seq_length", "load_in_4bit", "system_prompt", "clean_inputs", "target_format",
                "data_dir"):
        assert config[key] == early["run_config"][key], key
    assert config["stage"] == stage and config["init_adapter"] == str(early["checkpoint"].resolve())
    assert config["preference_data"] == str(early["pairs"].resolve())
    assert config["preference_pairs"] == len(early["records"])
    assert config["settings"]["lora_r"] == init["r"] and config["settings"]["model"] == str(tiny_model_dir)
    assert (final / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reward margin" in result.stdout and f"python infer.py --model {final}" in result.stdout


def test_the_kits_own_pairs_make_a_dpo_run_that_the_checkpoint_table_scores(early, tmp_path):
    """The recipe's chain on the early checkpoint: infer.py --preference_out pairs its own candidates with the
    references, train.py --stage dpo trains on exactly that file, and infer.py's checkpoint table scores the run."""
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(early["records"], ensure_ascii=False), encoding="utf-8")
    pairs, run = tmp_path / "preference.jsonl", tmp_path / "run"
    made = run_script(["infer.py", "--model", early["checkpoint"], "--input", dev, "--num_samples", "2",
                       "--chosen", "reference", "--preference_out", pairs, "--batch_size", "4",
                       "--max_new_tokens", "256"], cwd=tmp_path)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    kept = [json.loads(line)["id"] for line in pairs.read_text(encoding="utf-8").splitlines()]
    wrong = [r["id"] for r, before, ref in zip(early["records"], early["before"], early["references"]) if before != ref]
    assert set(wrong) <= set(kept), "every record the checkpoint gets wrong makes a pair (chosen: the reference)"

    trained = run_script(["train.py", "--stage", "dpo", "--init_adapter", early["checkpoint"], "--preference_data",
                          pairs, "--output_dir", run, *SHORT_RUN, "--max_steps", "2", "--learning_rate", "1e-3",
                          "--save_total_limit", "3"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert json.loads((run / "final" / "run_config.json").read_text(encoding="utf-8"))["preference_pairs"] == len(kept)

    table = run_script(["infer.py", "--model", run, "--input", dev, "--batch_size", "4", "--max_new_tokens", "256",
                        "--metrics", "rouge1"], cwd=tmp_path)
    assert table.returncode == 0, table.stdout[-3000:] + table.stderr[-3000:]
    rows = json.loads((tmp_path / "dev_pred.checkpoints.json").read_text(encoding="utf-8"))["rows"]
    assert [row["checkpoint"] for row in rows] == ["checkpoint-1", "checkpoint-2", "final"]
    assert all(row["score"] is not None for row in rows)


def test_preference_defaults_show_in_the_settings_table(early, tmp_path):
    """Without --learning_rate / --num_train_epochs a dpo run takes the preference defaults; the table shows them.
    Stopped by Ctrl-C once the table is out, while the model loads: only the table is wanted."""
    code, stdout, stderr = interrupt_when(stage_command("dpo", early, "--output_dir", tmp_path / "run"), " Model ─",
                                          tmp_path)
    assert code == 130, stdout[-2000:] + stderr[-2000:]
    table = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in stdout.splitlines() if line.count("│") == 3}
    assert table["learning_rate"] == "0.0001" and table["num_train_epochs"] == "4.0"
    assert table["max_seq_length"] == str(early["run_config"]["max_seq_length"]) and table["lora_r"] == "16"
    assert table["preference pairs"] == str(len(early["records"])) and table["stage"] == "dpo"


def test_sigterm_checkpoints_and_the_same_command_resumes(early, tmp_path):
    run = tmp_path / "run"
    command = stage_command("dpo", early, "--output_dir", run, *SHORT_RUN, *DPO_FLAGS, "--max_steps", "6",
                            "--per_device_train_batch_size", "2")  # 2 steps per epoch: a stop mid-epoch
    code, stdout, stderr = interrupt_when(command, "{'loss'", tmp_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-2000:]
    stopped_at = train.find_resumable_checkpoint(run)
    assert stopped_at is not None and int(stopped_at.name.split("-")[1]) < 6
    assert stderr.strip().splitlines()[-1] == \
        f"stopped by SIGTERM: {stopped_at} is saved; run the same command again to resume from it"
    assert not (stopped_at / "ref").exists() and not (run / "final").exists()

    resumed = subprocess.run(command, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming from {stopped_at}" in resumed.stdout
    steps = [entry["step"] for entry in history(run) if "loss" in entry]
    assert steps == list(range(1, 7)), "the resumed run continues the interrupted run's history"
    # The resumed policy is the checkpoint's, not the init adapter again: its first logged margin is not ~0.
    assert json.loads((run / "final" / "run_config.json").read_text(encoding="utf-8"))["global_step"] == 6
    assert abs(logged(run, "rewards/margins")[int(stopped_at.name.split("-")[1])]) > 1e-2


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_the_prompt_carries_no_loss(early, tmp_path, stage):
    dump = tmp_path / "batch.json"
    result = python(DUMP_PREFERENCE_BATCH, REPO_ROOT, dump, "--stage", stage, "--init_adapter", early["checkpoint"],
                    "--preference_data", early["pairs"], "--output_dir", tmp_path / "run",
                    "--per_device_train_batch_size", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    batch = json.loads(dump.read_text(encoding="utf-8"))
    assert batch["adapters"] == ["default", "ref"], "TRL's frozen copy of the init adapter is the reference"
    expected = {tuple(p + a + [END_OF_TURN_ID, batch["newline_id"]]): len(p)
                for p in batch["prompt_ids"] for a in batch["answer_ids"]}
    pairs = len(batch["prompt_ids"])  # DPO: each pair's chosen and rejected; KTO: a row per answer
    assert len(batch["input_ids"]) == (2 * pairs if stage == "dpo" else min(4, 2 * pairs))
    for ids, mask, attention in zip(batch["input_ids"], batch["completion_mask"], batch["attention_mask"]):
        real = [i for i, a in zip(ids, attention) if a]
        prompt_len = expected[tuple(real)]
        assert mask[:len(real)] == [0] * prompt_len + [1] * (len(real) - prompt_len)
        assert not any(mask[len(real):]), "padding is never a target"


# ---------------------------------------------------------------------------------------------
# Bad input: one line
# ---------------------------------------------------------------------------------------------

def test_stage_needs_its_inputs_and_a_matching_model(early, tmp_path):
    assert_one_line_error(run_script(["train.py", "--stage", "dpo", "--preference_data", early["pairs"]]),
                          "--stage dpo needs --init_adapter")
    assert_one_line_error(run_script(["train.py", "--stage", "kto", "--init_adapter", early["checkpoint"]]),
                          "--stage kto needs --preference_data")
    assert_one_line_error(run_script(stage_args("dpo", early, "--model", "unsloth/gemma-2-9b-it-bnb-4bit")),
                          "--model unsloth/gemma-2-9b-it-bnb-4bit",
                          f"was trained with model {early['run_config']['base_model']}")
    assert_one_line_error(run_script(["train.py", "--stage", "dpo", "--init_adapter", tmp_path, "--preference_data",
                                      early["pairs"]]), f"--init_adapter {tmp_path}: not a LoRA adapter folder")
    assert_one_line_error(run_script(["train.py", "--preference_data", early["pairs"]]),
                          "--preference_data is for --stage dpo or kto")
    assert_one_line_error(run_script(stage_args("kto", early, "--per_device_train_batch_size", "1")),
                          "--per_device_train_batch_size must be 2 or more for --loss_type kto")
    assert_one_line_error(run_script(stage_args("dpo", early, "--max_seq_length", "64")),
                          f"{early['pairs']}: every pair is longer than --max_seq_length 64")


def test_pairs_longer_than_max_seq_length_are_left_out_not_cut():
    pairs = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    assert align.fitting_pairs(pairs, [90, 120, 100], 100, "p.jsonl") == ([pairs[0], pairs[2]], [90, 100], ["b"])
    with pytest.raises(UserError, match="p.jsonl: every pair is longer than --max_seq_length 80 .the shortest is 90"):
        align.fitting_pairs(pairs, [90, 120, 100], 80, "p.jsonl")


def bad_pair_files(early: dict, tmp_path: Path) -> list[tuple[Path, list[str]]]:
    pairs = [json.loads(line) for line in early["pairs"].read_text(encoding="utf-8").splitlines()]
    first, second = pairs[0], pairs[1]

    def with_second(**change) -> Path:
        path = tmp_path / f"case{len(cases)}.jsonl"
        return write_jsonl(path, [first, {**second, **change}, *pairs[2:]])

    cases: list[tuple[Path, list[str]]] = []
    cases.append((with_second(rejected=second["chosen"]),
                  ["line 2", repr(second["id"]), "field 'rejected'", "same text"]))
    cases.append((with_second(base_model="google/gemma-2-9b-it"),
                  ["line 2", "field 'base_model'", "'google/gemma-2-9b-it'"]))
    cases.append((with_second(prompt_settings={**second["prompt_settings"], "system_prompt": True}),
                  ["line 2", "field 'prompt_settings.system_prompt'", "expected False", "got True"]))
    cases.append((with_second(chosen="a summary"), ["line 2", repr(second["id"]), "field 'chosen'"]))
    cases.append((with_second(prompt=[]), ["line 2", "field 'prompt'"]))
    cases.append((write_jsonl(tmp_path / "empty.jsonl", []), ["no preference pairs"]))
    not_json = tmp_path / "not_json.jsonl"
    not_json.write_text(json.dumps(first, ensure_ascii=False) + "\n{oops\n", encoding="utf-8")
    cases.append((not_json, ["line 2 is not valid JSON"]))
    return cases


def test_bad_preference_files_are_refused_in_one_line(early, tmp_path):
    """In-process (align.read_preference_file), then two through the command line, which must not load the model."""
    init_config = early["run_config"]
    cases = bad_pair_files(early, tmp_path)
    for path, fragments in cases:
        with pytest.raises(UserError) as err:
            align.read_preference_file(str(path), early["checkpoint"], init_config)
        message = str(err.value)
        assert message.startswith(str(path)) and all(f in message for f in fragments), (message, fragments)
    for path, fragments in (cases[0], cases[-2]):
        result = run_script(["train.py", "--stage", "dpo", "--init_adapter", early["checkpoint"],
                             "--preference_data", path, "--output_dir", tmp_path / "run"])
        assert_one_line_error(result, str(path), *fragments)
        assert "Unsloth" not in result.stdout, "refused before the model loads"


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------

def test_given_flags_names_the_settings_typed():
    assert align.given_flags(["--learning_rate", "1e-4", "--no-load_in_4bit", "--beta=0.2", "x"]) == \
        {"learning_rate", "load_in_4bit", "beta"}


def test_stage_settings_fill_what_was_not_given(early):
    values = {field.name: field.default for field in train.dataclasses.fields(train.TrainSettings)
              if field.default is not train.dataclasses.MISSING}
    values.update(stage="kto", init_adapter=str(early["checkpoint"]), preference_data=str(early["pairs"]),
                  target_modules=list(train.SEVEN_PROJECTIONS), loss_type=["sigmoid"], learning_rate=3e-4)
    resolved = align.stage_settings(values, {"learning_rate"})
    assert resolved["learning_rate"] == 3e-4 and resolved["num_train_epochs"] == 4.0
    assert resolved["loss_type"] == ["kto"] and resolved["per_device_train_batch_size"] == 2
    assert resolved["model"] == early["run_config"]["base_model"] and resolved["max_seq_length"] == 1024
    assert resolved["lora_r"] == 16 and resolved["lora_dropout"] == 0.0


def test_kto_rows_are_each_pair_twice_and_shuffled_by_the_seed():
    pairs = [{"prompt": [{"role": "user", "content": str(i)}], "chosen": [{"role": "assistant", "content": f"c{i}"}],
              "rejected": [{"role": "assistant", "content": f"r{i}"}]} for i in range(6)]
    rows = align.kto_rows(pairs, seed=1)
    assert rows == align.kto_rows(pairs, seed=1) and rows != align.kto_rows(pairs, seed=2)
    assert sorted((r["completion"][0]["content"], r["label"]) for r in rows) == \
        sorted([(f"c{i}", True) for i in range(6)] + [(f"r{i}", False) for i in range(6)])


def test_yaml_config_takes_the_loss_mix(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("loss_type: [sigmoid, sft]\nloss_weights: [1, 0.5]\nbeta: 0.2\n", encoding="utf-8")
    assert load_yaml_config(str(config), train.TrainSettings, "train.py") == \
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.2}
    config.write_text("loss_weights: [1, heavy]\n", encoding="utf-8")
    with pytest.raises(UserError, match="key 'loss_weights' must be a list of numbers"):
        load_yaml_config(str(config), train.TrainSettings, "train.py")
