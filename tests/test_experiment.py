"""The experiment module as Sacred sees it: every package module recorded, commands and presets present."""

from pathlib import Path

from wordlm.experiment import ex

PACKAGE = Path(__file__).resolve().parent.parent / "wordlm"


def test_every_wordlm_module_is_recorded_as_a_run_source():
    recorded = {Path(source.filename).name for source in ex.sources if Path(source.filename).parent == PACKAGE}
    entry_points = {"__main__.py"}  # `python -m wordlm`: like main.py, it runs the CLI when imported as __main__
    assert {path.name for path in PACKAGE.glob("*.py")} - entry_points <= recorded


def test_commands_and_presets():
    assert {"generate", "evaluate", "export", "runs", "plot"} <= set(ex.commands)
    presets = {"smoke", "zaremba_small", "zaremba_medium", "zaremba_large", "press_wolf_large_tied",
               "inan_medium_tied", "inan_large_tied", "awd_lstm_ptb", "awd_lstm_wt2"}  # fmt: skip
    assert presets <= set(ex.named_configs)
