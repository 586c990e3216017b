"""--engine vllm: vLLM's CPU build (.venv-vllm, built by tests/run.sh) runs train.py's final/ as a LoRA
adapter on its base model and gives back what the default engine gives.

The model is a tiny Gemma 2 with head_dim 64 (conftest.VLLM_SHAPE): vLLM's CPU attention has no kernel
for the default fixture's 16. Each vLLM start costs a minute or more on two cores, so each test starts one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import generate
from conftest import (OFFLINE_ENV, REPO_ROOT, VLLM_PYTHON, VLLM_SHAPE, assert_one_line_error,
                      build_tiny_gemma2, run_script, train_memorized)
from common import UserError
from test_score import tiny_bert_dir, tiny_bleurt_dir  # noqa: F401  (fixtures: BERTScore and BLEURT after a vLLM run)

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


def unsloth_int_to_float_mapper() -> dict:
    """Unsloth's own table of 4-bit checkpoints and their 16-bit originals, read from unsloth/models/mapper.py
    without importing unsloth (the file holds data and two small functions, no imports)."""
    package = importlib.util.find_spec("unsloth")
    path = Path(package.submodule_search_locations[0]) / "models" / "mapper.py"
    spec = importlib.util.spec_from_file_location("unsloth_mapper", path)
    mapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mapper)
    return mapper.INT_TO_FLOAT_MAPPER


def test_sixteen_bit_original_agrees_with_unsloths_mapper_for_gemma_2():
    mapper = unsloth_int_to_float_mapper()
    gemma2 = {name: original for name, original in mapper.items()
              if name.startswith("unsloth/gemma-2-") and name.endswith("-bnb-4bit")}
    assert "unsloth/gemma-2-9b-it-bnb-4bit" in gemma2 and len(gemma2) >= 6
    assert {name: generate.sixteen_bit_original(name) for name in gemma2} == gemma2
    dynamic = "unsloth/Llama-3.2-1B-Instruct-unsloth-bnb-4bit"  # Unsloth's dynamic 4-bit naming
    assert generate.sixteen_bit_original(dynamic) == "unsloth/Llama-3.2-1B-Instruct"
    assert generate.sixteen_bit_original("google/gemma-2-9b-it") is None


def test_sixteen_bit_original_of_a_local_folder_is_its_sibling_when_there_is_one(tmp_path):
    quantized = tmp_path / "tiny-bnb-4bit"
    quantized.mkdir()
    assert generate.sixteen_bit_original(str(quantized)) is None
    (tmp_path / "tiny").mkdir()
    assert generate.sixteen_bit_original(str(quantized)) == str(tmp_path / "tiny")
    assert generate.sixteen_bit_original(str(quantized) + "/") == str(tmp_path / "tiny")


def write_config(folder: Path, quant_method: str | None) -> Path:
    folder.mkdir(parents=True)
    config = {"model_type": "gemma2"}
    if quant_method:
        config["quantization_config"] = {"quant_method": quant_method}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_vllm_model_serves_the_16_bit_original_and_refuses_bitsandbytes(tmp_path):
    quantized = str(write_config(tmp_path / "a" / "tiny-bnb-4bit", "bitsandbytes"))
    plain = str(write_config(tmp_path / "b" / "tiny", None))
    assert generate.vllm_model("unsloth/gemma-2-9b-it-bnb-4bit", None) == (
        "unsloth/gemma-2-9b-it", "the 16-bit original of unsloth/gemma-2-9b-it-bnb-4bit")
    assert generate.vllm_model(plain, None) == (plain, "as trained")
    assert generate.vllm_model(quantized, plain) == (plain, "--vllm_base_model")
    fp8 = str(write_config(tmp_path / "fp8", "fp8"))
    assert generate.vllm_model(fp8, None) == (fp8, "as trained")  # a quantization vLLM loads
    for name, chosen in ((quantized, None), (plain, quantized), (plain, "unsloth/gemma-2-9b-it-bnb-4bit")):
        with pytest.raises(UserError, match="bitsandbytes 4-bit checkpoint, which vLLM cannot load.*--vllm_base_model"):
            generate.vllm_model(name, chosen)
    write_config(tmp_path / "a" / "tiny", None)  # its 16-bit original beside it
    assert generate.vllm_model(quantized, None) == (str(tmp_path / "a" / "tiny"), f"the 16-bit original of {quantized}")


def test_start_error_reason_is_the_line_that_says_why():
    reason = ("torch.float32 is not supported for quantization method fp8_per_tensor. "
              "Supported dtypes: [torch.bfloat16, torch.float16]")
    pydantic = (f"1 validation error for VllmConfig\n  Value error, {reason} [type=value_error, "
                f"input_value=ArgsKwargs((), {{'model_co...}}), input_type=ArgsKwargs]\n"
                f"    For further information visit https://errors.pydantic.dev/2.14/v/value_error")
    assert generate.start_error_reason(ValueError(pydantic)) == reason
    engine = RuntimeError("Engine core initialization failed. See root cause above.\nFailed core proc(s): {}")
    assert generate.start_error_reason(engine) == "Engine core initialization failed. See root cause above."
    assert generate.start_error_reason(RuntimeError()) == "RuntimeError"


def test_bert_score_is_pinned_for_the_vllm_venv_as_for_the_default_one():
    """BERTScore is a third of the final score; without bert-score in .venv-vllm a vLLM run silently skips it."""
    def pins(name: str) -> dict:
        lines = (REPO_ROOT / name).read_text(encoding="utf-8").splitlines()
        return dict(line.split("#")[0].strip().split("==") for line in lines if "==" in line.split("#")[0])

    assert pins("requirements-vllm.txt")["bert-score"] == pins("requirements.txt")["bert-score"]


# Saves a model folder pre-quantized, as Unsloth's `-bnb-4bit` Hub repos are: config.json carries a bitsandbytes
# quantization_config and the weights are stored 4-bit.
QUANTIZE_4BIT = """
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=torch.float32).save_pretrained(dst)
for path in [*src.glob("tokenizer*"), *src.glob("chat_template*"), src / "generation_config.json"]:
    shutil.copy(path, dst)
