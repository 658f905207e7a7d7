"""The experiment module as Sacred sees it: every package module recorded, commands and presets present."""

from pathlib import Path

from wordlm.experiment import ex

PACKAGE = Path(__file__).resolve().parent.parent / "wordlm"


def test_every_wordlm_module_is_recorded_as_a_run_source():
    recorded = {
        Path(source.filename).relative_to(PACKAGE).as_posix()
        for source in ex.sources
        if PACKAGE in Path(source.filename).parents
    }
    entry_points = {"__main__.py"}  # `python -m wordlm`: like main.py, it runs the CLI when imported as __main__
    assert {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")} - entry_points <= recorded


def test_commands_and_presets():
    assert {"generate", "evaluate", "export", "runs", "plot"} <= set(ex.commands)
    presets = {"smoke", "zaremba_small", "zaremba_medium", "zaremba_large", "press_wolf_large_tied",
               "inan_medium_tied", "inan_large_tied", "awd_lstm_ptb", "awd_lstm_wt2"}  # fmt: skip
    assert presets <= set(ex.named_configs)


def test_main_leaves_no_observer_behind_for_the_next_command_line_in_the_process(tmp_path, monkeypatch, capsys):
    # main() adds the default runs/ observer for its own command line only: one left in ex.observers made every
    # later run in the process (tests, a notebook) also record into the first one's folder, under its run ids
    from wordlm.experiment import main

    monkeypatch.chdir(tmp_path)
    before = list(ex.observers)
    for argv in (["main.py", "print_config"], ["main.py", "-s", f"sqlite:///{tmp_path / 'r.db'}", "print_config"]):
        try:
            main(argv)
        except SystemExit as stop:
            assert stop.code in (0, None)
        assert ex.observers == before
