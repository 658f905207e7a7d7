"""Sampling from a checkpoint: seeds, prompts, batched samples, filters, output, and bad input on the CLI."""

from __future__ import annotations

import importlib.util
import pickle
import re

import pytest
import torch
from conftest import ROOT, run_cli

from wordlm.data.corpus import EOS, UNK, Vocabulary
from wordlm.errors import UserError
from wordlm.experiment import error, ex
from wordlm.generation import (
    MAX_SAMPLES,
    MAX_TOKENS,
    MAX_WORDS,
    check_sampling_options,
    encode_prompt,
    filter_logits,
    format_samples,
    generate_words,
    sample_ids,
    sample_next,
)
from wordlm.models import ModelConfig, RNNModel
from wordlm.training.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint

WORDS = ["a", "b", "c", "d", "x", "y", "z", "w"]
NEXT = {EOS: ["a", "x"], "a": ["b"], "b": ["c"], "c": ["d"], "d": [EOS], "x": ["y"], "y": ["z"], "z": ["w"], "w": [EOS],
        UNK: ["a", "x"]}  # fmt: skip


def bigram_model(sharpness: float = 25.0) -> tuple[RNNModel, Vocabulary]:
    """A hand-set Elman RNN that writes lines "a b c d" and "x y z w", choosing each line's kind 50/50.

    Embedding and input weights are identities and the recurrent weights zero, so the hidden state is
    (about) the one-hot of the current word; the decoder gives the words that may follow it a logit
    of ``sharpness`` and every other word 0, which leaves them a probability below 1e-9.
    """
    vocab = Vocabulary([EOS, *WORDS, UNK])
    size = len(vocab)
    model = RNNModel(ModelConfig(size, "RNN_TANH", emsize=size, nhid=size, nlayers=1, dropout=0.0, tied=False))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.encoder.weight.copy_(3 * torch.eye(size))  # tanh(3) = 0.995
        model.rnn.weight_ih_l0.copy_(torch.eye(size))
        for word, followers in NEXT.items():
            for follower in followers:
                model.decoder.weight[vocab.word2idx[follower], vocab.word2idx[word]] = sharpness
    return model.eval(), vocab


@pytest.fixture(scope="module")
def two_line_model() -> tuple[RNNModel, Vocabulary]:
    return bigram_model()


def random_model(model_type: str = "LSTM", ntoken: int = 30, seed: int = 0) -> RNNModel:
    torch.manual_seed(seed)
    return RNNModel(ModelConfig(ntoken, model_type, emsize=12, nhid=12, nlayers=2, dropout=0.0, tied=True)).eval()


@pytest.fixture(scope="module")
def checkpoint(two_line_model, tmp_path_factory) -> str:
    model, vocab = two_line_model
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    save_checkpoint(path, model, vocab)
    return str(path)


def run_generate(tmp_path, **config) -> str:
    """Run the generate command in-process and return the text it wrote."""
    outf = tmp_path / f"out{len(list(tmp_path.iterdir()))}.txt"
    ex.run("generate", config_updates={"outf": str(outf), **config}, options={"--loglevel": "ERROR"})
    return outf.read_text(encoding="utf-8")


# -- the library -----------------------------------------------------------------------------------


def test_same_generator_seed_gives_same_words(two_line_model):
    model, vocab = two_line_model

    def words(seed):
        return generate_words(model, vocab, words=40, generator=torch.Generator().manual_seed(seed))

    assert words(3) == words(3)
    assert words(3) != words(4)


def test_prompt_conditions_the_continuation(two_line_model):
    model, vocab = two_line_model
    after = {}
    for prompt in ("a", "x"):
        after[prompt] = generate_words(
            model, vocab, words=3, prompt=prompt, samples=8, temperature=0.5, generator=torch.Generator().manual_seed(1)
        )
    assert after["a"] == [["b", "c", "d"]] * 8
    assert after["x"] == [["y", "z", "w"]] * 8


