"""--engine vllm: vLLM's CPU build (.venv-vllm, built by tests/run.sh) runs train.py's final/ as a LoRA
adapter on its base model and gives back what the default engine gives.

The model is a tiny Gemma 2 with head_dim 64 (conftest.VLLM_SHAPE): vLLM's CPU attention has no kernel
for the default fixture's 16. Each vLLM start costs a minute or more on two cores, so each test starts one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO_ROOT, VLLM_PYTHON, assert_one_line_error, run_script

# Eager mode skips minutes of torch.compile on CPU; float32 as the tiny checkpoint; 5% of RAM for the KV cache.
VLLM_CPU_FLAGS = ["--engine", "vllm", "--enforce_eager", "--dtype", "float32", "--gpu_memory_utilization", "0.05"]


def test_vllm_engine_from_the_unsloth_venv_is_one_line(tmp_path, tiny_model_dir):
    result = run_script(["infer.py", "--engine", "vllm", "--model", tiny_model_dir, "--input", REPO_ROOT / "data/sample/test.json",
                         "--output", "sub.json"], cwd=tmp_path)
    assert_one_line_error(result, "--engine vllm: vLLM is not installed in this Python", ".venv-vllm")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    assert VLLM_PYTHON.is_file(), f"{VLLM_PYTHON} is missing: bash tests/run.sh builds it"
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def memorized_input(vllm_memorized_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm_input") / "memorized.json"
    path.write_text(json.dumps(vllm_memorized_run["records"], ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def test_vllm_engine_reproduces_memorized_summaries_like_the_default_engine(tmp_path, vllm_python, vllm_memorized_run, memorized_input):
    final = vllm_memorized_run["run"] / "final"
    expected = [r["output"].strip() for r in vllm_memorized_run["records"]]
    common = ["--model", final, "--input", memorized_input, "--max_new_tokens", "256", "--metrics", "rouge1"]

    default_dir, vllm_dir = tmp_path / "default", tmp_path / "vllm"
    default_dir.mkdir()
    vllm_dir.mkdir()
    result = run_script(["infer.py", *common, "--no-load_in_4bit"], cwd=default_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    by_default = [r["output"] for r in json.loads((default_dir / "memorized_pred.json").read_text(encoding="utf-8"))]
    assert by_default == expected

    result = run_script(["infer.py", *common, *VLLM_CPU_FLAGS], cwd=vllm_dir, python=vllm_python)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "generating 4 summaries (vllm engine" in result.stdout
    text = (vllm_dir / "memorized_pred.json").read_text(encoding="utf-8")
    by_vllm = [r["output"] for r in json.loads(text)]
    assert by_vllm == by_default == expected
    assert [r["id"] for r in json.loads(text)] == [r["id"] for r in vllm_memorized_run["records"]]
    assert not (vllm_dir / "memorized_pred.json.partial.jsonl").exists()
    assert json.loads((vllm_dir / "scores.json").read_text(encoding="utf-8"))["means"]["rouge1"] == pytest.approx(1.0)


SAMPLES_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import generate
from pathlib import Path

if __name__ == "__main__":  # vLLM spawns its engine process, which imports this module again
    settings = generate.EngineSettings(engine="vllm", enforce_eager=True, dtype="float32", gpu_memory_utilization=0.05)
    engine = generate.open_engine(sys.argv[2], generate.read_run_config(Path(sys.argv[2])), settings,
                                  batch_size=8, max_seq_length=None, load_in_4bit=None)
    prompts = [generate.chat_prompt(engine.tokenizer, record, False) for record in json.loads(open(sys.argv[3], encoding="utf-8").read())]
    finished = []
    greedy = engine.generate_candidates(prompts, generate.Sampling(256), 1, on_finished=lambda i, texts, n: finished.append(i))
    sampled = engine.generate_candidates(prompts, generate.Sampling(256, do_sample=True, temperature=1.5), 8)
    with open(sys.argv[4], "w", encoding="utf-8") as handle:
        json.dump({"greedy": greedy, "sampled": sampled, "finished": finished}, handle, ensure_ascii=False)
"""


def test_vllm_engine_returns_n_samples_per_prompt(tmp_path, vllm_python, vllm_memorized_run, memorized_input):
    """--num_samples through vLLM: SamplingParams(n) gives n candidates per prompt, reported as each prompt finishes."""
    script = tmp_path / "samples.py"
    script.write_text(SAMPLES_SCRIPT, encoding="utf-8")
    out = tmp_path / "found.json"
    result = run_script([script, REPO_ROOT, vllm_memorized_run["run"] / "final", memorized_input, out], cwd=tmp_path, python=vllm_python)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(out.read_text(encoding="utf-8"))
    expected = [r["output"].strip() for r in vllm_memorized_run["records"]]
    assert found["greedy"] == [[text] for text in expected]
    assert sorted(found["finished"]) == [0, 1, 2, 3]
    assert [len(candidates) for candidates in found["sampled"]] == [8, 8, 8, 8]
    assert any(len(set(candidates)) > 1 for candidates in found["sampled"])  # sampled at temperature 1.5, not 8 greedy copies


def test_distill_local_teacher_through_vllm(tmp_path, vllm_python, vllm_memorized_run, memorized_input):
    """distill.py distill --teacher_url local --engine vllm: the memorized model, as a teacher, writes the summaries it learned."""
    out = tmp_path / "teacher.jsonl"
    result = run_script(["distill.py", "distill", "--input", memorized_input, "--output", out, "--teacher_url", "local",
                         "--teacher_model", vllm_memorized_run["run"] / "final", "--max_new_tokens", "400", *VLLM_CPU_FLAGS],
                        cwd=tmp_path, python=vllm_python)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    by_id = {row["id"]: row["output"] for row in rows}
    assert by_id == {r["id"]: r["output"].strip() for r in vllm_memorized_run["records"]}
