"""benchmarks/fused_ab.py times a revision's fused decoder against the working tree's, in paired steps."""

import json

from conftest import run_cli


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
    assert result.stderr.startswith("error: git has no wordlm/fused.py at 'no-such-revision'")
    assert "Traceback" not in result.stderr
