"""Benchmark: train.py's three stages on the same rows through their real command lines: SFT on prep.py's rows of
the sample data, then DPO and KTO continuing that SFT adapter on pairs built from the same rows (the reference
summary chosen, a corrupted one rejected). Prints seconds per optimizer step and the peak memory (RSS) of each run.

    .venv/bin/python tests/benchmarks/bench_stages.py                  # tiny random Gemma 2 on CPU
    .venv/bin/python tests/benchmarks/bench_stages.py --steps 16 --batch 4

Every stage runs `--per_device_train_batch_size --batch` with no accumulation, so one step holds: SFT `batch` rows;
DPO `batch` pairs (2 x batch sequences through the policy, and again through the frozen reference adapter); KTO
`batch` rows (each also paired with another row's answer for its KL term, both through policy and reference).
Seconds per step are the trainer's train_runtime over its steps, one checkpoint save included in each stage.
Peak RSS is the process's ru_maxrss (os.wait4), the model load included. Run by hand, not by pytest.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "COLUMNS": "200"}


def run(args: list, cwd: Path, log_name: str) -> tuple[int, str]:
    """Run a repo script: (its peak RSS in KiB, Linux ru_maxrss; its output), or stop with its log on failure."""
    log_path = cwd / f"{log_name}.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / args[0]), *map(str, args[1:])], cwd=cwd,
                                env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    output = log_path.read_text(encoding="utf-8")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{args[0]} failed:\n{output[-3000:]}")
    return usage.ru_maxrss, output


def seconds_per_step(output: str, output_dir: Path) -> tuple[float, int]:
    """The trainer's train_runtime (its closing log line) over the run's optimizer steps."""
    runtime = float(re.findall(r"'train_runtime': '([0-9.]+)'", output)[-1])
    steps = json.loads((output_dir / "final" / "run_config.json").read_text(encoding="utf-8"))["global_step"]
    return runtime / steps, steps


def write_pairs(prepared: Path, run_config: dict, path: Path) -> int:
    rows = [json.loads(line) for line in (prepared / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            words = row["completion"][0]["content"].split(" ")
            rejected = " ".join(words[len(words) // 2:] + words[:len(words) // 2])
            out.write(json.dumps({
                "id": row["id"], "prompt": row["prompt"], "chosen": row["completion"],
                "rejected": [{"role": "assistant", "content": rejected}], "base_model": run_config["base_model"],
                "prompt_settings": {k: run_config[k] for k in ("system_prompt", "clean_inputs", "target_format")},
            }, ensure_ascii=False) + "\n")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per stage")
    parser.add_argument("--batch", type=int, default=2, help="per-device micro-batch (KTO needs 2 or more)")
    args = parser.parse_args()
    from tiny_model import build_tiny_gemma2

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_gemma2(root / "tiny")
        sample = REPO / "data" / "sample"
        run(["prep.py", "--train", sample / "train.json", "--dev", sample / "dev.json", "--out", root / "prepared",
             "--tokenizer", model, "--max_seq_length", "1024"], root, "prep")
        (root / "prepared" / "dev.jsonl").unlink()  # no evaluation inside the SFT timing
        common = ["--max_steps", args.steps, "--per_device_train_batch_size", args.batch,
                  "--gradient_accumulation_steps", 1,
                  "--learning_rate", "1e-3", "--warmup_steps", 0, "--save_steps", args.steps, "--save_total_limit", 1]
        results = {}
        rss, output = run(["train.py", "--model", model, "--data", root / "prepared", "--output_dir", root / "sft",
                           "--max_seq_length", "1024", "--lora_r", "16", "--lora_alpha", "16", *common], root, "sft")
        results["sft"] = (*seconds_per_step(output, root / "sft"), rss)
        sft_config = json.loads((root / "sft" / "final" / "run_config.json").read_text(encoding="utf-8"))
        n_pairs = write_pairs(root / "prepared", sft_config, root / "pairs.jsonl")
        for stage in ("dpo", "kto"):
            rss, output = run(["train.py", "--stage", stage, "--init_adapter", root / "sft" / "final",
                               "--preference_data", root / "pairs.jsonl", "--output_dir", root / stage, *common],
                              root, stage)
            results[stage] = (*seconds_per_step(output, root / stage), rss)

    print(f"\n{n_pairs} rows / pairs of data/sample, micro-batch {args.batch}, {args.steps} steps, CPU "
          f"({os.cpu_count()} cores), tiny Gemma 2")
    print(f"{'stage':<6} {'s/step':>8} {'steps':>6} {'peak RSS MiB':>13} {'s/step vs SFT':>14}")
    for stage, (per_step, steps, rss) in results.items():
        print(f"{stage:<6} {per_step:>8.3f} {steps:>6} {rss / 1024:>13.0f} {per_step / results['sft'][0]:>13.2f}x")


if __name__ == "__main__":
    main()
