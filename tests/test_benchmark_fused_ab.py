"""benchmarks/fused_ab.py times a revision's fused decoder against the working tree's, in paired steps."""

import json
import subprocess

import pytest
from conftest import ROOT, run_cli


def test_a_revision_and_the_working_tree_are_timed_in_pairs_with_the_same_loss(tmp_path):
    result = run_cli("HEAD", "--pairs", "3", "--tokens", "40", "--hidden", "8", "--vocab", "5000",
                     cwd=tmp_path, script="benchmarks/fused_ab.py")  # fmt: skip
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["pairs"] == 3 and summary["revision"] == "HEAD"
    assert summary["ratio_median"] > 0 and summary["revision_ms_median"] > 0
    low, high = summary["ratio_quartiles"]
    assert low <= summary["ratio_median"] <= high
    assert summary["loss_gap"] < 1e-5  # both versions compute the same loss
    assert "the working tree is" in result.stdout


def test_an_unknown_revision_is_one_clear_line(tmp_path):
    result = run_cli("no-such-revision", cwd=tmp_path, script="benchmarks/fused_ab.py", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: git has no wordlm/models/fused.py at 'no-such-revision'")
    assert "Traceback" not in result.stderr


def test_the_bfloat16_path_is_timed_and_a_revision_without_it_is_one_clear_line(tmp_path):
    small = ("--pairs", "2", "--tokens", "40", "--hidden", "8", "--vocab", "5000", "--dtype", "bfloat16")
    result = run_cli("HEAD", *small, cwd=tmp_path, script="benchmarks/fused_ab.py")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["dtype"] == "bfloat16" and summary["pairs"] == 2 and "in bfloat16" in result.stdout
    before = "0d542a4"  # the last commit before the bfloat16 path (9e7071a)
    if subprocess.run(["git", "cat-file", "-e", f"{before}:wordlm/fused.py"], cwd=ROOT).returncode != 0:
        pytest.skip(f"this clone does not hold commit {before} (a shallow clone)")
    old = run_cli(before, *small, cwd=tmp_path, script="benchmarks/fused_ab.py", check=False)
    assert old.returncode == 1 and "has no bfloat16 path" in old.stderr and "Traceback" not in old.stderr
