"""The Python API (``wordlm.train``, ``wordlm.load``, ``wordlm.LanguageModel``) against the command line.

The CLI's ``generate`` and ``evaluate`` are thin clients of the API, so each figure and text is compared with
what the scripts print: most in this process (``cli_here``: the scripts' own ``main`` with their arguments), and
one generate, one evaluate and one training in a subprocess, as a user would run them.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_env, cut_corpus, run_cli

import wordlm
from wordlm.evaluation import evaluate_text, perplexity
from wordlm.experiment import error, ex

# A BOM, CRLF and a lone CR, a blank line, a word WikiText-2 lacks (-> <unk>), and no line break at the end:
# the text as a str and as a file must tokenize alike.
TEXT = "\ufeffthe first of the year zzqxw was\r\n\r\nit is a new game\rin the United States .\n = = Music = ="


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A checkpoint trained by the real pipeline (the smoke config on WikiText-2's first lines), and a text file."""
    folder = tmp_path_factory.mktemp("api")
    corpus = cut_corpus(folder / "corpus", tokens=(6_600, 900, 900))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORDLM_CACHE", str(folder / "cache"))
        patch.setenv("WORDLM_OFFLINE", "1")
        ex.run(named_configs=["smoke"], config_updates={"dataset": str(corpus), "save": str(folder / "m.pt")},
               options={"--loglevel": "ERROR", "--unobserved": True})  # fmt: skip
    text = folder / "text.txt"
    text.write_bytes(TEXT.encode("utf-8"))
    return {"folder": folder, "checkpoint": folder / "m.pt", "text": text}


@pytest.fixture(scope="module")
def lm(trained) -> wordlm.LanguageModel:
    return wordlm.load(trained["checkpoint"], device="cpu")


def cli(runner, trained, script: str, *updates: str, check: bool = True) -> subprocess.CompletedProcess:
    """``generate.py`` or ``main.py evaluate`` on the trained checkpoint, run by ``runner`` (run_cli or cli_here)."""
    command = () if script == "generate.py" else ("evaluate",)
    return runner(*command, "-u", "with", f"checkpoint={trained['checkpoint']}", "device=cpu", *updates,
                  cwd=trained["folder"], script=script, check=check)  # fmt: skip


def printed_ppl(stdout: str) -> str:
    (ppl,) = re.findall(r"\| ppl +([0-9.]+|inf)$", stdout, re.MULTILINE)
    return ppl


def test_load_gives_the_model_its_vocabulary_and_config(lm, trained):
    assert isinstance(lm, wordlm.LanguageModel)
    assert lm.config is lm.model.config and lm.config.ntoken == len(lm.vocab) > 100
    assert (lm.config.nhid, lm.config.nlayers) == (32, 1)  # the smoke config
    assert not lm.model.training
    assert lm.meta["config"]["max_batches"] == 20  # what training recorded


@pytest.mark.parametrize(
    "keys",
    [{"words": 40},
     {"words": 30, "prompt": "the zzqxw game", "temperature": 0.7, "top_k": 50, "top_p": 0.9, "seed": 5,
      "samples": 3, "stop_at_eos": True}],
)  # fmt: skip
def test_generate_is_the_text_the_generate_script_writes(lm, trained, keys, cli_here):
    updates = [f"{key}={value!r}" for key, value in keys.items()]
    assert lm.generate(**keys) == cli(cli_here, trained, "generate.py", "outf=-", *updates).stdout
    assert lm.generate(**keys) == lm.generate(**keys)
    assert lm.generate(**{**keys, "seed": 99}) != lm.generate(**keys)


def test_perplexity_and_score_are_what_evaluate_prints_and_writes(lm, trained, cli_here):
    result = cli(cli_here, trained, "main.py", f"text={trained['text']}", "eval_batch_size=3", "bptt=7",
                 "line_scores=s.jsonl")  # fmt: skip
    text = trained["text"].read_bytes().decode("utf-8")  # the BOM and CRs kept: the API reads them as a file's
    ppl = lm.perplexity(text, eval_batch_size=3)  # the command's bptt=7 changes nothing: the state goes on
    assert f"{ppl:.2f}" == printed_ppl(result.stdout)
    assert ppl == lm.perplexity(trained["text"], eval_batch_size=3)  # a path is read as the file
    records = [json.loads(line) for line in (trained["folder"] / "s.jsonl").read_text().splitlines()]
    assert lm.line_scores(text, eval_batch_size=3) == records
    scores = lm.score(text.removeprefix("\ufeff").splitlines(), eval_batch_size=3)
    assert scores == [record["logprob"] for record in records] and len(scores) == 5
    assert all(score < 0 for score in scores[1:])


