"""Checkpoints as plain data: written atomically, loaded without ever running code from the file.

Main names: ``save_checkpoint``, ``write_payload``, ``check_checkpoint_file``, ``load_checkpoint``,
``model_from_checkpoint``, and the ``CheckpointKeeper`` of a training run (best, latest and stopped states) with its
null object ``NoCheckpoints``. Must not import Sacred, nor the trainer: the trainer hands the keeper plain payloads.

A checkpoint is one ``torch.save`` file holding a dict of tensors, numbers, strings and lists:

    format_version   int, ``FORMAT_VERSION`` of the writer
    model_config     ModelConfig as a dict (rebuilds the model without the corpus)
    model_state      the model's state_dict
    vocab            list of words, index = id
    training         optional: optimizer state, epoch, batch, lr, best loss, RNG states (for resume)
    meta             optional: free-form facts (config, wordlm version, validation loss)

It always loads with ``torch.load(..., weights_only=True)``: a pickle that would build arbitrary
objects (and so could run code) is refused before anything in it runs.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import shutil
import stat
import warnings
import zipfile
from pathlib import Path

import torch

from wordlm.data.corpus import Vocabulary
from wordlm.errors import UserError, warn
from wordlm.files import atomic_file
from wordlm.models import ModelConfig, WordModel, build_model

__all__ = [
    "FORMAT_VERSION", "save_checkpoint", "write_payload", "MAX_PICKLE_BYTES", "check_checkpoint_file",
    "load_checkpoint", "model_from_checkpoint", "CheckpointKeeper", "NoCheckpoints"
]  # fmt: skip

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: WordModel, vocab: Vocabulary, **extra) -> tuple[int, int]:
    """Write a checkpoint atomically (``wordlm.files.atomic_file``): a temporary file, fsync, rename.

    A reader (or a crash at any moment) sees either the previous file or the complete new one.
    ``extra`` entries (``training``, ``meta``) are stored beside the model. A symbolic link is written through.

    Returns:
        The written file's ``(st_dev, st_ino)``: whether ``path`` still holds this very file can be told later,
        when another process may have written its own there since.

    Raises:
        OSError: the write failed (disk full, permission denied, ``path`` a device or FIFO); the previous file
            is untouched.
    """
    payload = {
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": list(vocab.idx2word),
        **extra,
    }
    return write_payload(path, payload)


def write_payload(path: str | os.PathLike, payload: dict) -> tuple[int, int]:
    """Write a checkpoint's ``payload`` atomically, as ``save_checkpoint`` does, and return the file's identity."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as stream:
        torch.save(payload, stream)
        written = os.fstat(stream.fileno())  # the same file after the rename
    return written.st_dev, written.st_ino


MAX_PICKLE_BYTES = 64 << 20  # a wordlm checkpoint's data.pkl holds the vocabulary and config: a few MB


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is a regular file, else ``UserError``: one line saying what it is instead."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; train one with `python main.py with save={path}`") from None
    except OSError as problem:
        raise UserError(f"cannot read checkpoint {path}: {problem.strerror or problem}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"checkpoint {path} is a folder; give a checkpoint file such as {path / 'model.pt'}")
    if not stat.S_ISREG(mode):
        raise UserError(f"checkpoint {path} is no regular file (a device, FIFO or socket); give a checkpoint file")
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", max_pickle_bytes: int = MAX_PICKLE_BYTES
) -> dict:
    """Load a checkpoint dict safely, or raise ``UserError`` with one line saying what is wrong.

    Args:
        path: the checkpoint file.
        map_location: where its tensors go.
        max_pickle_bytes: a zip checkpoint whose pickle (``data.pkl``: everything but the tensors' bytes) would
            inflate beyond this is refused before any of it is read: no real checkpoint comes near, and a crafted
            one could otherwise take minutes and gigabytes to refuse.
    """
    path = check_checkpoint_file(path)
    _check_pickle_size(path, max_pickle_bytes)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol is noted before it is refused anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        callables = _foreign_globals(path)
        if callables:
            raise UserError(
                f"{path} was refused, and nothing in it was run: loading it would call {', '.join(callables[:3])}, "
                "which can run any code; only wordlm checkpoints (plain data) are loaded"
            ) from None
        raise UserError(f"{path} is not a wordlm checkpoint (it is no file that torch.save wrote)") from None
    except Exception as error:  # torch.load fails on arbitrary bytes with many types: KeyError, RuntimeError, ...
        problem = f"{type(error).__name__}: {' '.join(str(error).split()).split('. ')[0][:100]}"
        raise UserError(
            f"{path} is damaged or is no wordlm checkpoint ({problem}); use another checkpoint "
            "(save_last keeps the latest training state) or train again"
        ) from None
    if not isinstance(payload, dict) or "format_version" not in payload or "model_state" not in payload:
        raise UserError(f"{path} is not a wordlm checkpoint (it holds no format_version/model_state)")
    version = payload["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path} has checkpoint format {version}, newer than this wordlm understands ({FORMAT_VERSION}); "
            "upgrade wordlm to load it"
        )
    return payload


