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


# Readable in one sitting: the numbers that keep each file a read, each function a screen, each line a glance.
MAX_FILE_LINES = 1000
MAX_FUNCTION_LINES = 60
MAX_LINE_CHARS = 120


def script_source(script: str) -> str:
    return (REPO_ROOT / f"{script}.py").read_text(encoding="utf-8")


def function_lengths(source: str) -> dict[str, int]:
    """Every function and method (nested ones too), by qualified name, with its length in lines (decorators aside)."""
    lengths = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[prefix + child.name] = child.end_lineno - child.lineno + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def test_function_lengths_are_measured_with_methods_and_nested_functions():
    source = "class A:\n    def m(self):\n        def inner():\n            pass\n        return 1\n\ndef f():\n    pass\n"
    assert function_lengths(source) == {"A.m": 4, "A.m.inner": 2, "f": 2}


def test_no_function_is_longer_than_a_screen():
    too_long = {f"{script}.py:{name}": length for script in SCRIPTS
                for name, length in function_lengths(script_source(script)).items() if length > MAX_FUNCTION_LINES}
    assert too_long == {}


def test_no_line_is_longer_than_120_characters():
    too_wide = [f"{script}.py:{number}" for script in SCRIPTS
                for number, line in enumerate(script_source(script).splitlines(), start=1) if len(line) > MAX_LINE_CHARS]
    assert too_wide == []


def test_no_script_is_longer_than_1000_lines():
    too_long = {f"{script}.py": len(script_source(script).splitlines()) for script in SCRIPTS}
    assert {name: lines for name, lines in too_long.items() if lines > MAX_FILE_LINES} == {}
