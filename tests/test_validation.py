"""Every key is validated where it enters: random configs and corrupt corpora never give a traceback."""

from __future__ import annotations

import string
import sys

import pytest
import torch
from conftest import cut_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wordlm.config import build_model_config, validate_training_config
from wordlm.errors import UserError
from wordlm.experiment import ex
from wordlm.models import ModelConfig
from wordlm.run import plan_run

DEFAULTS = dict(ex.configurations[0]())  # every key of the experiment, as Sacred builds them: never stale
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(), max_size=2),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(DEFAULTS)), ANY, max_size=4))
def test_validation_accepts_or_names_the_bad_key_in_one_line(changes):
    config = {**DEFAULTS, **changes}
    try:
        result = validate_training_config(config)
    except UserError as problem:
        message = str(problem)
        assert "\n" not in message
        assert any(message.startswith(f"{key}=") or f" {key}=" in message for key in changes), message
    else:
        assert result is None
        assert isinstance(build_model_config(10, {**config, "adaptive_softmax": None}), ModelConfig)


UPDATES = st.sampled_from([
    "batch_size=0", "batch_size=5000", "bptt=-1", "dropout=1.0", "dropout=0.5", "clip=0", "lr=nan",
    "model_type='GRU'", "model_type='LSTMX'", "emsize=31", "tied=False", "nlayers=0", "epochs='x'",
    "max_batches=3", "eval_batch_size=[1]", "device='tpu'", "save=''", "checkpoint_every=-1",
    "on_divergence='retry'", "log_interval=1",
])  # fmt: skip
CORRUPTIONS = st.sampled_from(["none", "empty_train", "binary_valid", "missing_test", "only_newlines", "tiny_train",
                               "crlf_bom_tabs", "unknown_valid"])  # fmt: skip


def corrupt(folder, how: str) -> None:
    if how == "empty_train":
        (folder / "train.txt").write_text("")
    elif how == "binary_valid":
        (folder / "valid.txt").write_bytes(b"ok words\n\xff\xfe\x00bad\n")
    elif how == "missing_test":
        (folder / "test.txt").unlink()
    elif how == "only_newlines":
        (folder / "valid.txt").write_text("\n\n\n")
    elif how == "tiny_train":
        (folder / "train.txt").write_text("a b\n")
    elif how == "crlf_bom_tabs":
        text = (folder / "train.txt").read_text()
        (folder / "train.txt").write_bytes("\ufeff".encode() + text.replace(" ", "\t").replace("\n", "\r\n").encode())
    elif how == "unknown_valid":
        (folder / "valid.txt").write_text("zzqx yyqv\nwwqu\n")


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    updates=st.lists(UPDATES, max_size=3, unique=True),
    how=CORRUPTIONS,
    tag=st.text(string.ascii_lowercase, min_size=6, max_size=6),
)
def test_cli_gives_a_clean_run_or_one_error_line(tmp_path_factory, cli_here, updates, how, tag):
    folder = tmp_path_factory.mktemp(tag)
    corpus = cut_corpus(folder / "corpus", lines=(300, 40, 40))
    corrupt(corpus, how)
    result = cli_here("with", "smoke", f"dataset={corpus}", "max_batches=3", *updates, "-u",
                     cwd=folder, check=False, timeout=120)  # fmt: skip
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    if result.returncode == 0:
        assert "test ppl" in result.stdout
    else:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr


@pytest.mark.parametrize("update", ["cache_lambda='abc'", "cache_lambda=1.5", "cache_window=-1", "cache_theta=[1]",
                                    "dynamic_lr=inf", "dynamic_decay=True"])  # fmt: skip
