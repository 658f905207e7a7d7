"""TensorBoard event files, written live while a run trains (the ``tensorboard`` key).

Main names: ``check_tensorboard`` (the key's value, checked before any work: TensorBoard installed, the folder
writable), ``run_folder_name`` (the sub-folder that tells one run from another) and ``TensorBoardLog`` (the writer a
training run's figures pass through on their way to its ``Recorder``). Must not import Sacred. TensorBoard is an
optional extra: ``torch.utils.tensorboard`` is imported only when the key is set.

Every scalar's step is the number of training tokens seen when it was logged: the per-report figures
(``train/loss``, ``train/ppl``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_second``), the per-epoch ones
(``valid/loss``, ``valid/ppl``, ``epoch``, ``epoch/tokens_per_second``) and the end's (``test/*``, ``final/*``). One
unit for all tags, because a resumed run's ``purge_step`` (a ``SessionLog`` START that makes TensorBoard drop every
point of every tag at or after that step) must fall right after the resumed state: whatever a killed session logged
past that state is dropped, and the resumed run logs it again.
"""

from __future__ import annotations

import json
import math
import re
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from wordlm.checks import _can_create_in, path_problem
from wordlm.errors import UserError

__all__ = [
    "INSTALL", "SAMPLE_WORDS", "FLUSH_SECONDS", "MAX_NAME", "check_tensorboard", "run_folder_name", "TensorBoardLog"
]  # fmt: skip

INSTALL = "run .venv/bin/pip install -e '.[tensorboard]' in the wordlm clone"
SAMPLE_WORDS = 40  # the sample written as text after each validation: this many tokens
FLUSH_SECONDS = 10  # how often the writer's thread flushes its events to the file: how live TensorBoard is
# The Recorder's metric names whose TensorBoard tag is not the name with '.' as '/': the per-epoch figures
_TAGS = {"lr": "epoch/lr", "tokens_per_second": "epoch/tokens_per_second"}
_FINAL = ("best_valid_ppl", "test_ppl", "best_epoch", "tokens_per_second", "training_seconds", "tokens_seen")
# Keys left out of a run's folder name: outputs and where it runs, which tell nothing of what it trains
_NOT_NAMED = frozenset({"save", "save_last", "resume", "tensorboard", "onnx_export", "checkpoint_every", "device"})
_START_TAG, _END_TAG = "_hparams_/session_start_info", "_hparams_/session_end_info"  # the HParams plugin's tags
MAX_NAME = 120  # characters of a folder name's keys part before the rest is counted as '+N'


def check_tensorboard(value) -> Path:
    """The ``tensorboard`` folder, checked before any work and made: TensorBoard must be installed and the folder
    writable (a file, or a folder nothing can be made in, is refused).

    Raises:
        UserError: one line saying what is wrong and what to do.
    """
    shown = f"tensorboard={value!r}"
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{shown} must be a folder path (a non-empty string), e.g. tensorboard=runs/tensorboard")
    try:
        import torch.utils.tensorboard  # noqa: F401 - (imports tensorboard, which the extra installs)
    except ImportError:
        raise UserError(f"{shown} needs TensorBoard, which is not installed: {INSTALL}") from None
    folder = Path(value).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{shown} is a file; give a folder for TensorBoard's event files (made if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((parent for parent in folder.parents if parent.is_file()), folder.parent)
        raise UserError(f"cannot write {shown}: {blocking} is a file, not a folder") from None
    except OSError as problem:
        raise UserError(f"cannot write {shown}: {path_problem(problem)}") from None
    if not _can_create_in(folder):  # tried, not os.access: root may "write" where nothing can be made
        raise UserError(f"cannot write {shown}: the folder is not writable")
    return folder


def run_folder_name(
    cfg: dict, given: Iterable[str], presets: dict[str, dict], run_id=None, now: datetime | None = None
) -> str:
    """A run's sub-folder: its local start time (so that TensorBoard lists runs in the order they started), its Sacred
    id, its preset and the keys given beside the preset, e.g. ``20260601-101530_run3_smoke_epochs=2,lr=5``.

    The preset is the one whose keys were all given and whose values most of the config's are (``presets``:
    ``wordlm.config.PRESETS``); outputs, ``device`` and ``resume`` are left out; the keys beyond ``MAX_NAME``
    characters are counted (``,+3``). Only letters, digits and ``._+-=,`` are kept.
    """
    parts = [(now or datetime.now()).strftime("%Y%m%d-%H%M%S")]
    if run_id is not None:
        parts.append(f"run{_safe(str(run_id))}")
    given = set(given) & set(cfg)
    chosen = [(sum(cfg[k] == v for k, v in keys.items()), name) for name, keys in presets.items() if set(keys) <= given]
    preset = max(chosen, key=lambda pair: pair[0])[1] if chosen else None  # (the first among equals)
    shown = sorted(given - _NOT_NAMED)
    if preset is not None:
        parts.append(preset)
        shown = [key for key in shown if key not in presets[preset] or cfg[key] != presets[preset][key]]
    keys, length = [], 0
    for key in shown:
        item = f"{key}={_value_text(key, cfg[key])}"
        if length + len(item) > MAX_NAME:
            keys.append(f"+{len(shown) - len(keys)}")
            break
        keys.append(item)
        length += len(item) + 1
    return "_".join(parts + ([",".join(keys)] if keys else []))