def test_samples_are_columns_of_one_batch_fed_one_token_a_step(two_line_model):
    """One forward for the context, then one per step, each with all samples and one new token."""
    model, vocab = two_line_model
    shapes = []
    handle = model.encoder.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        sampled = sample_ids(model, vocab.encode([EOS, "a", "b"]), words=6, samples=5,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        handle.remove()
    assert sampled.shape == (6, 5)
    assert shapes == [(3, 5)] + [(1, 5)] * 5  # the last sampled token is never fed back


def test_carried_state_equals_rerunning_the_prefix():
    """Greedy decoding (top_k=1) with the carried state picks what a full re-run of the prefix picks."""
    model = random_model()
    context = [0, 5, 7]
    carried = sample_ids(model, context, words=12, samples=3, top_k=1)  # (S, B)
    sequence = list(context)
    with torch.inference_mode():
        for _ in range(12):
            logits, _ = model(torch.tensor(sequence).view(-1, 1), model.init_hidden(1))  # (T, 1, V)
            sequence.append(int(logits[-1, 0].argmax()))
    assert carried.t().tolist() == [sequence[len(context) :]] * 3


def test_stop_at_eos_ends_each_sample_with_its_first_line(two_line_model):
    model, vocab = two_line_model
    generator = torch.Generator().manual_seed(2)
    texts = generate_words(model, vocab, words=50, samples=6, stop_at_eos=True, generator=generator)
    assert {" ".join(words) for words in texts} <= {"a b c d <eos>", "x y z w <eos>"}
    assert {words[0] for words in texts} == {"a", "x"}  # both kinds of line were drawn


def test_filter_logits_keeps_top_k_and_the_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # probabilities, as logits
    kept = lambda filtered: torch.isfinite(filtered[0]).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.79)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_p=1.0)) == [True] * 4
    shuffled = logits[:, [2, 0, 3, 1]]  # the nucleus follows the words, not their positions
    assert kept(filter_logits(shuffled, top_p=0.79)) == [False, True, False, True]


def test_sample_next_draws_from_the_tempered_filtered_distribution():
    """Frequencies over 40,000 rows match softmax(logits / T) renormalised over the kept words."""
    probs = torch.tensor([0.05, 0.4, 0.0, 0.3, 0.25])
    logits = probs.log().expand(40_000, -1)  # (B, V); the 0.0 word has logit -inf
    generator = torch.Generator().manual_seed(0)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (2.0, 0, 0.6)):
        tokens = sample_next(logits, temperature, top_k, top_p, generator)
        frequencies = torch.bincount(tokens, minlength=5).double() / tokens.numel()
        tempered = probs.double() ** (1 / temperature)
        kept = torch.isfinite(filter_logits(tempered.log().unsqueeze(0), top_k, top_p)[0])
        expected = torch.where(kept, tempered, 0) / tempered[kept].sum()
        assert frequencies.tolist() == pytest.approx(expected.tolist(), abs=0.01)
        assert frequencies[~kept].sum() == 0


def test_low_temperature_picks_the_most_likely_word():
    logits = torch.tensor([[1.0, 3.0, 2.9], [0.0, -1.0, 5.0]])
    generator = torch.Generator().manual_seed(0)
    for temperature in (1e-3, 1e-30):
        assert sample_next(logits, temperature, generator=generator).tolist() == [1, 2]


def test_prompt_words_unknown_to_the_vocabulary():
    with_unk = Vocabulary([EOS, "a", UNK])
    assert encode_prompt(with_unk, "a zz\na") == (with_unk.encode([EOS, "a", UNK, EOS, "a"]), ["zz"])
    without_unk = Vocabulary([EOS, "a"])
    assert encode_prompt(without_unk, "zz a") == ([0, 1], ["zz"])
    assert encode_prompt(without_unk, "") == ([0], [])


def test_format_samples_breaks_lines_at_eos_and_heads_several():
    assert format_samples("", [["a", "b", EOS, "c"]]) == "a b\nc\n"
    assert format_samples("x\ny", [[EOS, EOS, "z"]]) == "x\ny\n\nz\n"
    assert format_samples("p", [["a", EOS], ["b"]]) == "--- sample 1 of 2 ---\np a\n--- sample 2 of 2 ---\np b\n"


@pytest.mark.parametrize(
    "key, value",
    [("temperature", 0), ("temperature", -1.0), ("temperature", float("inf")), ("top_p", 0.0), ("top_p", 1.01),
     ("top_k", -1), ("words", 0), ("samples", 0), ("words", 2.5), ("words", 1_000_001), ("samples", 1_001),
     ("words", 10**18), ("samples", 10**12)],
)  # fmt: skip
def test_bad_sampling_options_name_the_key(key, value):
    options = {"words": 5, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "samples": 1, key: value}
    with pytest.raises(UserError, match=rf"^{key}="):
        check_sampling_options(**options)