"""


def save_4bit(original: Path, quantized: Path) -> Path:
    subprocess.run([sys.executable, "-c", QUANTIZE_4BIT, str(original), str(quantized)], check=True,
                   capture_output=True, env={**os.environ, **OFFLINE_ENV}, timeout=600)
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    return quantized


@pytest.fixture(scope="module")
def bnb_4bit_run(tmp_path_factory) -> dict:
    """train_memorized on a VLLM_SHAPE tiny Gemma 2 saved pre-quantized (`tiny-bnb-4bit`), as the default run trains on
    unsloth/gemma-2-9b-it-bnb-4bit, with the 16-bit model it was quantized from beside it (`tiny`)."""
    root = tmp_path_factory.mktemp("bnb_4bit")
    original = build_tiny_gemma2(root / "tiny", **VLLM_SHAPE)
    quantized = save_4bit(original, root / "tiny-bnb-4bit")
    run = train_memorized(quantized, tmp_path_factory.mktemp("memorized_bnb_4bit"))
    return {**run, "original": original, "quantized": quantized}


def test_a_run_trained_on_a_bnb_4bit_base_is_served_on_its_16_bit_original_and_scored_after_vllm_shuts_down(
        tmp_path, vllm_python, bnb_4bit_run, tiny_bert_dir, tiny_bleurt_dir):  # noqa: F811
    """The default run's path: QLoRA on a `-bnb-4bit` base, then --engine vllm, which has no bitsandbytes support.
    vLLM serves the adapter on the 16-bit sibling; its engine process has ended before BERTScore and BLEURT load."""
    records = bnb_4bit_run["records"]
    (tmp_path / "memorized.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    result = run_script(["infer.py", "--model", bnb_4bit_run["run"] / "final", "--input", "memorized.json",
                         "--max_new_tokens", "256", "--bertscore_model", tiny_bert_dir, "--bertscore_layers", "2",
                         "--bleurt_model", tiny_bleurt_dir, *VLLM_CPU_FLAGS], cwd=tmp_path, python=vllm_python)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    original, quantized = bnb_4bit_run["original"], bnb_4bit_run["quantized"]
    assert f"generating with the adapter on {original} (the 16-bit original of {quantized})" in out
    closed = out.index("vllm engine closed before scoring: vLLM shut down, ")
    assert "1 engine process(es) ended, 0 still running" in out[closed:].splitlines()[0]
    assert closed < out.index("scoring against the input's outputs")
    scores = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert scores["skipped"] == {} and scores["computed"] == ["bertscore", "bleurt", "rouge1"]
    assert scores["final"] is not None
    # Trained on the 4-bit weights, served on the 16-bit ones: the memorized summaries come back (exactly, on the
    # machine this was written on; a near-tie may flip a word elsewhere). A wrong base would score near 0.
    assert scores["means"]["rouge1"] > 0.9


def test_a_bnb_4bit_model_without_a_16_bit_original_is_refused_in_one_line(tmp_path, vllm_python, tiny_model_dir):
    """No sibling without the suffix and no --vllm_base_model: one line naming the fix, before vLLM starts, for
    infer.py and for distill.py's local teacher; an unknown --vllm_quantization likewise, and vLLM's own refusal of
    fp8 on 32-bit weights comes back as its reason in one line."""
    quantized = save_4bit(tiny_model_dir, tmp_path / "models" / "lonely-bnb-4bit")
    work = tmp_path / "work"
    work.mkdir()
    sample = REPO_ROOT / "data/sample/test.json"
    refusal = (str(quantized), "bitsandbytes 4-bit checkpoint, which vLLM cannot load", "--vllm_base_model")
    result = run_script(["infer.py", "--model", quantized, "--input", sample, *VLLM_CPU_FLAGS], cwd=work,
                        python=vllm_python)
    assert_one_line_error(result, *refusal)
    result = run_script(["distill.py", "distill", "--input", sample, "--output", "teacher.jsonl", "--teacher_url",
                         "local", "--teacher_model", quantized, *VLLM_CPU_FLAGS], cwd=work, python=vllm_python)
    assert_one_line_error(result, *refusal)
    result = run_script(["infer.py", "--model", quantized, "--input", sample, "--vllm_base_model", tiny_model_dir,
                         "--vllm_quantization", "bitsandbytes", *VLLM_CPU_FLAGS], cwd=work, python=vllm_python)
    assert_one_line_error(result, "--vllm_quantization bitsandbytes: not a method this vLLM knows", "fp8_per_tensor")
    # fp8_per_tensor reaches vLLM, whose config check (before any engine starts) wants 16-bit weights to quantize;
    # on a GPU it then quantizes them as they load, a kernel the CPU build lacks (static_scaled_fp8_quant).
    result = run_script(["infer.py", "--model", quantized, "--input", sample, "--vllm_base_model", tiny_model_dir,
                         "--vllm_quantization", "fp8_per_tensor", *VLLM_CPU_FLAGS], cwd=work, python=vllm_python)
    assert_one_line_error(result, "vLLM could not start (torch.float32 is not supported for quantization method "
                                  "fp8_per_tensor. Supported dtypes: [torch.bfloat16, torch.float16];")
    assert list(work.iterdir()) == []