def test_perplexity_defaults_are_the_commands(lm, trained):
    """A subprocess: main.py evaluate's perplexity as a user's own process prints it."""
    result = cli(run_cli, trained, "main.py", f"text={trained['text']}")
    assert f"{lm.perplexity(trained['text'].read_text(encoding='utf-8')):.2f}" == printed_ppl(result.stdout)


@pytest.mark.parametrize(
    "keys", [{}, {"eval_batch_size": 4}, {"cache_window": 50}, {"dynamic_lr": 0.2, "bptt": 12}], ids=str
)
def test_evaluate_computes_what_the_api_does_to_the_last_bit(lm, trained, keys):
    """The command's perplexity and run record are ``lm.perplexity`` of the file (and ``evaluate_text`` of its ids
    for the cache pointer and dynamic evaluation), exactly."""
    updates = {"checkpoint": str(trained["checkpoint"]), "text": str(trained["text"]), "device": "cpu", **keys}
    run = ex.run("evaluate", config_updates=updates, options={"--loglevel": "ERROR", "--unobserved": True})
    ids, _ = lm.tokenize(Path(trained["text"]))
    loss, count, _ = evaluate_text(lm.model, ids, **keys)
    assert run.result == run.info["ppl"] == perplexity(loss) and run.info["tokens"] == count
    if "cache_window" not in keys and "dynamic_lr" not in keys:
        assert run.result == lm.perplexity(Path(trained["text"]), **keys)


def test_save_then_load_gives_the_same_model_that_the_commands_read(lm, trained, tmp_path):
    """A subprocess: the text generate.py writes in a user's own process."""
    saved = lm.save(tmp_path / "sub" / "copy.pt")
    again = wordlm.load(str(saved))
    assert again.vocab.idx2word == lm.vocab.idx2word and again.config == lm.config and again.meta == lm.meta
    ids = torch.tensor(lm.vocab.encode("the year of the game".split())).view(-1, 1)
    with torch.no_grad():
        assert torch.equal(again.model(ids, again.model.init_hidden(1))[0], lm.model(ids, lm.model.init_hidden(1))[0])
    result = run_cli("with", f"checkpoint={saved}", "words=25", "seed=3", "outf=-", "-u", cwd=tmp_path,
                     script="generate.py")  # fmt: skip
    assert result.stdout == lm.generate(words=25, seed=3)


def user_error(call, *args) -> str:
    with pytest.raises(wordlm.UserError) as caught:
        call(*args)
    return str(caught.value)


def cli_error(command: str, **updates) -> str:
    with pytest.raises(error) as caught:
        ex.run(command, config_updates=updates, options={"--loglevel": "ERROR", "--unobserved": True})
    return str(caught.value)


@pytest.mark.parametrize(
    "keys",
    [{"words": 0}, {"top_p": 0.0}, {"temperature": -1.0}, {"top_k": 2.5}, {"samples": True}, {"stop_at_eos": "yes"},
     {"seed": -1}],
)  # fmt: skip
def test_bad_generate_keys_raise_the_commands_message(lm, trained, tmp_path, keys):
    message = user_error(lambda: lm.generate(**keys))
    assert message == cli_error("generate", checkpoint=str(trained["checkpoint"]), outf=str(tmp_path / "o"), **keys)
    (key,) = keys
    assert message.startswith(f"{key}=")