def test_words_and_samples_have_a_stated_limit_alone_and_together():
    options = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert (MAX_WORDS, MAX_SAMPLES, MAX_TOKENS) == (1_000_000, 1_000, 10_000_000)
    for words, samples in ((MAX_WORDS, 10), (10_000, MAX_SAMPLES)):  # each at its limit, the total at its own
        check_sampling_options(words=words, samples=samples, **options)
    with pytest.raises(UserError) as caught:
        check_sampling_options(words=MAX_WORDS + 1, samples=1, **options)
    assert str(caught.value) == ("words=1000001 is more than 1,000,000, the most tokens one sample may have; "
                                 "ask for fewer (more calls, with other seeds, give more text)")  # fmt: skip
    with pytest.raises(UserError) as caught:
        check_sampling_options(words=10_001, samples=MAX_SAMPLES, **options)
    assert str(caught.value) == ("words=10001 with samples=1000 make 10,001,000 tokens, more than the 10,000,000 "
                                 "one call may sample; lower words or samples")  # fmt: skip


# -- the generate command --------------------------------------------------------------------------


def test_command_same_seed_same_text_different_seed_different(checkpoint, tmp_path):
    first = run_generate(tmp_path, checkpoint=checkpoint, words=60, seed=11)
    assert first == run_generate(tmp_path, checkpoint=checkpoint, words=60, seed=11)
    assert first != run_generate(tmp_path, checkpoint=checkpoint, words=60, seed=12)
    assert set(first.split()) <= set(WORDS) and "\n" in first.strip()  # <eos> became line breaks


def test_command_writes_batched_samples_after_the_prompt(checkpoint, tmp_path):
    text = run_generate(tmp_path, checkpoint=checkpoint, words=9, samples=3, prompt="x", stop_at_eos=True, top_p=0.9)
    assert text == "".join(f"--- sample {n} of 3 ---\nx y z w\n" for n in (1, 2, 3))


def test_generate_script_runs_the_generate_command(checkpoint, tmp_path):
    """A subprocess, as a user runs generate.py: this script's witness of the text a real process writes, with its
    WARNING on stderr."""
    result = run_cli("with", f"checkpoint={checkpoint}", "words=12", "outf=-", "prompt=qq x", "-u",
                     cwd=tmp_path, script="generate.py")  # fmt: skip
    assert result.stdout.startswith("qq x ") and set(result.stdout.split()) <= {"qq", *WORDS}
    assert "WARNING" in result.stderr and "read as <unk>: qq" in result.stderr
    assert not (tmp_path / "runs").exists()  # -u


def test_generate_script_passes_other_commands_through(tmp_path, cli_here):
    result = cli_here("print_config", "with", "words=7", cwd=tmp_path, script="generate.py")
    assert re.search(r"words = 7\b", result.stdout) and "top_p = 1.0" in result.stdout
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.with_default_command(["g.py", "with", "a=1"], "generate") == ["g.py", "generate", "with", "a=1"]
    assert script.with_default_command(["g.py", "-u", "print_config"], "generate") == ["g.py", "-u", "print_config"]
    assert script.with_default_command(["g.py", "-F", "r", "with", "x=print_config"], "generate")[1] == "generate"


# -- bad input on the command line: one "error:" line, no traceback ------------------------------------


