"""train.py through its real command line on the tiny Gemma 2: it memorizes the sample summaries and
a fresh process generates them back from final/; the loss covers only the summary; an interrupted run
resumes to the same final step; bad settings end in one line. Pure helpers are tested in-process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import progress
import train
from conftest import END_OF_TURN_ID, MEMORIZE_FLAGS, MEMORIZE_ROWS, OFFLINE_ENV, REPO_ROOT, run_script
from common import UserError

# 8 rows, micro-batch 2, no accumulation: 4 steps per epoch, 12 in all, a checkpoint at each epoch's end.
RESUME_FLAGS = [
    "--num_train_epochs", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
    "--save_total_limit", "2", "--learning_rate", "1e-3", "--warmup_steps", "2",
    "--lora_r", "8", "--lora_alpha", "8", "--max_seq_length", "1024", "--logging_steps", "1",
]

GENERATE_FROM_FINAL = """
import json, sys
import unsloth
from unsloth import FastLanguageModel
final, rows_path, out_path = sys.argv[1:]
rows = [json.loads(line) for line in open(rows_path, encoding="utf-8")]
model, tokenizer = FastLanguageModel.from_pretrained(final, max_seq_length=1024, load_in_4bit=True)
FastLanguageModel.for_inference(model)
prompts = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in rows]
batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
output = model.generate(**batch, max_new_tokens=256, do_sample=False)
new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
json.dump({"generated": [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_tokens],
           "new_tokens": new_tokens, "padding_side": tokenizer.padding_side}, open(out_path, "w"), ensure_ascii=False)
