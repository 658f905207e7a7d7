"""wordlm.config: the training keys, the presets and how a resumed run's config is merged (no training here)."""

from __future__ import annotations

import pytest

from wordlm.config import PRESETS, build_model_config, defaults, make_config, resumed_config, validate_training_config
from wordlm.errors import UserError


def test_make_config_layers_defaults_then_preset_then_keys_and_names_what_was_set():
    cfg, named = make_config("zaremba_small", lr=5.0, seed=3)
    assert (cfg["lr"], cfg["seed"]) == (5.0, 3)  # the keys win over the preset
    assert (cfg["bptt"], cfg["dataset"], cfg["tied"]) == (20, "penn", False)  # the preset over the defaults
    assert cfg["eval_batch_size"] == defaults()["eval_batch_size"]  # the rest are the defaults
    assert named == set(PRESETS["zaremba_small"]) | {"lr", "seed"}


def test_make_config_refuses_an_unknown_key_naming_the_nearest_and_an_unknown_preset():
    with pytest.raises(
        TypeError, match=r"'lr_decya' \(did you mean lr_decay or lr_decay_start\?\) is not a training key"
    ):
        make_config(lr_decya=0.5)
    with pytest.raises(TypeError, match="'foo' and 'bar' are not training keys"):
        make_config(foo=1, bar=2)
    with pytest.raises(UserError, match="preset='zaremba' is not a preset; use one of zaremba_small"):
        make_config("zaremba")


def test_a_derived_key_follows_a_pinned_one_unless_pinned_itself():
    assert defaults(save="runs/a.pt")["save_last"] == "runs/a.last.pt"
    assert defaults(save="runs/a.pt", save_last="keep.pt")["save_last"] == "keep.pt"
    assert make_config(save="b")[0]["save_last"] == "b.last.pt"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_training_config_with_a_buildable_model(name):
    cfg, _ = make_config(name)
    assert validate_training_config(cfg) is None
    model = build_model_config(100_000, cfg)
    assert (model.emsize, model.nhid, model.nlayers) == (cfg["emsize"], cfg["nhid"], cfg["nlayers"])


def test_the_budget_preset_trains_for_30_minutes_along_a_cosine_on_wikitext2():
    cfg, _ = make_config("budget_wt2")
    assert (cfg["dataset"], cfg["time_budget"], cfg["lr_schedule"]) == ("wikitext-2", 30, "cosine")
    assert cfg["adaptive_softmax"] and cfg["tied"] is True  # tied: the adaptive softmax's vectors are the input's
    assert cfg["epochs"] >= 100  # the budget, not the epoch count, ends the run


@pytest.mark.parametrize("name, model_type", [("budget_wt2_2h", "LSTM"), ("budget_wt2_transformer", "Transformer")])
def test_the_two_hour_wikitext2_presets_train_for_120_minutes_tied_along_a_cosine(name, model_type):
    cfg, _ = make_config(name)
    assert (cfg["dataset"], cfg["time_budget"], cfg["lr_schedule"]) == ("wikitext-2", 120, "cosine")
    assert (cfg["model_type"], cfg["tied"], cfg["adaptive_softmax"]) == (model_type, True, [2000, 10000])
    assert cfg["epochs"] >= 100 and cfg["amp"] is None  # bf16 is the user's choice: it needs the CPU for it


def _payload(config: dict) -> dict:
    return {"meta": {"config": config, "corpus_folder": None}, "training": {"epoch": 1}}


def test_a_resumed_run_keeps_the_checkpoints_keys_and_takes_the_ones_given_now():
    saved = defaults(lr=5.0, epochs=3, nhid=64, save="old.pt")
    now = defaults(resume="old.last.pt", epochs=6)
    merged = resumed_config(now, {"resume", "epochs"}, _payload(saved), "old.last.pt")
    assert (merged["lr"], merged["nhid"], merged["epochs"]) == (5.0, 64, 6)
    assert (merged["save"], merged["save_last"], merged["resume"]) == ("old.pt", "old.last.pt", "old.last.pt")
    moved = resumed_config(defaults(resume="old.last.pt", save="new.pt"), {"resume", "save"}, _payload(saved), "x")
    assert (moved["save"], moved["save_last"]) == ("new.pt", "new.last.pt")  # save_last follows a new save


def test_a_resumed_run_refuses_to_change_the_model_and_says_which_keys():
    saved = defaults(nhid=64)
    with pytest.raises(
        UserError, match=r"resume cannot change bptt=20 \(checkpoint: 35\), nhid=128 \(checkpoint: 64\); drop"
    ):
        resumed_config(defaults(nhid=128, bptt=20), {"nhid", "bptt", "resume"}, _payload(saved), "m.pt")
    with pytest.raises(UserError, match="m.pt holds no training state to resume from"):
        resumed_config(defaults(), {"resume"}, {"meta": {"config": saved}}, "m.pt")