def test_evaluate_names_a_bad_key_in_one_line_before_loading_anything(tmp_path, cli_here, update):
    result = cli_here("evaluate", "with", "checkpoint=missing.pt", update, "-u", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {update.split('=')[0]}="), result.stderr


@pytest.mark.parametrize(
    "script, args, start",
    [("main.py", ["with", "seed='abc'"], "error: seed='abc' must be an integer from 0"),
     ("main.py", ["with", "seed=-1"], "error: seed=-1 must be an integer from 0"),
     ("generate.py", ["with", "seed=1.5"], "error: seed=1.5 must be an integer from 0"),
     ("main.py", ["-l", "BOGUS", "print_config"], "error: -l 'BOGUS' is not a log level; use one of NOTSET, DEBUG"),
     ("main.py", ["--loglevel=info", "with", "seed=1"], "error: -l 'info' is not a log level"),
     ("generate.py", ["with", "outf=folder"], "error: outf='folder' is a folder; give a file path"),
     ("generate.py", ["with", "outf=''"], "error: outf='' must be a file path"),
     ("generate.py", ["with", "outf=5"], "error: outf=5 must be a file path"),
     ("generate.py", ["with", "outf=afile/new/out.txt"], "error: cannot write outf='afile/new/out.txt': afile is"),
     ("main.py", ["evaluate", "with", "line_scores=folder"], "error: line_scores='folder' is a folder"),
     ("generate.py", ["with", "stop_at_eos='maybe'"], "error: stop_at_eos='maybe' must be True or False"),
     ("generate.py", ["with", "checkpoint=folder"], "error: checkpoint folder is a folder; give a checkpoint file")],
)  # fmt: skip
def test_seeds_log_levels_and_output_paths_are_one_error_line_before_any_work(tmp_path, cli_here, script, args, start):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("a file where a folder should be")
    args = [*args, "checkpoint=missing.pt"] if "with" in args and not any("checkpoint" in a for a in args) else args
    result = cli_here(*args, "-u", cwd=tmp_path, check=False, script=script)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(start), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]  # nothing written, no run recorded


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr": 1e300}, r"^lr=1e\+300 is beyond what float32 holds \(1.18e-38 to 3.4e\+38\)"),
        ({"lr": 1e-50}, r"^lr=1e-50 is beyond what float32 holds"),
        ({"clip": 10**40}, r"^clip=10{40} is beyond what float32 holds"),
        ({"adaptive_softmax": [5, 3], "tied": False}, r"^adaptive_softmax=\[5, 3\] must be increasing word counts "
                                                      r"from 1 up, below the vocabulary size, e\.g\. \[2000, 10000\]"),
    ],
)  # fmt: skip
def test_values_beyond_float32_and_unknown_sizes_are_said_plainly(changes, message):
    with pytest.raises(UserError, match=message) as caught:
        validate_training_config({**DEFAULTS, **changes})
    assert str(sys.maxsize) not in str(caught.value)


@pytest.mark.parametrize("key", ["save", "save_last"])
def test_an_output_that_is_no_path_is_said_plainly_by_the_run_plan(key, tmp_path, monkeypatch):
    """The output paths are the run plan's to check, once (``plan_run``), not the config validation's."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=rf"^{key}=None must be a file path"):
        plan_run({**DEFAULTS, key: None}, set())
    assert list(tmp_path.iterdir()) == []


def test_adaptive_softmax_beyond_the_known_vocabulary_names_its_size():
    with pytest.raises(ValueError, match=r"between 1 and the vocabulary size \(100\), e\.g\. \[10\]"):
        ModelConfig(100, adaptive_softmax=[50, 100], tied=False)


@pytest.mark.parametrize(
    "update, start",
    [("lr=-1", "error: lr=-1 must be a positive"),
     ("model_type='LSTMX'", "error: model_type='LSTMX' is not one of"),
     ("save=folder", "error: save='folder' is a folder"),
     ("resume=missing.pt", "error: checkpoint missing.pt does not exist"),
     ("resume=folder", "error: resume='folder' is a folder"),
     ("dataset=afile.txt", "error: dataset='afile.txt' is neither a folder nor a known corpus"),
     ("tied=False adaptive_softmax=[40000]", "error: adaptive_softmax=[40000] must be increasing word counts"),
     ("amp=fp16", "error: amp='fp16' needs a CUDA device"),
     pytest.param("device=cuda", "error: device='cuda' asks for CUDA, which this machine lacks",
                  marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"))],
)  # fmt: skip
def test_a_refused_value_leaves_no_failed_run_record_behind(tmp_path, cli_here, update, start):
    # checked before Sacred starts the run and its observers: `main.py runs` lists runs, not typos
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile.txt").write_text("a file is no corpus\n")
    result = cli_here("-F", "runs", "with", "smoke", *update.split(), cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(start), result.stderr
    runs = tmp_path / "runs"
    assert not runs.exists() or [p.name for p in runs.iterdir()] == ["_sources"], sorted(runs.iterdir())


def test_cli_here_reports_what_would_have_ended_the_process_as_its_traceback(tmp_path, cli_here, monkeypatch):
    """The in-process runner must fail the tests that look for a clean exit where the process would have crashed."""
    import wordlm.experiment as experiment

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(experiment, "_check_command_line", crash)
    result = cli_here("with", "smoke", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" in result.stderr and "RuntimeError: boom" in result.stderr
    with pytest.raises(AssertionError, match="exit 1"):
        cli_here("with", "smoke", cwd=tmp_path)


def test_a_training_run_checks_its_values_once_from_the_command_line_and_from_python(
    tmp_path, tiny_corpus, cli_here, monkeypatch
):
    """One validation pass per run: Sacred's config hook plans the run (``plan_run``) and the command trains that
    plan; ``wordlm.train`` plans it once too."""
    import wordlm
    import wordlm.run as run

    calls = []
    checked = run.validate_training_config
    monkeypatch.setattr(run, "validate_training_config", lambda cfg: calls.append(cfg["lr"]) or checked(cfg))
    cli_here("with", "smoke", f"dataset={tiny_corpus}", "max_batches=2", "lr=3", "-u", cwd=tmp_path)
    assert calls == [3]
    monkeypatch.chdir(tmp_path)
    wordlm.train("smoke", dataset=str(tiny_corpus), max_batches=2, lr=4, save="api.pt")
    assert calls == [3, 4]
