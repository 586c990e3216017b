"""infer.py: scoring by hand, bad input, batched == one-at-a-time, interruption + resume, memorization.

Model runs go through the real command line on the tiny Gemma 2 from conftest.py. Generation tests use
the LoRA that conftest's `memorized_run` trained with train.py, loaded on 16-bit base weights for speed
(bitsandbytes' 4-bit CPU kernels cost ~0.2 s per generated token): the random base model mostly emits
special tokens, which decode to empty summaries that infer.py rightly refuses to submit.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import generate  # import-light by design: no torch, no unsloth
import infer
import progress
import score
from conftest import OFFLINE_ENV, REPO_ROOT as REPO, assert_one_line_error, run_script
from common import UserError
from prep import validate_record

ENV = {**os.environ, **OFFLINE_ENV}
FAST = ["--no-load_in_4bit", "--max_new_tokens", "16"]


def run_infer(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_script(["infer.py", *args], cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory) -> Path:
    """All 14 sample records (train + dev + test) in one file; test outputs empty, so no scoring."""
    records = []
    for name in ("train", "dev", "test"):
        records += json.loads((REPO / "data/sample" / f"{name}.json").read_text(encoding="utf-8"))
    path = tmp_path_factory.mktemp("mixed") / "mixed.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Pure pieces: schedule, shortening, partial file, submission check
# ---------------------------------------------------------------------------------------------

def test_length_sorted_schedule_and_padding_waste():
    lengths = [5, 100, 7, 98, 6, 99]
    batches = generate.plan_batches(lengths, 2)
    assert batches == [[1, 5], [3, 2], [4, 0]]
    assert sorted(i for b in batches for i in b) == list(range(6))
    waste_sorted = generate.padding_waste(lengths, batches)
    waste_input_order = generate.padding_waste(lengths, [[0, 1], [2, 3], [4, 5]])
    assert waste_sorted < 0.35 < waste_input_order


def test_batches_are_budgeted_by_tokens():
    lengths = [100, 10, 12, 90, 11, 13]
    # 250 token positions with 20 new tokens each: 2 rows padded to 100 + 20, then 7 rows of 13 + 20 (capped at 4 rows)
    assert generate.plan_batches(lengths, 4, max_new_tokens=20, max_batch_tokens=250) == [[0, 3], [5, 2, 4, 1]]
    assert generate.plan_batches(lengths, 4, max_new_tokens=20, max_batch_tokens=50) == [[0], [3], [5], [2], [4], [1]]  # never below one row


def cuda_out_of_memory():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def cublas_alloc_failed():
    # What torch raises when cuBLAS cannot get memory for a handle (ATen/cuda/Exceptions.h, TORCH_CUDABLAS_CHECK).
    return RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")


def cpu_allocator_failure():
    """A real failed allocation: 2**50 bytes lie beyond any x86-64 / arm64 user address space (2**47-2**48)."""
    import torch

    try:
        torch.empty(2**50, dtype=torch.uint8)
    except RuntimeError as error:
        return error
    raise AssertionError("a petabyte was allocated")


class FakeGPU:
    """A generate() stand-in that runs out of memory above `capacity` token positions (and, with `heads`, above
    `attention_capacity` bytes of prefill attention), the way a CUDA allocator would: a real torch / cuBLAS
    error (`error()`), raised by our own function, not a library mock."""

    def __init__(self, lengths, max_new_tokens, capacity, huge=(), error=cuda_out_of_memory, heads=0,
                 attention_capacity=None):
        self.error = error
        self.lengths, self.max_new_tokens, self.capacity, self.huge = lengths, max_new_tokens, capacity, set(huge)
        self.heads, self.attention_capacity = heads, attention_capacity
        self.calls, self.freed, self.done, self.set_aside, self.said = [], 0, {}, [], []

    def run(self, indices):
        self.calls.append(list(indices))
        longest = max(self.lengths[i] for i in indices)
        tokens = generate.batch_tokens(len(indices), longest, self.max_new_tokens)
        attention = generate.prefill_attention_bytes(len(indices), longest, self.heads)
        if tokens > self.capacity or self.huge & set(indices) or (
                self.attention_capacity is not None and attention > self.attention_capacity):
            raise self.error()
        return [f"summary {i}" for i in indices], len(indices) * self.max_new_tokens

    def schedule(self, max_batch_size, max_batch_tokens, max_attention_bytes=None):
        generate.run_batches(
            self.lengths, self.run, max_new_tokens=self.max_new_tokens, max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens, heads=self.heads, max_attention_bytes=max_attention_bytes,
            free_memory=self.free, on_batch=self.finished, on_set_aside=self.set_aside.append, say=self.said.append,
        )

    def free(self):
        self.freed += 1

    def finished(self, indices, texts, new_tokens):
        assert not set(indices) & set(self.done), "a prompt ran twice"
        self.done.update(zip(indices, texts))


@pytest.mark.parametrize("error", [cuda_out_of_memory, cublas_alloc_failed, cpu_allocator_failure])
def test_out_of_memory_shrinks_the_batch_then_grows_back(error):
    lengths = [1000] * 4 + [100] * 40  # a long head, then short prompts
    gpu = FakeGPU(lengths, max_new_tokens=100, capacity=3300, error=error)
    gpu.schedule(max_batch_size=16, max_batch_tokens=8800)
    assert gpu.done == {i: f"summary {i}" for i in range(44)} and gpu.set_aside == []
    # 8 x 1100 and 4 x 1100 run out, 2 x 1100 fits: the budget is 2200 tokens, which still takes 11
    # short prompts (200 each) at once; after 4 batches without an error it doubles to 4400: 16 rows
    assert [len(call) for call in gpu.calls] == [8, 4, 2, 2, 11, 11, 16, 2]
    assert gpu.freed == 2
    assert sum("batch token budget now 2200" in line for line in gpu.said) == 1


def test_growing_back_skips_a_row_count_that_ran_out_of_memory_at_about_that_length():
    """Before, 4 rows ran out at 1,000 tokens, 2 ran, the budget doubled after 4 batches and 4 rows of
    992 tokens ran out again, and again for every 8 prompts of about that length."""
    lengths = list(range(1000, 960, -1))  # 40 prompts of about the same length
    gpu = FakeGPU(lengths, max_new_tokens=100, capacity=3300)
    gpu.schedule(max_batch_size=4, max_batch_tokens=4400)
    assert sorted(gpu.done) == list(range(40)) and gpu.set_aside == []
    assert gpu.freed == 1  # the first batch only
    sizes = [len(call) for call in gpu.calls]
    assert sizes[:6] == [4, 2, 2, 2, 2, 3] and set(sizes[6:-1]) == {3}


def test_rows_known_to_fail_cover_the_same_length_and_longer_only():
    failures = [(1000, 4), (2000, 3)]
    assert generate.rows_known_to_fail([], 1000) is None
    assert generate.rows_known_to_fail(failures, 2500) == 3  # longer than both
    assert generate.rows_known_to_fail(failures, 1800) == 3 and generate.rows_known_to_fail(failures, 1799) == 4
    assert generate.rows_known_to_fail(failures, 900) == 4 and generate.rows_known_to_fail(failures, 899) is None


def test_an_error_that_is_not_out_of_memory_is_raised_and_nothing_is_retried():
    import torch

    def broken(indices):
        return torch.ones(len(indices)) @ torch.ones(len(indices) + 1)  # torch's own shape error

    freed = []
    with pytest.raises(RuntimeError, match="inconsistent tensor size"):
        generate.run_batches([10, 20, 30], broken, max_new_tokens=5, max_batch_size=4, max_batch_tokens=1000,
                             free_memory=lambda: freed.append(1), on_batch=None, on_set_aside=None, say=print)
    assert freed == []


def test_is_out_of_memory_tells_allocation_failures_from_other_errors():
    import torch

    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError  # what bitsandbytes' torch.empty raises too
    for error in (cuda_out_of_memory(), cublas_alloc_failed(), cpu_allocator_failure(), MemoryError(),
                  torch.AcceleratorError("CUDA error: out of memory"),
                  RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtCreate(&handle)`")):
        assert generate.is_out_of_memory(error), error
    try:
        torch.ones(2) @ torch.ones(3)
    except RuntimeError as shape_error:
        assert not generate.is_out_of_memory(shape_error)
    for error in (RuntimeError("CUDA error: device-side assert triggered"), ValueError("out of memory?"),
                  KeyboardInterrupt(), RuntimeError("cublasLt ran into an error!")):
        assert not generate.is_out_of_memory(error), error


def test_prefill_attention_is_budgeted_for_gemma2_9b():
    """Issue 16: at L ~ 7,000 the 32,768-token budget alone allows 4 rows, whose prefill scores need ~32 GB."""
    from transformers import Gemma2Config, LlamaConfig

    heads = generate.prefill_score_heads(Gemma2Config(num_attention_heads=16, num_key_value_heads=8, head_dim=256))
    assert heads == 16 and generate.prefill_score_heads(LlamaConfig()) == 0
    assert generate.fitting_batch_size(7000, 1024, 8, 32768) == 4
    assert generate.prefill_attention_bytes(4, 7000, heads) == 4 * 7000**2 * (16 * 10 + 4)  # 32.1 GB
    budget = int(generate.DEFAULT_MAX_ATTENTION_GIB * 2**30)
    rows = [generate.fitting_batch_size(length, 1024, 8, 32768, heads, budget) for length in (7000, 4000, 3000, 2000)]
    assert rows == [1, 2, 4, 8]  # at 2,000 tokens --batch_size 8 is the limit, as before
    plan = generate.plan_batches([7000] * 3 + [2000] * 8, 8, 1024, 32768, heads, budget)
    assert plan == [[0], [1], [2], list(range(3, 11))]


def test_run_batches_keeps_prefill_attention_within_its_budget():
    """Long prompts that fit the token budget 4 at a time but not the attention scores: no error at all."""
    lengths = [3000] * 8 + [500] * 8
    gpu = FakeGPU(lengths, max_new_tokens=100, capacity=32768, heads=16, attention_capacity=3 * 2**30)
    gpu.schedule(max_batch_size=8, max_batch_tokens=32768, max_attention_bytes=3 * 2**30)
    assert sorted(gpu.done) == list(range(16)) and gpu.freed == 0
    assert [len(call) for call in gpu.calls] == [2, 2, 2, 2, 8]  # 1.48 GB of scores a row at 3,000 tokens


# Runs Unsloth's own prefill attention (GPU-only in a real run: the CPU backend generates through transformers)
# on CPU under torch's profiler and reports the most bytes it held at once per score. In a subprocess: importing
# unsloth patches transformers for the whole process.
MEASURE_PREFILL_ATTENTION = """
import json
import unsloth  # first: it patches transformers
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import Gemma2Config
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention
from unsloth.kernels.flex_attention import slow_inference_attention_softcapping

