"""Bad corpora through the command line: one line starting ``error:``, a non-zero exit, no traceback.

The corpora are written once per module (``corpora``), and each command reads them in the test's own process
(``cli_here``): a refusal takes milliseconds there, where a process of its own took seconds to start.
"""

from __future__ import annotations

import re

import pytest
from conftest import cut_corpus, write_corpus

SMOKE = ("-u", "with", "smoke", "max_batches=2")

# case -> (config updates, the one error line expected, as a regex)
BAD_INPUT = {
    "missing folder": (["dataset={tmp}/nowhere"], r"dataset='\S+/nowhere' is neither a folder nor a known corpus"),
    "missing split": (["dataset={tmp}/no-test"], r"dataset folder \S+/no-test lacks test.txt; a corpus folder needs"),
    "empty split": (
        ["dataset={tmp}/empty-valid"],
        r"\S+/empty-valid/valid.txt has no words; every split needs some text",
    ),
    "too short for batch_size": (
        ["dataset={tmp}/short", "batch_size=8"],
        r"batch_size=8 needs at least 16 training tokens, but the training split has 3; lower batch_size",
    ),
    "not UTF-8": (["dataset={tmp}/latin1"], r"\S+/latin1/train.txt: line 2 is not valid UTF-8 \(byte 0xe9\); convert"),
    "valid all unknown": (
        ["dataset={tmp}/foreign"],
        r"\S+/foreign/valid.txt: every word is unknown to train.txt's vocabulary",
    ),
    "no corpus and no network": (
        ["dataset=penn"],
        r"corpus penn is not in data/penn and downloads are off \(WORDLM_OFFLINE is set\); "
        r"put train.txt, valid.txt, test.txt of penn in data/penn yourself",
    ),
}


def make_corpora(tmp) -> None:
    write_corpus(tmp / "no-test", "a b\n", "a\n", "b\n")
    (tmp / "no-test" / "test.txt").unlink()
    write_corpus(tmp / "empty-valid", "a b\n", "", "a\n")
    write_corpus(tmp / "short", "a b\n", "a\n", "b\n")
    write_corpus(tmp / "latin1", "a b\n", "a\n", "b\n")
    (tmp / "latin1" / "train.txt").write_bytes(b"a b\ncaf\xe9 b\n")
    write_corpus(tmp / "foreign", "the cat\n", "le chat\n", "the\n")
    # Good text written the awkward way: BOM, CRLF, tabs, no final line break.
    awkward = cut_corpus(tmp / "awkward", tokens=(6_600, 900, 900))
    for split in ("train", "valid", "test"):
        text = (awkward / f"{split}.txt").read_text(encoding="utf-8").replace(" ", "\t").replace("\n", "\r\n")
        (awkward / f"{split}.txt").write_bytes(b"\xef\xbb\xbf" + text.rstrip("\r\n").encode())


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The folder holding the corpora, and the environment of the commands that read them."""
    tmp = tmp_path_factory.mktemp("cli-data")
    make_corpora(tmp)
    # Explicit settings, the same for every command here: a module fixture runs outside the autouse one.
    env = {"WORDLM_CACHE": str(tmp / "cache-bad"), "WORDLM_OFFLINE": "1", "WORDLM_DATA": str(tmp / "no-corpora-here")}
    return tmp, env


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_one_error_line_and_a_failing_exit(corpora, cli_here, case):
    tmp, env = corpora
    updates = [update.format(tmp=tmp) for update in BAD_INPUT[case][0]]
    result = cli_here(*SMOKE, *updates, cwd=tmp, check=False, **env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert re.fullmatch(r"error: " + BAD_INPUT[case][1] + r".*", errors[0]), errors[0]


def test_bom_crlf_and_tabs_train_like_plain_text_with_the_vocabulary_options(corpora, cli_here):
    tmp, env = corpora
    cache = tmp / "cache"
    good = [*SMOKE, f"dataset={tmp}/awkward", "min_freq=2", "max_vocab=300", f"save={tmp}/m.pt"]
    result = cli_here(*good, cwd=tmp, check=False, **{**env, "WORDLM_CACHE": str(cache)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(
        r"corpus \S+/awkward: vocabulary 300, tokens train \d+ / valid \d+ / test \d+ \(tokenized in", result.stderr
    )
    assert "tokens mapped to <unk> (words outside the vocabulary): train " in result.stderr
    assert len(list(cache.glob("corpus-*.pt"))) == 1, "the run did not use WORDLM_CACHE"
