"""benchmarks/generate.py on a trained checkpoint of each model shape a preset can give."""

import re

import pytest
import torch
from conftest import run_cli

from wordlm.data.corpus import Vocabulary
from wordlm.models import ModelConfig, build_model
from wordlm.training.checkpoint import save_checkpoint


@pytest.mark.parametrize("model_type", ["LSTM", "Transformer"])
def test_the_generation_benchmark_times_a_tied_adaptive_checkpoint(tmp_path, model_type):
    """A tied adaptive softmax (budget_wt2's model) has no encoder.weight: the benchmark read its device there."""
    torch.manual_seed(0)
    config = ModelConfig(60, model_type, emsize=16, nhid=16, nlayers=1, tied=True, adaptive_softmax=(10, 30))
    save_checkpoint(tmp_path / "tied.pt", build_model(config), Vocabulary([f"w{index}" for index in range(60)]))
    result = run_cli("--checkpoint", "tied.pt", "--device", "cpu", "--words", "8", "--samples", "1", "3",
                     "--repeats", "1", "--threads", "1", cwd=tmp_path, script="benchmarks/generate.py")  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"model {model_type} 1x16, vocabulary 60, device cpu")
    rates = [re.search(r"samples +(\d+) .* ([\d.]+) words/s", line) for line in lines[1:]]
    assert [int(match[1]) for match in rates] == [1, 3] and all(float(match[2]) > 0 for match in rates)