"""

# The batch train.py's trainer feeds the model, through the same load_lora_model / build_trainer.
DUMP_TRAINING_BATCH = """
import json, sys
import unsloth
sys.path.insert(0, sys.argv[1])
import train
cfg = train.parse_train_settings(sys.argv[4:])
rows, _, _ = train.load_prepared(cfg.data)
model, tokenizer = train.load_lora_model(cfg)
trainer = train.build_trainer(cfg, model, tokenizer, rows, [], bf16=False)
batch = next(iter(trainer.get_train_dataloader()))
json.dump({
    "input_ids": batch["input_ids"].tolist(),
    "labels": batch["labels"].tolist(),
    "attention_mask": batch["attention_mask"].tolist(),
    "prompt_ids": [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"] for r in rows],
    "summary_ids": [tokenizer(r["completion"][0]["content"], add_special_tokens=False)["input_ids"] for r in rows],
    "newline_id": tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\\n"))[0],
}, open(sys.argv[2], "w"))
"""


# The trainer train.py builds, evaluated after training the way train.py's fallback does, with the
# full-eval flag Unsloth's GPU trainer sets for bf16 training: which float parameters changed dtype?
EVALUATE_AFTER_TRAINING = """
import json, sys
import unsloth
sys.path.insert(0, sys.argv[1])
import train
cfg = train.parse_train_settings(sys.argv[3:])
rows, dev, _ = train.load_prepared(cfg.data)
model, tokenizer = train.load_lora_model(cfg)
trainer = train.build_trainer(cfg, model, tokenizer, rows, dev, bf16=False)
# The premise: a model of mixed precision (float32 LoRA weights beside a half-precision base, as PEFT keeps them
# on a GPU). Unsloth's CPU backend loads everything in bfloat16 on a CPU with bf16 hardware and TRL casts a
# quantized model's adapters to bfloat16, so build the mix here whatever the CPU.
for name, parameter in model.named_parameters():
    if "lora_" in name:
        parameter.data = parameter.data.float()
dtypes = lambda: {name: str(p.dtype) for name, p in model.named_parameters() if p.dtype.is_floating_point}
before = dtypes()
trainer.args.bf16_full_eval = True
train.evaluate_without_half_precision_cast(trainer)
kept = dtypes()
trainer.args.bf16_full_eval = True
trainer.evaluate()
json.dump({"before": before, "kept": kept, "plain_evaluate": dtypes()}, open(sys.argv[2], "w"))
"""


def python(code: str, *args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd,
                          env={**os.environ, **OFFLINE_ENV, **(env or {})}, capture_output=True, text=True, timeout=900)


def interrupt_when(command: list[str], marker: str, tmp_path: Path, signum: int = signal.SIGINT,
                   env: dict | None = None, umask: int | None = None) -> tuple[int, str, str]:
    """Run a command and press Ctrl-C (SIGINT), or send `signum`, once `marker` shows in its stdout:
    (exit code, stdout, stderr)."""
    stderr_path = tmp_path / "interrupted.stderr"
    env = {**(env or os.environ), **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}

    def preexec() -> None:
        # As from a terminal: a shell's background job (`pytest ... &`) passes SIGINT on as ignored.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if umask is not None:
            os.umask(umask)

    with open(stderr_path, "w", encoding="utf-8") as stderr, \
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                             preexec_fn=preexec) as proc:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                proc.send_signal(signum)
                break
        rest, _ = proc.communicate(timeout=900)
    return proc.returncode, "".join(seen) + rest, stderr_path.read_text(encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in result.stderr, result.stderr[-2000:]


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, sample_dir, tmp_path_factory) -> Path:
    """prep.py's real output for the sample data (8 train rows, 3 dev rows), token lengths from the tiny tokenizer."""
    out = tmp_path_factory.mktemp("prepared")
    result = run_script(["prep.py", "--train", sample_dir / "train.json", "--dev", sample_dir / "dev.json",
                         "--out", out, "--tokenizer", tiny_model_dir, "--max_seq_length", "1024"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def memorized(memorized_run, tmp_path_factory) -> dict:
    """conftest's shared train.py run on the first 4 sample rows, plus greedy generations from its final/
    in a fresh process."""
    out = tmp_path_factory.mktemp("memorize")
    prepared_four = memorized_run["prepared"]
    generated = python(GENERATE_FROM_FINAL, memorized_run["run"] / "final", prepared_four / "train.jsonl", out / "generated.json", cwd=out)
    assert generated.returncode == 0, generated.stdout[-3000:] + generated.stderr[-3000:]
    return {**memorized_run, "generated": json.loads((out / "generated.json").read_text(encoding="utf-8")),
            "rows": read_jsonl(prepared_four / "train.jsonl")}


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def test_memorizes_training_summaries_and_final_dir_regenerates_them(memorized):
    summaries = [row["completion"][0]["content"] for row in memorized["rows"]]
    assert memorized["generated"]["generated"] == summaries
    for ids in memorized["generated"]["new_tokens"]:
        stop = ids.index(END_OF_TURN_ID)
        assert set(ids[stop + 1:]) <= {0}, "generation must stop at <end_of_turn>"


def test_final_dir_holds_adapter_tokenizer_run_config_and_plot(memorized, tiny_model_dir):
    final = memorized["run"] / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "run_config.json", "loss.png"):
        assert (final / name).is_file(), name
    assert "<start_of_turn>" in (final / "chat_template.jinja").read_text(encoding="utf-8")
    assert (final / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = json.loads((final / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["r"] == 16 and set(adapter["target_modules"]) == set(train.SEVEN_PROJECTIONS)
    config = json.loads((final / "run_config.json").read_text(encoding="utf-8"))
    assert config["base_model"] == str(tiny_model_dir)
    assert config["max_seq_length"] == 1024 and config["system_prompt"] is False
    assert config["settings"]["learning_rate"] == 1e-2 and config["settings"]["max_steps"] == 60
    assert config["global_step"] == 60 and config["train_rows"] == MEMORIZE_ROWS and config["eval_rows"] == 3
    assert config["train_loss"] < 3 and config["eval_loss"] is not None
    assert {"unsloth", "transformers", "trl", "peft", "torch"} <= set(config["versions"])
    assert config["device"].startswith("CPU")
    checkpoints = train.checkpoint_dirs(memorized["run"])
    assert [p.name for p in checkpoints] == [f"checkpoint-{step}" for step in range(60, 0, -1)], "one per epoch, newest first"


def test_console_reports_cpu_preflight_and_next_command(memorized):
    out = memorized["result"].stdout
    assert "no GPU found, training on CPU" in out and "CPU run:" in out
    for line in ("train rows", "longest row (tokens)", "steps per epoch", "total steps"):
        assert line in out
    assert "wall time" in out
    assert f"python infer.py --model {memorized['run'] / 'final'}" in out


def test_labels_cover_only_summary_and_end_of_turn(tiny_model_dir, memorized_run, tmp_path):
    prepared_four = memorized_run["prepared"]
    dump = tmp_path / "batch.json"
    result = python(DUMP_TRAINING_BATCH, REPO_ROOT, dump, tiny_model_dir, "--model", tiny_model_dir, "--data", prepared_four,
                    "--per_device_train_batch_size", "4", "--max_seq_length", "1024", "--output_dir", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    batch = json.loads(dump.read_text(encoding="utf-8"))
    expected = {tuple(p + s + [END_OF_TURN_ID, batch["newline_id"]]): (len(p), len(s))
                for p, s in zip(batch["prompt_ids"], batch["summary_ids"])}
    assert len(batch["input_ids"]) == 4
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = [i for i, m in zip(ids, mask) if m]
        prompt_len, summary_len = expected[tuple(real)]
        trained = prompt_len + summary_len + 2
        real_labels = [label for label, m in zip(labels, mask) if m]
        # The Gemma template closes the turn with "<end_of_turn>\n": both are learned, the prompt never is.
        assert real_labels == [-100] * prompt_len + real[prompt_len:trained]
        assert all(label == -100 for label, m in zip(labels, mask) if not m), "padding is never a target"


def test_interrupted_run_resumes_to_the_same_final_step(tiny_model_dir, prepared, tmp_path):
    full = run_script(["train.py", "--model", tiny_model_dir, "--data", prepared, "--output_dir", tmp_path / "full", *RESUME_FLAGS])
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    full_config = json.loads((tmp_path / "full" / "final" / "run_config.json").read_text(encoding="utf-8"))
    assert full_config["global_step"] == 12 and full_config["eval_rows"] == 3 and full_config["eval_loss"] > 0

    command = [sys.executable, str(REPO_ROOT / "train.py"), "--model", str(tiny_model_dir), "--data", str(prepared),
               "--output_dir", str(tmp_path / "run"), *RESUME_FLAGS]
    # Ctrl-C after the first logged step, before the first scheduled checkpoint (step 4): the run checkpoints
    # at the end of the step it is in, stops, and says so.
    code, stdout, stderr = interrupt_when(command, "{'loss'", tmp_path)
    assert code == 130, stdout[-2000:] + stderr[-2000:]
    stopped_at = train.find_resumable_checkpoint(tmp_path / "run")
    assert stopped_at is not None and int(stopped_at.name.split("-")[1]) < 12
    assert stderr.strip().splitlines()[-1] == f"interrupted: {stopped_at} is saved; run the same command again to resume from it"
    assert "Traceback" not in stderr and "finished work is kept" not in stderr
    assert not (tmp_path / "run" / "final").exists()

    env = {**os.environ, **OFFLINE_ENV}
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming from {stopped_at}" in resumed.stdout
    config = json.loads((tmp_path / "run" / "final" / "run_config.json").read_text(encoding="utf-8"))
    assert config["global_step"] == full_config["global_step"]
    steps_logged = [e["step"] for e in json.loads((train.checkpoint_dirs(tmp_path / "run")[0] / "trainer_state.json")
                                                  .read_text(encoding="utf-8"))["log_history"] if "loss" in e]
    assert steps_logged == list(range(1, 13)), "the resumed run continues the interrupted run's history"

    again = run_script(["train.py", "--model", tiny_model_dir, "--data", prepared, "--output_dir", tmp_path / "run", *RESUME_FLAGS])
    assert_one_line_error(again, "holds a finished run", "--overwrite_output_dir")


def test_ctrl_c_before_any_checkpoint_says_nothing_was_saved(tiny_model_dir, prepared, tmp_path):
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--model", str(tiny_model_dir), "--data", str(prepared),
               "--output_dir", str(tmp_path / "run"), *RESUME_FLAGS]
    code, stdout, stderr = interrupt_when(command, "rows, ", tmp_path)  # the data count: the model is not loaded yet
    assert code == 130, stdout[-2000:] + stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (f"interrupted before the first checkpoint: nothing was saved in {tmp_path / 'run'}; "
                                               "the same command starts over")
    assert not train.checkpoint_dirs(tmp_path / "run")


def test_sigterm_checkpoints_like_ctrl_c_and_checkpoint_files_are_readable(tiny_model_dir, prepared, tmp_path):
    """Spot instances and schedulers stop a job with SIGTERM: the run finishes the step, checkpoints and exits
    143, and the same command resumes from there. Every checkpoint file gets the mode the umask gives (0644
    under 022), the weights too, which safetensors would leave 0600."""
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--model", str(tiny_model_dir), "--data", str(prepared),
               "--output_dir", str(tmp_path / "run"), *RESUME_FLAGS]
    code, stdout, stderr = interrupt_when(command, "{'loss'", tmp_path, signal.SIGTERM, umask=0o022)
    assert code == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-2000:]
    assert "SIGTERM: saving a checkpoint when this optimizer step ends" in stdout
    stopped_at = train.find_resumable_checkpoint(tmp_path / "run")
    assert stopped_at is not None and int(stopped_at.name.split("-")[1]) < 12
    assert stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM: {stopped_at} is saved; "
                                               "run the same command again to resume from it")
    assert "Traceback" not in stderr and not (tmp_path / "run" / "final").exists()
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in stopped_at.iterdir() if path.is_file()}
    assert "adapter_model.safetensors" in modes and "optimizer.pt" in modes and "run_config.json" in modes
    assert set(modes.values()) == {oct(0o644)}, modes


@pytest.mark.parametrize("cpu_bf16", ["0", "1"], ids=["cpu_without_bf16", "cpu_with_bf16"])
def test_evaluation_after_training_keeps_the_trained_precision(tiny_model_dir, prepared, tmp_path, cpu_bf16):
    """Both kinds of CPU, whichever this one is: UNSLOTH_CPU_BF16 overrides Unsloth's hardware check."""
    out = tmp_path / "dtypes.json"
    result = python(EVALUATE_AFTER_TRAINING, REPO_ROOT, out, "--model", tiny_model_dir, "--data", prepared,
                    "--max_seq_length", "1024", "--output_dir", tmp_path / "run", cwd=tmp_path,
                    env={"UNSLOTH_CPU_BF16": cpu_bf16})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dtypes = json.loads(out.read_text(encoding="utf-8"))
    assert dtypes["kept"] == dtypes["before"]
    assert "torch.float32" in dtypes["before"].values()
    # What the fallback did before: HF Trainer casts the float32 weights to bf16 for good.
    assert dtypes["plain_evaluate"] != dtypes["before"]


def test_save_merged_failure_is_one_line_and_final_is_kept(tiny_model_dir, prepared, tmp_path):
    """A real write failure: the merged 16-bit weights (~340 KB) exceed the file-size limit (RLIMIT_FSIZE),
    which the adapter, checkpoint and tokenizer files (< 160 KB each) stay under."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (250_000, 250_000))

    command = [sys.executable, str(REPO_ROOT / "train.py"), "--model", str(tiny_model_dir), "--data", str(prepared),
               "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--lora_r", "8", "--lora_alpha", "8", "--max_seq_length", "1024",
               "--save_merged", "--no-load_in_4bit"]
    result = subprocess.run(command, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=900,
                            preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --save_merged failed (") and "File too large" in last
    assert last.endswith(f"the adapter in {tmp_path / 'run' / 'final'} is saved")
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "final" / "run_config.json").is_file()
    assert not (tmp_path / "run" / "merged").exists() and not (tmp_path / "run" / ".merged.partial").exists()


def torchrun_command(*args) -> list[str]:
    """train.py in 2 processes on CPU (gloo), as `torchrun --standalone --nproc_per_node 2` (a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO_ROOT / "train.py"), *map(str, args)]


