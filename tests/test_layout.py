"""The scripts import one way: common.py (settings -> argparse, one-line errors, files, checkpoint folders) is the
floor; prep.py is the base of the pipeline (with dedup.py, its numpy engine, targets.py, its text rules, and report.py,
what it writes and shows, below it); score.py, generate.py and train.py build on it (train.py merge lives in merge.py,
which reads run_config.json as generate.py does; train.py --stage dpo|kto lives in align.py, which reads
run_config.json through generate.py); infer.py on score.py and generate.py, with its resumable progress files in
progress.py and its preference pairs in preference.py; distill.py on generate.py and score.py (its rewrite guard)."""
import ast
import subprocess
import sys

from conftest import REPO_ROOT

SCRIPTS = ("common", "dedup", "targets", "report", "prep", "score", "generate", "merge", "align", "train", "progress",
           "preference", "infer", "distill")
ALLOWED = {"common": set(), "dedup": set(), "targets": set(), "report": {"dedup"},
           "prep": {"common", "dedup", "targets", "report"},
           "score": {"common", "prep", "targets"},
           "generate": {"common", "prep"}, "merge": {"common", "generate"}, "align": {"common", "generate"},
           "train": {"common", "merge", "align"},
           "progress": {"common", "score", "targets"},
           "preference": {"common", "prep", "score", "generate", "targets", "progress"},
           "infer": {"common", "prep", "score", "generate", "targets", "progress", "preference"},
           "distill": {"common", "dedup", "prep", "generate", "score", "targets"}}


def project_imports(script: str) -> set[str]:
    """Every project script that `script` imports, at module level or inside a function."""
    tree = ast.parse((REPO_ROOT / f"{script}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(SCRIPTS)


def test_imports_go_one_way():
    assert {script: project_imports(script) for script in SCRIPTS} == ALLOWED


def test_old_generator_spelling_names_the_new_script():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "prep.py"), "distill", "--limit", "3"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: the generators moved to their own script: python distill.py distill --limit 3"