def _value_text(key: str, value) -> str:
    if key == "dataset" and isinstance(value, str):
        value = Path(value).name or value  # a corpus folder by its name
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "-".join(map(str, value))
    else:
        text = str(value)
    return _safe(text)[:24]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "-"


def _hparam(value):
    """A config value as TensorBoard's HParams view shows it: a number, a boolean or text (None and lists as text)."""
    from google.protobuf.struct_pb2 import Value

    if isinstance(value, bool):
        return Value(bool_value=value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return Value(number_value=float(value))
    if isinstance(value, str):
        return Value(string_value=value)
    return Value(string_value=json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value))


def _hparams_summary(tag: str, **data):
    """A summary of the HParams plugin (``session_start_info`` or ``session_end_info``), as
    ``torch.utils.tensorboard.summary.hparams`` writes them, but with booleans as booleans (it writes them as
    numbers) and without the ``experiment`` tag: TensorBoard then computes the experiment from every run's start
    info, so that runs of different configs compare in one table."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME

    content = plugin_data_pb2.HParamsPluginData(version=PLUGIN_DATA_VERSION, **data).SerializeToString()
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content))
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata)])


class TensorBoardLog:
    """A run's TensorBoard writer: ``<folder>/<name>/``, one event file per session of the run.

    ``tee(log)`` gives the function a ``Reporter`` logs its figures with: each goes to ``log`` (the ``Recorder``) as
    it was, and here at the step ``state.tokens_seen`` (the ``TrainState`` training mutates in place). After each
    validation ``sample()`` (a short text sampled from the model) is written as text; ``finish`` writes the final
    figures and the HParams session's end. A folder that exists already is a resumed run's: its writer purges
    from the step after the resumed state's, so a killed session's later points are dropped, not doubled.

    Closed by ``finish``, or when it is collected or the process exits (events of an exception's run kept).
    """

    def __init__(
        self, folder: str | Path, name: str, state, config: dict, sample: Callable[[], str] | None = None
    ) -> None:
        from tensorboard.plugins.hparams.plugin_data_pb2 import SessionStartInfo
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(folder).expanduser() / name
        self.state, self.sample = state, sample
        self.resumed = self.path.is_dir()
        purge_step = state.tokens_seen + 1 if self.resumed else None
        self.writer = SummaryWriter(str(self.path), purge_step=purge_step, flush_secs=FLUSH_SECONDS)
        self._close = weakref.finalize(self, self.writer.close)
        if not self.resumed:  # (TensorBoard reads the first start info of a run's folder)
            hparams = {key: _hparam(value) for key, value in sorted(config.items())}
            start = SessionStartInfo(hparams=hparams, start_time_secs=time.time())
            self.writer.file_writer.add_summary(_hparams_summary(_START_TAG, session_start_info=start))

    def tee(self, log: Callable[[str, float, int | None], None]) -> Callable[[str, float, int | None], None]:
        def both(name: str, value: float, step: int | None = None) -> None:
            log(name, value, step)
            self.scalar(name, value, step)

        return both

    def scalar(self, name: str, value: float, step: int | None = None) -> None:
        """One of the Recorder's metrics at the tokens seen (``tokens_seen``, logged per epoch, becomes ``epoch``)."""
        at = self.state.tokens_seen
        if name == "tokens_seen":
            self.writer.add_scalar("epoch", step, at)
            return
        self.writer.add_scalar(_TAGS.get(name, name.replace(".", "/")), value, at)
        if name == "valid.ppl":
            if self.sample is not None:
                text = self.sample()
                self.writer.add_text("sample", "".join(f"    {line}\n" for line in text.splitlines()), at)
            self.writer.flush()

    def finish(self, info: dict, interrupted: bool = False) -> None:
        """The run's final figures (``final/*``: the HParams view's metrics), the session's end, and close."""
        from tensorboard.plugins.hparams.api_pb2 import Status
        from tensorboard.plugins.hparams.plugin_data_pb2 import SessionEndInfo

        at = self.state.tokens_seen
        for key in _FINAL:
            value = info.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"final/{key}", value, at)
        status = Status.Value("STATUS_ABORTED" if interrupted else "STATUS_SUCCESS")
        end = SessionEndInfo(status=status, end_time_secs=time.time())
        self.writer.file_writer.add_summary(_hparams_summary(_END_TAG, session_end_info=end), at)
        self.close()

    def close(self) -> None:
        self._close()