def torchrun(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args), env={**os.environ, **OFFLINE_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=1200)


def test_torchrun_preempted_by_sigterm_resumes_to_the_end(tiny_model_dir, prepared, tmp_path):
    """A preempted 2-process run: torchrun passes SIGTERM on to both processes, which agree to stop after the
    same step and checkpoint; the same command resumes (each process loads the optimizer state) to the last
    step. Without TORCH_ELASTIC_SHUTDOWN_TIMEOUT, rank 0 warns once that torchrun kills the processes after 30 s."""
    run = tmp_path / "run"
    command = torchrun_command("--model", tiny_model_dir, "--data", prepared, "--output_dir", run, *RESUME_FLAGS)
    unset = {key: value for key, value in os.environ.items()
             if key not in ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "PET_SHUTDOWN_TIMEOUT")}
    code, stdout, stderr = interrupt_when(command, "{'loss'", tmp_path, signal.SIGTERM, env=unset)
    assert code != 0, stdout[-2000:] + stderr[-2000:]
    assert stdout.count("TORCH_ELASTIC_SHUTDOWN_TIMEOUT is not set") == 1, stdout[-3000:]
    stopped_at = train.find_resumable_checkpoint(run)
    assert stopped_at is not None and int(stopped_at.name.split("-")[1]) < 6, stdout[-2000:] + stderr[-3000:]
    assert stderr.count(f"stopped by SIGTERM: {stopped_at} is saved; run the same command again to resume from it") == 1
    assert {p.name for p in stopped_at.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    resumed = subprocess.run(command, env={**os.environ, **OFFLINE_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"},
                             capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming from {stopped_at}" in resumed.stdout and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in resumed.stdout
    config = json.loads((run / "final" / "run_config.json").read_text(encoding="utf-8"))
    assert config["global_step"] == 6  # 8 rows in batches of 2, dealt to 2 processes: 2 steps per epoch, 3 epochs
    steps_logged = [e["step"] for e in json.loads((train.checkpoint_dirs(run)[0] / "trainer_state.json")
                                                  .read_text(encoding="utf-8"))["log_history"] if "loss" in e]
    assert steps_logged == list(range(1, 7)), "the resumed run continues the interrupted run's history"


def test_torchrun_two_processes_write_once_and_feed_infer(tiny_model_dir, memorize_data, tmp_path):
    """Each process trains on its half of every batch of 4 (2 per process): the pair memorizes the summaries
    the one-process run does; rank 0 alone prints and writes final/ and merged/; infer.py submits from final/."""
    data = tmp_path / "data"  # the memorized rows without dev.jsonl: no evaluation every step
    data.mkdir()
    for name in ("train.jsonl", "stats.json"):
        (data / name).write_bytes((memorize_data["prepared"] / name).read_bytes())
    flags = [*MEMORIZE_FLAGS, "--per_device_train_batch_size", "2", "--save_total_limit", "2", "--no-load_in_4bit"]
    result = torchrun("--model", tiny_model_dir, "--data", data, "--output_dir", tmp_path / "run", *flags, "--save_merged")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for once in ("no GPU found, training on CPU", "steps per epoch", "adapter, tokenizer, run_config.json and loss.png ->",
                 "merged 16-bit model ->", "next: "):
        assert out.count(once) == 1, (once, out)
    assert "2 processes" in out and "Traceback" not in result.stderr
    run = tmp_path / "run"
    config = json.loads((run / "final" / "run_config.json").read_text(encoding="utf-8"))
    assert config["global_step"] == 60 and config["device"].startswith("2 processes x CPU")
    for name in ("adapter_model.safetensors", "tokenizer.json", "loss.png"):
        assert (run / "final" / name).is_file(), name
    assert (run / "merged" / "model.safetensors").is_file() and (run / "merged" / "config.json").is_file()
    assert not list(run.glob(".*.partial"))
    assert [p.name for p in train.checkpoint_dirs(run)] == ["checkpoint-60", "checkpoint-59"]
    assert {p.name for p in (run / "checkpoint-60").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    records = [{**record, "output": ""} for record in memorize_data["records"]]
    (tmp_path / "test.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    inferred = run_script(["infer.py", "--model", run / "final", "--input", "test.json", "--batch_size", "4",
                           "--max_new_tokens", "256"], cwd=tmp_path)
    assert inferred.returncode == 0, inferred.stdout[-3000:] + inferred.stderr[-3000:]
    submission = json.loads((tmp_path / "submission.json").read_text(encoding="utf-8"))
    progress.check_submission(submission, records, "submission.json")
    assert [r["output"] for r in submission] == [r["output"].strip() for r in memorize_data["records"]]


class RefusingHub:
    """A loopback stand-in for the Hugging Face Hub API: it records every request, creates repos and refuses
    everything else (403), so a push gets as far as creating its repo and then fails."""

    def __init__(self):
        self.requests: list[tuple[str, str, bytes]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append((self.command, self.path, body))
                if self.command == "POST" and self.path == "/api/repos/create":
                    name = json.loads(body)
                    status, reply = 200, {"url": f"{hub.url}/{name['organization']}/{name['name']}"}
                else:
                    status, reply = 403, {"error": "this test hub accepts no uploads"}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> "RefusingHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_push_to_hub_creates_a_private_repo_and_a_failed_upload_is_one_line(tiny_model_dir, prepared, tmp_path):
    with RefusingHub() as hub:
        result = run_script(["train.py", "--model", tiny_model_dir, "--data", prepared, "--output_dir", tmp_path / "run",
                             "--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                             "--lora_r", "8", "--lora_alpha", "8", "--max_seq_length", "1024", "--push_to_hub", "me/dcs-lora"],
                            env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_TOKEN": "hf_test"})
    created = [json.loads(body) for method, path, body in hub.requests if path == "/api/repos/create"]
    assert created and all(c.get("visibility") == "private" or c.get("private") is True for c in created), created
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --push_to_hub failed (") and "Traceback" not in result.stderr
    assert last.endswith(f"the adapter in {tmp_path / 'run' / 'final'} is saved")
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Bad settings: one line, non-zero exit, files untouched
# ---------------------------------------------------------------------------------------------

def test_help_answers_without_heavy_imports(tmp_path):
    result = run_script(["train.py", "--help"])
    assert result.returncode == 0
    for flag in ("--learning_rate", "--per_device_train_batch_size", "--gradient_accumulation_steps", "--lora_r",
                 "--max_seq_length", "--resume_from_checkpoint", "--config", "--save_merged", "--push_to_hub"):
        assert flag in result.stdout
    code = "import sys; sys.path.insert(0, sys.argv[1]); import train; print(sorted(m for m in ('torch', 'transformers', 'unsloth', 'trl', 'datasets') if m in sys.modules))"
    imported = python(code, REPO_ROOT, cwd=tmp_path)
    assert imported.stdout.strip() == "[]"


def test_missing_data_dir(tmp_path):
    result = run_script(["train.py", "--data", tmp_path / "nope", "--output_dir", tmp_path / "out"])
    assert_one_line_error(result, "nope: data directory not found", "prep.py")
    assert not (tmp_path / "out").exists()


def test_empty_train_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("\n", encoding="utf-8")
    assert_one_line_error(run_script(["train.py", "--data", tmp_path / "data"]), "train.jsonl: no rows to train on")


def test_bad_row_names_file_line_and_field(tmp_path, prepared):
    (tmp_path / "data").mkdir()
    rows = read_jsonl(prepared / "train.jsonl")
    rows[1]["completion"] = "not a message list"
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert_one_line_error(run_script(["train.py", "--data", tmp_path / "data"]), "train.jsonl line 2", rows[1]["id"], "'completion'")


def test_row_longer_than_max_seq_length_is_refused(tiny_model_dir, prepared, tmp_path):
    result = run_script(["train.py", "--model", tiny_model_dir, "--data", prepared, "--output_dir", tmp_path / "out",
                         "--max_seq_length", "150"])
    assert_one_line_error(result, "longer than --max_seq_length 150", "prep.py --max_seq_length 150")
    assert not (tmp_path / "out").exists()


def test_unknown_flag():
    assert_one_line_error(run_script(["train.py", "--lora_rank", "8"]), "unrecognized arguments: --lora_rank")
    # A prefix of a real flag is a typo too, not a silent --learning_rate.
    assert_one_line_error(run_script(["train.py", "--learning_rat", "1"]), "unrecognized arguments: --learning_rat")


def test_bad_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: [1e-4\nlora_r: 8\n", encoding="utf-8")
    assert_one_line_error(run_script(["train.py", "--config", config]), "run.yaml: not valid YAML (line")
    config.write_text("lora_rank: 8\n", encoding="utf-8")
    assert_one_line_error(run_script(["train.py", "--config", config]), "unknown setting 'lora_rank'")


def test_finished_run_is_not_overwritten(tmp_path, prepared):
    final = tmp_path / "out" / "final"
    final.mkdir(parents=True)
    (final / "run_config.json").write_text('{"global_step": 7}', encoding="utf-8")
    result = run_script(["train.py", "--data", prepared, "--output_dir", tmp_path / "out"])
    assert_one_line_error(result, "holds a finished run", "--overwrite_output_dir")
    assert (final / "run_config.json").read_text(encoding="utf-8") == '{"global_step": 7}'


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "0"], "--lora_r must be a positive integer"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    (["--max_steps", "0"], "--max_steps must be a positive integer or -1"),
])
def test_impossible_settings(flags, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        train.check_settings(train.parse_train_settings(flags))


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------

def test_yaml_supplies_defaults_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 2e-4\nlora_r: 16\nnum_train_epochs: 3\ntarget_modules: [q_proj, v_proj]\n"
                      "load_in_4bit: false\npush_to_hub: null\n", encoding="utf-8")
    cfg = train.parse_train_settings(["--config", str(config), "--lora_r", "32"])
    assert cfg.learning_rate == 2e-4, "YAML 1.1 reads 2e-4 as a string: it is converted like a flag"
    assert cfg.lora_r == 32 and cfg.num_train_epochs == 3.0 and isinstance(cfg.num_train_epochs, float)
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.load_in_4bit is False
    assert cfg.gradient_accumulation_steps == 16 and cfg.config == str(config)
    config.write_text("lora_r: 1.5\n", encoding="utf-8")
    with pytest.raises(UserError, match="key 'lora_r' must be an integer"):
        train.parse_train_settings(["--config", str(config)])


def test_defaults_are_the_seed_teams_run_on_24gb():
    cfg = train.parse_train_settings([])
    assert (cfg.model, cfg.max_seq_length, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == ("unsloth/gemma-2-9b-it-bnb-4bit", 8192, 64, 64, 0.05)
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 16 and cfg.per_device_train_batch_size == 1
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.weight_decay, cfg.warmup_steps, cfg.lr_scheduler_type, cfg.optim, cfg.seed) == \
        (2e-5, 5.0, 0.05, 20, "cosine", "adamw_8bit", 42)
    assert cfg.target_modules == train.SEVEN_PROJECTIONS and cfg.load_in_4bit


@pytest.mark.parametrize("rows, batch, accumulation, processes, steps", [
    (506, 1, 16, 1, 32), (506, 4, 4, 1, 32), (8, 2, 1, 1, 4), (8, 4, 1, 1, 2), (3, 4, 4, 1, 1),
    (506, 1, 16, 2, 16), (506, 1, 16, 4, 8), (8, 2, 1, 2, 2), (7, 2, 1, 2, 2), (4, 2, 1, 2, 1),
])
def test_steps_per_epoch_matches_trainer(rows, batch, accumulation, processes, steps):
    assert train.steps_per_epoch(rows, batch, accumulation, processes) == steps


def test_merge_space_problem_names_need_and_free(tmp_path):
    gemma2_9b_16bit = 9_241_705_984 * 2  # parameters x 2 bytes: the merged folder and the base download it starts from
    problem = train.merge_space_problem(gemma2_9b_16bit, 12 * 2**30, tmp_path)
    assert problem == f"--save_merged needs about 18.1 GiB free in {tmp_path} for the 16-bit merge, 12.0 GiB free; free some space or drop --save_merged"
    assert train.merge_space_problem(gemma2_9b_16bit, 40 * 2**30, tmp_path) is None
    assert train.merge_space_problem(gemma2_9b_16bit, None, tmp_path) is None, "an unmeasurable disk does not block"


def test_resume_skips_a_half_written_checkpoint(tmp_path):
    for step, complete in [(2, True), (4, True), (6, False)]:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if complete:
            (path / "trainer_state.json").write_text(json.dumps({"global_step": step}), encoding="utf-8")
    (tmp_path / "checkpoint-10").write_text("a file, not a checkpoint", encoding="utf-8")
    assert train.find_resumable_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert train.find_resumable_checkpoint(tmp_path / "missing") is None


def test_loss_curves_split_train_and_eval():
    history = [{"loss": 3.0, "step": 1}, {"eval_loss": 2.5, "step": 1}, {"loss": 2.0, "step": 2}, {"train_runtime": 1.0, "step": 2}]
    assert train.loss_curves(history) == ([(1, 3.0), (2, 2.0)], [(1, 2.5)])


def test_shutdown_timeout_warning_only_for_several_processes_without_a_timeout():
    assert train.shutdown_timeout_warning({}) is None
    assert train.shutdown_timeout_warning({"WORLD_SIZE": "1"}) is None
    warning = train.shutdown_timeout_warning({"WORLD_SIZE": "2"})
    assert warning is not None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300 torchrun" in warning
    assert train.shutdown_timeout_warning({"WORLD_SIZE": "2", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}) is None
    assert train.shutdown_timeout_warning({"WORLD_SIZE": "2", "PET_SHUTDOWN_TIMEOUT": "300"}) is None


def bf16_lora_adapter(base: Path, path: Path, seed: int) -> Path:
    """A real PEFT LoRA adapter of the tiny base with non-zero A and B, saved in bf16 as training saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.to(torch.bfloat16).save_pretrained(str(path))
    run_config = {"system_prompt": False, "max_seq_length": 256, "load_in_4bit": False}
    (path / "run_config.json").write_text(json.dumps(run_config), encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_merge_writes_the_adapters_dtype_for_every_method(tiny_model_dir, tmp_path, method):
    """Issue 17 item 14: PEFT builds a linear merge in fp32 (and on CPU a cat merge too); the merged adapter is
    written in the dtype the adapters were trained and saved in."""
    from safetensors import safe_open

    a, b = (bf16_lora_adapter(tiny_model_dir, tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2)))
    result = run_script(["train.py", "merge", "--adapters", a, b, "--method", method,
                         "--output_dir", tmp_path / "merged"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with safe_open(str(tmp_path / "merged" / "adapter_model.safetensors"), "pt") as handle:
        assert {str(handle.get_tensor(key).dtype) for key in handle.keys()} == {"torch.bfloat16"}