def _check_pickle_size(path: Path, limit: int) -> None:
    """Refuse a zip checkpoint whose ``data.pkl``, or any member, inflates beyond what a checkpoint can hold."""
    try:
        if not zipfile.is_zipfile(path):
            return  # a legacy torch file, or no checkpoint: torch.load says which
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # torch.load gives the one line for a damaged file
    size = os.path.getsize(path)
    for member in members:
        if member.filename.endswith("data.pkl") and member.file_size > limit:
            why = f"a checkpoint's pickle holds a few MB; at most {limit:,} bytes are read"
        elif member.file_size > max(limit, 2 * size):
            why = f"far more than the {size:,}-byte file holds"
        else:
            continue
        raise UserError(
            f"{path} was refused before reading it: its member {member.filename} would inflate to "
            f"{member.file_size:,} bytes ({why}); it is damaged or crafted, use another checkpoint"
        )


_PLAIN_DATA_MODULES = ("torch", "collections", "_codecs")  # what torch.save itself names in a pickle
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _foreign_globals(path: Path, limit: int = 16) -> list[str]:
    """Name the callables a refused pickle would import, read with ``pickletools`` (which runs nothing).

    Only chooses the message: the refusal itself is ``torch.load(weights_only=True)``'s. Reads the
    ``data.pkl`` of a zip checkpoint, else the pickles at the start of the file.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
                stream = io.BytesIO(archive.read(member) if member else b"")
        else:
            stream = open(path, "rb")
    except (OSError, zipfile.BadZipFile):
        return []
    found, strings, memo = [], [], {}
    with stream:
        try:
            for _ in range(limit):  # a legacy torch file is several pickles in a row
                for opcode, argument, _ in pickletools.genops(stream):
                    if opcode.name in ("GLOBAL", "INST"):
                        found.append(argument.replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif opcode.name in _STRING_OPCODES:
                        strings.append(str(argument))
                    elif opcode.name == "MEMOIZE" and strings:
                        memo[len(memo)] = strings[-1]
                    elif opcode.name in ("BINGET", "LONG_BINGET", "GET") and argument in memo:
                        strings.append(memo[argument])
        except Exception:  # the end of the pickles, or bytes that are no pickle at all
            pass
    foreign = [name for name in found if name.split(".")[0] not in _PLAIN_DATA_MODULES]
    return list(dict.fromkeys(foreign))


def model_from_checkpoint(payload: dict) -> tuple[WordModel, Vocabulary]:
    """Rebuild the model (in eval mode) and its vocabulary from a loaded checkpoint.

    Raises:
        UserError: the checkpoint's parts do not fit together (a damaged or hand-made file).
    """
    try:
        model = build_model(ModelConfig(**payload["model_config"]))
        model.load_state_dict(payload["model_state"])
        vocab = Vocabulary(payload["vocab"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        problem = " ".join(str(error).split())[:160] or type(error).__name__  # one line, however torch wrapped it
        raise UserError(
            f"the checkpoint is damaged: its model config, weights and vocabulary do not fit ({problem})"
        ) from None
    if len(vocab) != model.config.ntoken:
        raise UserError(
            f"the checkpoint is damaged: its vocabulary has {len(vocab)} words, its model {model.config.ntoken}"
        )
    model.eval()
    return model, vocab


class CheckpointKeeper:
    """The checkpoints of one training run: the best model (``save``), the latest state (``save_last``), the
    model at a stop before any epoch finished, and the weights of a resumed one (``restore``). It only writes and
    reads files: the trainer hands it ``training`` payloads (what a resume needs besides the weights: optimizer,
    ``TrainState`` as a dict, random streams; ``wordlm.training.trainer.Trainer.training_payload``), which it stores as
    given. Every rank calls the ``write_*`` methods with its payload; rank 0 writes.

    A failed write is one warning line and leaves the previous file in place: training goes on. The best weights
    are also kept in memory, on the CPU (``best_weights``), for the final test and a reload after a divergence.
    ``meta`` (the config, the corpus folder, the version) goes into every file.
    """

    def __init__(self, save: str, save_last: str, model: WordModel, vocab: Vocabulary, meta: dict, world) -> None:
        self.save, self.save_last = save, save_last
        self.model, self.vocab, self.meta, self.world = model, vocab, meta, world
        self.best_weights: dict | None = None
        self.written: tuple[int, int] | None = None  # identity of the file this run last wrote to save ...
        self.written_meta = meta  # ... and the meta it holds

    def restore(self, payload: dict, dataset: str, resume: str) -> dict:
        """Resume from a checkpoint's payload (read from ``resume``): its weights into the model, and the best model
        so far from ``save`` (``resume_best``). Returns the payload's ``training`` part, for
        ``wordlm.training.trainer.resume_training``.

        Raises:
            UserError: the corpus ``dataset`` is not the one the checkpoint was trained on.
        """
        if payload["vocab"] != self.vocab.idx2word:
            raise UserError(f"the corpus {dataset!r} is not the one {resume} was trained on (its vocabulary differs)")
        self.model.load_state_dict(payload["model_state"])
        training = payload["training"]
        self.resume_best(training["state"]["best_epoch"], ((payload.get("meta") or {}).get("config") or {}).get("save"))
        return training

    def resume_best(self, best_epoch: int, previous_save: str | None = None) -> None:
        """A resumed run's best model so far: from ``save``, or else from the ``save`` of the run it resumes (a resume
        given a new ``save=``), if that file holds the epoch the state names. One found in the other file is written
        to ``save`` at once: ``save`` then holds this run's best model even if no later epoch improves on it."""
        if not best_epoch:
            return
        for path in dict.fromkeys(path for path in (self.save, previous_save) if path):
            try:
                payload = load_checkpoint(path) if os.path.isfile(path) else {}
            except UserError:
                continue
            meta = payload.get("meta") or {}
            if meta.get("epoch") != best_epoch or payload.get("vocab") != self.vocab.idx2word:
                continue
            self.best_weights = payload["model_state"]
            if path != self.save and self.world.is_main:
                meta = {**self.meta, "valid_loss": meta.get("valid_loss"), "epoch": best_epoch}
                try:
                    self.written, self.written_meta = write_payload(self.save, {**payload, "meta": meta}), meta
                except OSError as problem:
                    warn(f"could not write {self.save} ({problem.strerror or problem}); its best model is in {path}")
            return

    def write_best(self, training: dict) -> None:
        """Keep the model as the best so far (it just improved validation), with ``training``, the state to resume
        from (its ``state`` names the best epoch and loss)."""
        state = training["state"]
        self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        meta = {**self.meta, "valid_loss": state["best_val_loss"], "epoch": state["best_epoch"]}
        if self.world.is_main:
            self.written, self.written_meta = self._write(self.save, meta=meta, training=training), meta

    def write_last(self, training: dict) -> None:
        """Write the latest state, to resume from."""
        if self.world.is_main:
            self._write(self.save_last, meta={**self.meta, "epoch": training["state"]["epoch"]}, training=training)

    def write_stopped(self, training: dict) -> None:
        """At a stop: the latest state, and before any epoch finished the current model as ``save`` (to test)."""
        self.write_last(training)
        print(f"The latest state is in {self.save_last}: continue with `with resume={self.save_last}`")
        if self.best_weights is None:
            print(f"No epoch finished yet: saving the current model to {self.save} and testing it")
            if self.world.is_main:
                meta = {**self.meta, "epoch": 0, "interrupted_at": training["state"]}
                self.written, self.written_meta = self._write(self.save, meta=meta), meta

    def load_best(self) -> None:
        """Put the best weights into the model (for the test), if there are any."""
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)

    def copy_for_record(self, folder: str) -> str:
        """A copy of this run's model in ``folder`` under ``save``'s name, for the run's record.

        ``save`` may hold another process's model by now (two runs started with one ``save``): the file is copied
        only if it is still the one this run wrote, else this run's model is written from memory. It is copied
        first, so a replacement during the copy changes nothing.
        """
        copy = os.path.join(folder, os.path.basename(self.save))
        try:
            with open(self.save, "rb") as source:
                found = os.fstat(source.fileno())
                if self.written is not None and (found.st_dev, found.st_ino) != self.written:
                    raise FileNotFoundError(self.save)
                with open(copy, "wb") as target:
                    shutil.copyfileobj(source, target)
        except OSError:
            save_checkpoint(copy, self.model, self.vocab, meta=self.written_meta)
            warn(f"{self.save} was replaced since this run wrote it (another run with save={self.save}?); the run's "
                 "record keeps this run's own model")  # fmt: skip
        return copy

    def _write(self, path: str, **extra) -> tuple[int, int] | None:
        try:
            return save_checkpoint(path, self.model, self.vocab, **extra)
        except OSError as problem:
            warn(f"could not write {path} ({problem.strerror or problem}); the previous file is kept, training goes on")
            return None


class NoCheckpoints:
    """The keeper of a training that writes no checkpoint (a ``Trainer`` built without one): it keeps nothing."""

    save = None
    best_weights = None

    def write_best(self, training: dict) -> None:
        pass

    def write_last(self, training: dict) -> None:
        pass

    def write_stopped(self, training: dict) -> None:
        pass

    def load_best(self) -> None:
        pass