rows, heads, kv_heads, head_dim, length = 2, 4, 2, 16, 512
config = Gemma2Config(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, query_pre_attn_scalar=head_dim, num_hidden_layers=1)
attention = Gemma2Attention(config, layer_idx=0)
peaks = {}
for dtype in (torch.float32, torch.bfloat16):
    Q = torch.randn(rows, heads, length, head_dim, dtype=dtype)
    K, V = (torch.randn(rows, kv_heads, length, head_dim, dtype=dtype) for _ in range(2))
    mask = torch.zeros(rows, 1, length, length, dtype=dtype)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        slow_inference_attention_softcapping(Q, K, V, mask, attention, rows, length)
    # An op's own allocations happen as it starts, what it frees itself as it ends.
    moves = sorted((e.time_range.end if e.self_cpu_memory_usage < 0 and e.name != "[memory]" else e.time_range.start,
                    e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    held = peak = 0
    for _, change in moves:
        held += change
        peak = max(peak, held)
    peaks[str(dtype)] = peak / (rows * heads * length * length)
print(json.dumps(peaks))
"""


def test_score_bytes_match_unsloths_gemma2_prefill_attention_measured():
    result = subprocess.run([sys.executable, "-c", MEASURE_PREFILL_ATTENTION], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    # bfloat16: the scores (2 bytes), softmax's float32 copy of them (4) and its float32 output (4); float32:
    # the scores and the output. A little more for Q, K and V (length 512 against head_dim 16).
    assert generate.SCORE_BYTES <= peaks["torch.bfloat16"] <= generate.SCORE_BYTES + 0.5, peaks
    assert 8 <= peaks["torch.float32"] <= generate.SCORE_BYTES, peaks


def test_max_attention_gib_must_be_positive(tmp_path):
    result = run_infer("--input", str(REPO / "data/sample/test.json"), "--max_attention_gib", "0", cwd=tmp_path)
    assert_one_line_error(result, "--max_attention_gib")
    assert list(tmp_path.iterdir()) == []


def test_free_decode_memory_drops_the_buffers_unsloth_leaves_on_attention_modules():
    """Unsloth's fast decode path (GPU only: its CPU backend decodes through transformers) sets these
    as plain attributes in unsloth/models/gemma2.py; they must go, while real submodules and weights stay."""
    import torch

    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Linear(4, 4)
    for name in generate.UNSLOTH_DECODE_BUFFERS:
        setattr(layer.self_attn, name, torch.empty(2, 2))
    layer.attention = torch.nn.Linear(4, 4)  # a submodule that happens to share a buffer's name
    generate.free_decode_memory(layer)
    assert not [name for name in generate.UNSLOTH_DECODE_BUFFERS if name in layer.self_attn.__dict__]
    assert isinstance(layer.attention, torch.nn.Linear) and layer.self_attn.weight.shape == (4, 4)


def test_shorten_to_fit_cuts_the_middle_of_the_conversation():
    record, _ = validate_record({
        "id": "x", "output": "",
        "input": {"subject_keyword": ["여행"], "conversation": [{"speaker": "A", "utterance": f"발화{i:02d} " * 5} for i in range(20)]},
    }, 0, "mem")
    render = lambda r: "\n".join(t["utterance"] for t in r["input"]["conversation"])  # noqa: E731
    full = render(record)
    prompt, shortened = generate.shorten_to_fit(record, render, len, len(full))
    assert (prompt, shortened) == (full, False)
    prompt, shortened = generate.shorten_to_fit(record, render, len, len(full) // 2)
    assert shortened and len(prompt) <= len(full) // 2
    assert prompt.startswith("발화00") and prompt.rstrip().endswith("발화19")
    assert "발화10" not in prompt
    prompt, shortened = generate.shorten_to_fit(record, render, len, 20)  # even first + last are too long: their middles go
    assert shortened and len(prompt) <= 20 and prompt.startswith("발화00") and prompt.rstrip().endswith("발화19")
    with pytest.raises(UserError):
        generate.shorten_to_fit(record, lambda r: "x" * 50 + render(r), len, 20)


def test_partial_file_round_trip_ignores_a_torn_line_and_refuses_another_run(tmp_path):
    path = tmp_path / "sub.json.partial.jsonl"
    progress.append_partial(path, {"a": 1}, [{"id": "1", "output": ""}])
    progress.append_partial(path, {"a": 1}, [{"id": "2", "output": "둘"}, {"id": "1", "output": "하나", "repetition_penalty": 1.1}])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"id": "3", "out')  # killed mid-write
    assert progress.load_partial(path, {"a": 1}) == {"1": {"id": "1", "output": "하나", "repetition_penalty": 1.1}, "2": {"id": "2", "output": "둘"}}
    with pytest.raises(UserError, match="different"):
        progress.load_partial(path, {"a": 2})


def test_a_plain_resume_refuses_to_mix_generation_settings(tmp_path):
    rows = {"1": {"id": "1", "output": "하나", **progress.generation_settings(1024, 1.0)}, "2": {"id": "2", "output": "둘"}}
    partial = tmp_path / "sub.json.partial.jsonl"
    progress.check_resume_settings(rows, progress.generation_settings(1024, 1.0), 3, partial)
    progress.check_resume_settings(rows, progress.generation_settings(1024, 1.1), 0, partial)  # nothing left to generate: nothing mixes
    with pytest.raises(UserError, match="repetition_penalty 1.0; resume with those settings"):
        progress.check_resume_settings(rows, progress.generation_settings(1024, 1.1), 3, partial)


def test_next_repetition_penalty_is_never_the_one_in_use():
    assert [progress.next_repetition_penalty(used) for used in (None, 1.0, 1.1, 1.2, 0.9)] == [1.1, 1.1, 1.2, 1.3, 1.1]


def test_default_output_never_takes_the_submission_name_for_a_partial_or_scored_run():
    assert infer.default_output("data/일상대화요약_test.json", "test", None) == Path("submission.json")
    assert infer.default_output("data/일상대화요약_test.json", "test", 2) == Path("일상대화요약_test_limit2_pred.json")
    assert infer.default_output("data/일상대화요약_dev.json", "references", None) == Path("일상대화요약_dev_pred.json")
    assert infer.default_output("data/dev_some_blank.json", "mixed", None) == Path("dev_some_blank_pred.json")


def test_mode_line_says_which_mode_and_why():
    records = [{"id": f"r{i}", "output": "요약" if i < 3 else " "} for i in range(5)]
    assert infer.input_kind(records) == "mixed" and infer.input_kind(records[:3]) == "references" and infer.input_kind(records[3:]) == "test"
    line = infer.mode_line("mixed", False, records)
    assert "no scoring" in line and "3 of 5 records have an 'output' but 2 are empty (first 'r3')" in line and "scoring needs every reference" in line
    assert "generate and score" in infer.mode_line("references", True, records[:3])
    assert "--no-eval" in infer.mode_line("references", False, records[:3])


def test_regeneration_targets():
    band = (40, 120)
    outputs = {"ok": "두 화자는 이 대화에서 여행에 대해 말했습니다. SD2000001은 제주도가 좋다고 말했습니다.", "empty": "", "short": "여행 이야기.",
               "long": "가나다라마바사 " * 20, "loop": "SD2000001은 제주도에 가고 싶다고 말했습니다. " * 2}
    records = [{"id": i} for i in outputs]
    targets = lambda **flags: [r["id"] for r in progress.regeneration_targets(records, outputs, band, **flags)]  # noqa: E731
    assert targets(retry_empty=True, regenerate_flagged=False) == ["empty"]
    assert targets(retry_empty=False, regenerate_flagged=True) == ["empty", "short", "long", "loop"]


def test_progress_lines_for_logs():
    assert generate.progress_line("generating", 40, 408, 17.0, "12.0 tok/s") == "generating: 40/408 (10%), 2.35 items/s, ETA 2m36s, 12.0 tok/s"
    assert generate.progress_line("pairs", 0, 8, 3.0) == "pairs: 0/8 (0%), 0.00 items/s, ETA unknown"
    assert [done for done in range(1, 409) if generate.crosses_report_point(done - 1, done, 408)] == [*range(21, 408, 21), 408]
    assert [done for done in range(1, 9) if generate.crosses_report_point(done - 1, done, 8)] == list(range(1, 9))
    assert not generate.crosses_report_point(22, 30, 408) and generate.crosses_report_point(30, 50, 408)
    assert [generate.format_duration(s) for s in (4, 75, 3725)] == ["4s", "1m15s", "1h02m"]


def test_check_submission_refuses_what_the_scorer_would_reject():
    raw = [{"id": "1", "input": {"k": 1}, "output": ""}, {"id": "2", "input": {"k": 2}, "output": ""}]
    good = progress.build_submission(raw, {"1": "요약", "2": "요약"})
    progress.check_submission(good, raw, "sub.json")
    for bad, message in [
        (good[:1], "records"),
        ([good[1], good[0]], "differs"),
        ([good[0], {**good[1], "input": {"k": 3}}], "changed"),
        (progress.build_submission(raw, {"1": "요약", "2": "  "}), "empty"),
    ]:
        with pytest.raises(UserError, match=message):
            progress.check_submission(bad, raw, "sub.json")


# ---------------------------------------------------------------------------------------------
# --score: no model, ids matched
# ---------------------------------------------------------------------------------------------

def test_score_mode_scores_a_file_without_torch(tmp_path):
    refs = json.loads((REPO / "data/sample/dev.json").read_text(encoding="utf-8"))
    preds = [{**r, "output": r["output"] if i else "학교에 갔다"} for i, r in enumerate(refs)][::-1]  # order may differ
    (tmp_path / "pred.json").write_text(json.dumps(preds, ensure_ascii=False), encoding="utf-8")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import infer, common; "
        "common.run_cli(infer.main, common.parse_settings(infer.InferSettings, sys.argv[2:], '')); "
        "assert 'torch' not in sys.modules and 'unsloth' not in sys.modules, 'score mode imported torch'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(REPO), "--score", "pred.json", "--ref", str(REPO / "data/sample/dev.json"),
                             "--metrics", "rouge1"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    scores = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    by_id = {item["id"]: item["rouge1"] for item in scores["items"]}
    assert by_id[refs[1]["id"]] == by_id[refs[2]["id"]] == 1.0
    assert 0 < by_id[refs[0]["id"]] < 1
    assert scores["means"]["rouge1"] == pytest.approx(sum(by_id.values()) / 3)
    assert "mean of rouge1 only" in result.stdout and "mean of all three" not in result.stdout


def test_score_mode_reports_id_mismatch(tmp_path):
    refs = json.loads((REPO / "data/sample/dev.json").read_text(encoding="utf-8"))
    (tmp_path / "pred.json").write_text(json.dumps(refs[:2], ensure_ascii=False), encoding="utf-8")
    result = run_infer("--score", "pred.json", "--ref", str(REPO / "data/sample/dev.json"), cwd=tmp_path)
    assert_one_line_error(result, "pred.json", "1 missing", refs[2]["id"])
    assert not (tmp_path / "scores.json").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing written or changed
# ---------------------------------------------------------------------------------------------

def _record(i: int) -> dict:
    return {"id": f"t-{i}", "input": {"conversation": [{"speaker": "SD2000001", "utterance": "안녕하세요"}], "subject_keyword": ["인사"]}, "output": ""}


@pytest.mark.parametrize("content, fragments", [
    ("[{\"id\": ", ["in.json", "not valid JSON"]),
    (json.dumps([_record(0), {**_record(1), "input": {"conversation": [], "subject_keyword": ["x"]}}]), ["in.json", "'t-1'", "input.conversation"]),
    (json.dumps([_record(0), _record(1), _record(0)]), ["in.json", "record 2", "'t-0'", "duplicates"]),
    ("[]", ["in.json", "holds no records"]),
])
def test_bad_input_file(tmp_path, tiny_model_dir, content, fragments):
    (tmp_path / "in.json").write_text(content, encoding="utf-8")
    (tmp_path / "sub.json").write_text("keep me", encoding="utf-8")
    result = run_infer("--input", "in.json", "--output", "sub.json", "--model", str(tiny_model_dir), cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert (tmp_path / "sub.json").read_text(encoding="utf-8") == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "sub.json"]


def test_output_equal_to_input_is_refused(tmp_path, tiny_model_dir):
    source = (REPO / "data/sample/test.json").read_text(encoding="utf-8")
    (tmp_path / "test.json").write_text(source, encoding="utf-8")
    result = run_infer("--input", "test.json", "--output", "./test.json", "--model", str(tiny_model_dir), cwd=tmp_path)
    assert_one_line_error(result, "input file")
    assert (tmp_path / "test.json").read_text(encoding="utf-8") == source
    assert [p.name for p in tmp_path.iterdir()] == ["test.json"]


@pytest.mark.parametrize("model_args, fragment", [
    (["--model", "outputs/run1/final"], "outputs/run1/final: model folder not found"),
    ([], "no trained model found in outputs/*/final"),
])
def test_missing_model_is_one_line(tmp_path, model_args, fragment):
    result = run_infer("--input", str(REPO / "data/sample/test.json"), *model_args, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Generation through the command line (tiny random model)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_model(memorized_run) -> Path:
    return memorized_run["run"] / "final"


def latest_rows(partial: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()[1:]]
    return {row["id"]: row for row in rows}


def last_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after the libraries' own load-time warnings
    assert line.startswith("error: "), result.stderr
    return line


def test_empty_summaries_are_retried_alone_with_a_new_penalty(tmp_path, tiny_model_dir, mixed_input):
    """The random tiny model ends some summaries at once. The run writes no submission but keeps every
    summary, empty ones included, in the partial file; --retry_empty regenerates just the empty ones
    with a higher repetition penalty and keeps the rest; a hint never names the penalty already used."""
    command = ["--model", str(tiny_model_dir), "--input", str(mixed_input), "--output", "sub.json", "--batch_size", "14", *FAST]
    partial = tmp_path / "sub.json.partial.jsonl"
    first = run_infer(*command, cwd=tmp_path)
    line = last_error_line(first)
    assert all(s in line for s in ("mixed.json", "empty summary", "sub.json.partial.jsonl", "--retry_empty --repetition_penalty 1.1")), line
    assert not (tmp_path / "sub.json").exists()
    rows = latest_rows(partial)
    empty = [i for i, row in rows.items() if not row["output"]]
    assert len(rows) == 14 and 0 < len(empty) < 14
    finished = {i: row for i, row in rows.items() if row["output"]}

    second = run_infer(*command, "--retry_empty", cwd=tmp_path)
    assert f"regenerating {len(empty)} of 14 summaries with max_new_tokens 16, repetition_penalty 1.1; the other {len(finished)} are kept" in second.stdout
    after = latest_rows(partial)
    assert {i: after[i] for i in finished} == finished
    assert all(after[i]["repetition_penalty"] == 1.1 for i in empty)
    still_empty = [i for i in empty if not after[i]["output"]]
    assert still_empty, "at 1.1 the random model should still leave some summaries empty (the next steps need them)"
    line = last_error_line(second)
    assert f"(and {len(still_empty) - 1} more)" in line and "--retry_empty --repetition_penalty 1.2" in line and "1.1" not in line

    third = run_infer(*command, "--retry_empty", "--repetition_penalty", "1.1", cwd=tmp_path)
    assert f"{len(still_empty)} of the selected summaries were already generated with these settings" in third.stdout
    assert "loading model" not in third.stdout and "--repetition_penalty 1.2" in last_error_line(third)
    assert latest_rows(partial) == after


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory, lora_model, mixed_input) -> list[dict]:
    """The official baseline's way: one prompt per generate() call."""
    cwd = tmp_path_factory.mktemp("single")
    result = run_infer("--model", str(lora_model), "--input", str(mixed_input), "--output", "sub.json", "--batch_size", "1", *FAST, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((cwd / "sub.json").read_text(encoding="utf-8"))


def test_batched_equals_one_at_a_time_and_submission_is_valid(tmp_path, lora_model, mixed_input, one_at_a_time):
    result = run_infer("--model", str(lora_model), "--input", str(mixed_input), "--output", "sub.json", "--batch_size", "8", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (tmp_path / "sub.json").read_text(encoding="utf-8")
    batched = json.loads(text)
    source = json.loads(mixed_input.read_text(encoding="utf-8"))
    assert [r["id"] for r in batched] == [r["id"] for r in source]
    assert all(r["output"].strip() and r["output"] == r["output"].strip() for r in batched)
    assert [{k: v for k, v in r.items() if k != "output"} for r in batched] == [{k: v for k, v in r.items() if k != "output"} for r in source]
    assert text == json.dumps(batched, ensure_ascii=False, indent=4) + "\n"
    assert [r["output"] for r in batched] == [r["output"] for r in one_at_a_time]
    assert not (tmp_path / "sub.json.partial.jsonl").exists()
    # 11 of the 14 records carry a summary: the console says why this is no scored run.
    assert "mode: generate only, no scoring: 11 of 14 records have an 'output' but 3 are empty" in result.stdout
    # stdout is a pipe here, as under nohup or Colab's !python: plain progress lines, not a bar.
    progress = re.findall(r"^generating: (\d+)/14 \(\d+%\), [\d.]+ items/s, ETA \w+, [\d.]+ tok/s$", result.stdout, re.M)
    assert progress == ["8", "14"], result.stdout


def test_interrupted_run_resumes_without_regenerating(tmp_path, lora_model, mixed_input, one_at_a_time):
    args = [sys.executable, str(REPO / "infer.py"), "--model", str(lora_model), "--input", str(mixed_input),
            "--output", "sub.json", "--batch_size", "2", *FAST]
    partial = tmp_path / "sub.json.partial.jsonl"
    process = subprocess.Popen(args, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and (not partial.exists() or len(partial.read_text(encoding="utf-8").splitlines()) < 5):
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be interrupted"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    finished = [json.loads(line)["id"] for line in partial.read_text(encoding="utf-8").splitlines()[1:]]
    assert 4 <= len(finished) < 14 and not (tmp_path / "sub.json").exists()

    result = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming: {len(finished)} already finished" in result.stdout
    assert f"generating {14 - len(finished)} summaries" in result.stdout
    submission = json.loads((tmp_path / "sub.json").read_text(encoding="utf-8"))
    ids = [r["id"] for r in submission]
    assert len(ids) == len(set(ids)) == 14
    assert [r["output"] for r in submission] == [r["output"] for r in one_at_a_time]
    assert not partial.exists()


def test_limit_run_never_replaces_a_submission(tmp_path, lora_model):
    test_file = REPO / "data/sample/test.json"
    (tmp_path / "submission.json").write_text("the full submission", encoding="utf-8")
    refused = run_infer("--model", str(lora_model), "--input", str(test_file), "--limit", "2", "--output", "submission.json", *FAST, cwd=tmp_path)
    assert_one_line_error(refused, "--output submission.json exists", "--limit 2 run covers 2 of 3 records", "--overwrite", "test_limit2_pred.json")

    result = run_infer("--model", str(lora_model), "--input", str(test_file), "--limit", "2", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "submission.json").read_text(encoding="utf-8") == "the full submission"
    written = json.loads((tmp_path / "test_limit2_pred.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in written] == [r["id"] for r in json.loads(test_file.read_text(encoding="utf-8"))[:2]]
    assert "this file covers 2 of 3 records; not a full submission" in result.stdout
    # A test file has nothing to score, but its summaries still go through the output guard.
    guard = json.loads((tmp_path / "test_limit2_pred.guard.json").read_text(encoding="utf-8"))
    assert [item["id"] for item in guard["items"]] == [r["id"] for r in written]
    assert guard["guard"]["flagged"] == [item["id"] for item in guard["items"] if item["guard"]]
    assert not (tmp_path / "scores.json").exists()


def test_regenerate_flagged_redoes_only_the_flagged_summaries(tmp_path, memorized_run):
    """An earlier run's output where one summary is too short and one loops: --regenerate_flagged generates
    just those two again (with repetition_penalty 1.1) and keeps the others as they are, even a summary
    that is not what this model would write now (record 1 holds record 0's summary)."""
    records = memorized_run["records"]
    (tmp_path / "memorized.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    earlier = [r["output"] for r in records]
    earlier[1] = records[0]["output"]
    earlier[2] = "짧은 요약입니다."
    earlier[3] = records[3]["output"] + (" " + records[3]["output"].split(". ")[0] + ".") * 3
    (tmp_path / "memorized_pred.json").write_text(json.dumps([{**r, "output": o} for r, o in zip(records, earlier)], ensure_ascii=False), encoding="utf-8")
    result = run_infer("--model", str(memorized_run["run"] / "final"), "--input", "memorized.json", "--regenerate_flagged",
                       "--no-load_in_4bit", "--max_new_tokens", "256", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--regenerate_flagged: regenerating 2 of 4 summaries with max_new_tokens 256, repetition_penalty 1.1; the other 2 are kept" in result.stdout
    now = [r["output"] for r in json.loads((tmp_path / "memorized_pred.json").read_text(encoding="utf-8"))]
    assert now[:2] == earlier[:2]
    assert all(text and text != old for text, old in zip(now[2:], earlier[2:]))
    scores = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    lengths = sorted(len(r["output"]) for r in records)
    assert scores["guard"]["band_chars"] == [lengths[0], lengths[-1]]
    assert [item["guard"] for item in scores["items"]][:2] == [[], []]
    assert not (tmp_path / "memorized_pred.json.partial.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# End to end with a trained model: memorized summaries come back
# ---------------------------------------------------------------------------------------------

def test_trained_model_reproduces_memorized_summaries(tmp_path, memorized_run):
    """train.py's final/ folder (4-bit, as trained) through infer.py: the memorized summaries come back
    exactly, which also proves the inference prompt is the one training used."""
    final = memorized_run["run"] / "final"
    records = memorized_run["records"]
    (tmp_path / "memorized.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    # No --output: an input with references writes <input>_pred.json, never a test submission.json.
    result = run_infer("--model", str(final), "--input", "memorized.json",
                       "--batch_size", "4", "--max_new_tokens", "256", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "submission.json").exists()
    predictions = json.loads((tmp_path / "memorized_pred.json").read_text(encoding="utf-8"))
    assert [p["output"] for p in predictions] == [r["output"].strip() for r in records]
    scores = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert scores["means"]["rouge1"] == pytest.approx(1.0)
    assert "bertscore" in scores["skipped"] and "bleurt" in scores["skipped"]
    assert "mean of rouge1 only" in result.stdout
    # The band is the memorized summaries' own range, and real summaries do not look like loops.
    assert scores["guard"]["flagged"] == [] and all(item["guard"] == [] for item in scores["items"])
    assert "of the 4 competition summaries" in scores["guard"]["band_source"]

    scores_text = (tmp_path / "scores.json").read_text(encoding="utf-8")
    test_file = REPO / "data/sample/test.json"
    result = run_infer("--model", str(final), "--input", str(test_file),
                       "--batch_size", "4", "--max_new_tokens", "64", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    submission = json.loads((tmp_path / "submission.json").read_text(encoding="utf-8"))
    progress.check_submission(submission, json.loads(test_file.read_text(encoding="utf-8")), "submission.json")
    assert (tmp_path / "scores.json").read_text(encoding="utf-8") == scores_text  # test outputs are empty: no scoring
    guard = json.loads((tmp_path / "submission.guard.json").read_text(encoding="utf-8"))
    assert [item["id"] for item in guard["items"]] == [r["id"] for r in submission]


# ---------------------------------------------------------------------------------------------
# --num_samples: greedy + sampled candidates, minimum Bayes risk, resumable candidates file
# ---------------------------------------------------------------------------------------------

def test_num_samples_selects_by_agreement_and_resumes(tmp_path, memorized_run):
    records = memorized_run["records"]
    (tmp_path / "in.json").write_text(json.dumps([{**r, "output": ""} for r in records], ensure_ascii=False), encoding="utf-8")
    args = ["--model", str(memorized_run["run"] / "final"), "--input", "in.json", "--output", "sub.json", "--batch_size", "8",
            "--no-load_in_4bit", "--max_new_tokens", "24", "--num_samples", "2", "--temperature", "2.0", "--top_p", "1.0",
            "--select_metric", "rouge1"]
    result = run_infer(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (tmp_path / "sub.json.candidates.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    assert [row["id"] for row in rows] == [r["id"] for r in records]
    assert all(len(row["candidates"]) == 3 for row in rows)
    assert any(text != row["candidates"][0] for row in rows for text in row["candidates"][1:]), "nothing was sampled"
    morphs = score.mecab_morphs()

    def rouge1(a: str, b: str) -> float:
        return score.rouge1_f1(score.rouge_tokens(a, morphs), score.rouge_tokens(b, morphs))

    for row in rows:
        means = [sum(rouge1(c, o) for j, o in enumerate(row["candidates"]) if j != i) / 2 for i, c in enumerate(row["candidates"])]
        assert row["chosen"] == means.index(max(means))
    submission = json.loads((tmp_path / "sub.json").read_text(encoding="utf-8"))
    assert [r["output"] for r in submission] == [row["candidates"][row["chosen"]] for row in rows]
    assert not (tmp_path / "sub.json.partial.jsonl").exists()

    # A run killed before the last record's samples were written: only that record is generated again.
    (tmp_path / "sub.json.candidates.jsonl").write_text("".join(line + "\n" for line in lines[:-1]), encoding="utf-8")
    (tmp_path / "sub.json").unlink()
    result = run_infer(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "generating 1 summaries" in result.stdout and "sampling 2 more summaries for 1 records" in result.stdout
    resumed = [json.loads(line) for line in (tmp_path / "sub.json.candidates.jsonl").read_text(encoding="utf-8").splitlines()[1:]]
    assert [row["candidates"] for row in resumed[:-1]] == [row["candidates"] for row in rows[:-1]]
    assert resumed[-1]["candidates"][0] == rows[-1]["candidates"][0]  # greedy is deterministic