def test_bad_evaluate_input_raises_the_commands_message(lm, trained, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    checkpoint, text = str(trained["checkpoint"]), str(trained["text"])
    for call, updates in (
        (lambda: lm.perplexity("the year", eval_batch_size=0), {"text": text, "eval_batch_size": 0}),
        (lambda: lm.perplexity(tmp_path / "empty.txt"), {"text": str(tmp_path / "empty.txt")}),
        (lambda: lm.perplexity(tmp_path / "nowhere.txt"), {"text": str(tmp_path / "nowhere.txt")}),
    ):
        assert user_error(call) == cli_error("evaluate", checkpoint=checkpoint, **updates)
    assert user_error(lambda: lm.perplexity("")) == (
        "the text has 0 token(s); scoring needs at least two (the first is only context)"
    )
    # bptt is the command's key (dynamic evaluation's segments), no longer the API's, and still checked there
    assert cli_error("evaluate", checkpoint=checkpoint, text=text, bptt=-2) == "bptt=-2 must be a positive integer"


def test_bad_checkpoint_raises_the_commands_message(tmp_path):
    for checkpoint in (tmp_path / "nowhere.pt", tmp_path, " "):
        assert user_error(wordlm.load, checkpoint, "cpu") == cli_error(
            "generate", checkpoint=str(checkpoint), device="cpu", outf=str(tmp_path / "o.txt")
        )


def test_bad_device_raises_the_commands_message(trained, tmp_path):
    checkpoint = str(trained["checkpoint"])
    message = user_error(lambda: wordlm.load(checkpoint, "gpu7"))
    assert message == cli_error("evaluate", checkpoint=checkpoint, device="gpu7", text=str(trained["text"]))
    assert message.startswith("device='gpu7' is not a device")


def test_bad_score_and_save_arguments_are_user_errors(lm, tmp_path):
    assert "not one string" in user_error(lambda: lm.score("the year"))
    assert "line 2 of score's lines" in user_error(lambda: lm.score(["the", "a\nb"]))
    assert "is a folder" in user_error(lambda: lm.save(tmp_path))
    assert not list(tmp_path.iterdir())
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # the command line's policy for save=: a FIFO is refused, in its words, and stays a FIFO
    assert user_error(lambda: lm.save(fifo)).startswith(f"save={str(fifo)!r} is a FIFO, not a file; save must name")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_save_never_replaces_a_checkpoint_holding_training_state(trained, tmp_path):
    """``load(f).save(f)`` would drop what resume= needs: it is refused, and the file is left as it was."""
    from wordlm.training.checkpoint import load_checkpoint

    checkpoint = tmp_path / "m.pt"
    checkpoint.write_bytes(trained["checkpoint"].read_bytes())  # training's save: it holds training state
    before = checkpoint.read_bytes()
    assert load_checkpoint(checkpoint)["training"]
    lm = wordlm.load(checkpoint, "cpu")
    (tmp_path / "link.pt").symlink_to(checkpoint)
    for path in (checkpoint, str(checkpoint), tmp_path / "link.pt"):
        assert user_error(lm.save, path) == (
            f"save={str(path)!r} holds training state that resume= needs, which save would drop (it writes the "
            "model alone); save the model to another file"
        )
    assert checkpoint.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["link.pt", "m.pt"]
    # elsewhere it saves, and a checkpoint with no training state (that copy) is replaced, even by its own model
    copy = lm.save(tmp_path / "copy.pt")
    assert not load_checkpoint(copy).get("training")
    again = wordlm.load(copy, "cpu")
    assert again.save(copy) == copy and wordlm.load(copy).meta == lm.meta


def test_scoring_words_a_vocabulary_without_unk_lacks_leaves_the_vocabulary_as_it_was(tmp_path):
    from wordlm.data.corpus import EOS, Vocabulary
    from wordlm.models import ModelConfig, RNNModel
    from wordlm.training.checkpoint import save_checkpoint

    vocab = Vocabulary(["the", "cat", EOS])
    save_checkpoint(tmp_path / "m.pt", RNNModel(ModelConfig(3, "GRU", 4, 4, 1, 0.0, False)), vocab)
    small = wordlm.load(tmp_path / "m.pt", "cpu")
    assert user_error(lambda: small.perplexity("the dog\n")).startswith("the text: 1 tokens are not in the checkpoint")
    assert small.vocab.idx2word == ["the", "cat", EOS]
    small.save(tmp_path / "again.pt")
    assert wordlm.load(tmp_path / "again.pt").vocab.idx2word == ["the", "cat", EOS]


def test_import_wordlm_and_the_api_import_no_sacred(trained):
    code = (
        "import sys, wordlm; assert 'torch' not in sys.modules; "
        f"lm = wordlm.load({str(trained['checkpoint'])!r}, 'cpu'); lm.generate(words=5); lm.perplexity('the year\\n'); "
        "assert 'sacred' not in sys.modules, 'sacred imported'; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.stdout == "ok\n", result.stderr
    assert wordlm.__version__ and set(wordlm.__all__) == {
        "load",
        "LanguageModel",
        "UserError",
        "__version__",
        "train",
        "sweep",
        "TrainingRun",
        "PRESETS",
    }


# -- wordlm.train: the command line's training, from Python


@pytest.fixture(scope="module")
def api_run(trained):
    """``wordlm.train`` with the smoke preset, two epochs, in a folder of its own (no observer: no runs/)."""
    folder = trained["folder"] / "train"
    folder.mkdir()
    corpus = trained["folder"] / "corpus"
    with pytest.MonkeyPatch.context() as patch:  # the cache the command line below reads too
        patch.setenv("WORDLM_CACHE", str(trained["folder"] / "cache"))
        patch.setenv("WORDLM_OFFLINE", "1")
        # and its fused-decoder choices (the backend reads a cache folder's choices when the process moves to it, and
        # writes each one it makes there, so the command line finds every one this run makes)
        patch.chdir(folder)
        run = wordlm.train(preset="smoke", dataset=str(corpus), epochs=2, seed=5, save="api.pt")
    return {"run": run, "folder": folder, "corpus": corpus}


def test_train_gives_the_tested_model_its_figures_and_history(api_run):
    run, folder = api_run["run"], api_run["folder"]
    assert isinstance(run, wordlm.TrainingRun) and isinstance(run.model, wordlm.LanguageModel)
    valid = [value for _, value in run.history["valid.ppl"]]
    assert [step for step, _ in run.history["valid.ppl"]] == [1, 2] and run.best_valid_ppl == min(valid)
    assert run.history["test.ppl"][-1][1] == run.test_ppl and run.info["best_epoch"] in (1, 2)
    assert run.checkpoint == Path("api.pt") and (folder / "api.pt").is_file() and (folder / "api.last.pt").is_file()
    assert run.config["save_last"] == "api.last.pt" and run.config["epochs"] == 2 and run.config["emsize"] == 32
    assert not (folder / "runs").exists()  # no Sacred observer unless asked for
    # the returned model is the saved best one, and scores the test split as the run did
    test_ppl = run.model.perplexity(api_run["corpus"] / "test.txt")
    assert test_ppl == pytest.approx(run.test_ppl, rel=1e-9)
    assert wordlm.load(folder / "api.pt").perplexity(api_run["corpus"] / "test.txt") == pytest.approx(test_ppl)


def test_train_and_the_command_line_train_alike(api_run, tmp_path):
    """The same keys and seed through ``main.py with`` give the same figures, bit for bit. Both read one cache:
    where the fused decoder's two libraries run about as fast, each process timing them afresh could pick the other,
    which rounds the last bits differently (seen on an Ice Lake Xeon); a machine's one cache makes runs repeat."""
    result = run_cli("-F", "runs", "with", "smoke", f"dataset={api_run['corpus']}", "epochs=2", "seed=5",
                     "save=cli.pt", cwd=tmp_path, WORDLM_CACHE=str(api_run["folder"].parent / "cache"))  # fmt: skip
    metrics = json.loads((tmp_path / "runs" / "1" / "metrics.json").read_text())
    run = api_run["run"]
    assert metrics["valid.ppl"]["values"] == [value for _, value in run.history["valid.ppl"]]
    assert metrics["train.loss"]["values"] == [value for _, value in run.history["train.loss"]]
    assert metrics["test.ppl"]["values"] == [run.test_ppl]
    assert f"test ppl {run.test_ppl:8.2f}" in result.stdout


def test_train_refuses_an_unknown_key_and_a_bad_value_as_the_command_line_does(tmp_path, cli_here):
    with pytest.raises(TypeError, match=r"'bptt_len' \(did you mean bptt\?\) is not a training key"):
        wordlm.train(bptt_len=20)
    with pytest.raises(TypeError, match="'words' is not a training key"):  # a generate key: not training's
        wordlm.train(words=5)
    with pytest.raises(wordlm.UserError, match="preset='zaremba' is not a preset; use one of zaremba_small"):
        wordlm.train(preset="zaremba")
    for keys in (
        {"lr": -1},
        {"nonmono": 3, "optimizer": "adam"},
        {"save": "same.pt", "save_last": "same.pt"},
        {"time_budget": 0},
        {"lr_schedule": "cosine", "lr_decay": 0.5},
        {"lr_schedule": "linear"},
    ):
        said = cli_here("-u", "with", "smoke", *(f"{k}={v}" for k, v in keys.items()), cwd=tmp_path, check=False)
        message = said.stderr.strip().splitlines()[-1].removeprefix("error: ")
        with pytest.raises(wordlm.UserError) as raised:
            wordlm.train(preset="smoke", **keys)
        assert said.returncode == 1 and str(raised.value) == message, keys


def test_the_training_defaults_are_the_command_lines():
    from wordlm.config import PRESETS, defaults

    assert wordlm.PRESETS is PRESETS and PRESETS["smoke"]["emsize"] == 32
    sacred = ex.run("print_config", options={"--loglevel": "ERROR", "--unobserved": True}).config
    ours = defaults()
    assert ours == {key: sacred[key] for key in ours}
    assert defaults(save="x/b.pt")["save_last"] == "x/b.last.pt" and defaults(save="b")["save_last"] == "b.last.pt"