class WouldRunCode:
    """Unpickling this would create a file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_checkpoint(kind: str, folder) -> str:
    path = folder / f"{kind}.pt"
    if kind == "missing":
        pass
    elif kind == "not_a_checkpoint":
        path.write_text("this is a plain text file\n", encoding="utf-8")
    elif kind == "newer_format":
        model = RNNModel(ModelConfig(3, "GRU", 4, 4, 1, 0.0, True))
        save_checkpoint(path, model, Vocabulary(["a", "b", EOS]))
        payload = torch.load(path, weights_only=True)
        torch.save({**payload, "format_version": FORMAT_VERSION + 1}, path)
    elif kind == "runs_code":
        torch.save({"format_version": 1, "model_state": WouldRunCode(str(folder / "pwned"))}, path)
    elif kind == "runs_code_plain_pickle":
        path.write_bytes(pickle.dumps({"format_version": 1, "model_state": WouldRunCode(str(folder / "pwned"))}))
    return str(path)


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.parametrize(
    "kind, fragment",
    [("missing", "does not exist"), ("not_a_checkpoint", "is damaged or is no wordlm checkpoint"),
     ("newer_format", f"format {FORMAT_VERSION + 1}, newer"), ("runs_code", "was refused")],
)  # fmt: skip
def test_bad_checkpoint_is_one_error_line(kind, fragment, tmp_path, cli_here):
    path = bad_checkpoint(kind, tmp_path)
    result = cli_here("-u", "with", f"checkpoint={path}", "words=3", cwd=tmp_path, script="generate.py", check=False)
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "generated.txt").exists()


def test_refusal_names_what_would_run_and_runs_nothing(tmp_path):
    """The same refusal for a plain pickle (no torch zip) and for a legacy-format torch file."""
    for kind in ("runs_code", "runs_code_plain_pickle"):
        with pytest.raises(UserError, match=r"was refused, and nothing in it was run: loading it would call io\.open"):
            load_checkpoint(bad_checkpoint(kind, tmp_path))
    legacy = tmp_path / "legacy.pt"
    torch.save({"format_version": 1, "x": WouldRunCode(str(tmp_path / "pwned"))}, legacy,
               _use_new_zipfile_serialization=False)  # fmt: skip
    with pytest.raises(UserError, match="io.open"):
        load_checkpoint(legacy)
    assert not (tmp_path / "pwned").exists()


# temperature < 0 and top_p = 0 are checked without the CLI in test_bad_sampling_options_name_the_key
@pytest.mark.parametrize(
    "setting, fragment",
    [("temperature=0", "temperature=0 must be"), ("top_p=1.5", "top_p=1.5 must be in (0, 1]"),
     ("words=0", "words=0 must be a positive integer")],
)  # fmt: skip
def test_bad_sampling_option_is_one_error_line(setting, fragment, checkpoint, tmp_path, cli_here):
    result = cli_here("-u", "with", f"checkpoint={checkpoint}", setting, cwd=tmp_path, script="generate.py",
                      check=False)  # fmt: skip
    assert_one_error_line(result, fragment)


@pytest.mark.parametrize(
    "keys, message",
    [({"words": 10**18}, "words=1000000000000000000 is more than 1,000,000, the most tokens one sample may have"),
     ({"samples": 10**12}, "samples=1000000000000 is more than 1,000, the most sampled side by side"),
     ({"words": 100_000, "samples": 1_000}, "words=100000 with samples=1000 make 100,000,000 tokens, more than")],
)  # fmt: skip
def test_huge_generate_is_refused_before_the_checkpoint_is_read(keys, message, tmp_path):
    """The limits are checked first: the checkpoint named here does not even exist, and nothing is written."""
    with pytest.raises(error) as caught:
        ex.run("generate", config_updates={"checkpoint": str(tmp_path / "absent.pt"), "outf": str(tmp_path / "g.txt"),
                                           **keys}, options={"--loglevel": "ERROR", "--unobserved": True})  # fmt: skip
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_huge_words_is_one_error_line_from_generate_script(checkpoint, tmp_path):
    """A subprocess, as a user runs generate.py: this script's witness of an error line from a real process (the
    other error lines here are checked in this process, cli_here)."""
    result = run_cli("-u", "with", f"checkpoint={checkpoint}", "words=1000000000000000000", "outf=g.txt",
                     cwd=tmp_path, script="generate.py", check=False)  # fmt: skip
    assert_one_error_line(result, "words=1000000000000000000 is more than 1,000,000")
    assert not (tmp_path / "g.txt").exists()


def test_outf_in_a_new_folder_is_written_there(checkpoint, tmp_path, cli_here):
    cli_here("with", f"checkpoint={checkpoint}", "words=4", "outf=new/dir/g.txt", "-u", cwd=tmp_path,
             script="generate.py")  # fmt: skip
    assert len((tmp_path / "new" / "dir" / "g.txt").read_text(encoding="utf-8").split()) >= 4
