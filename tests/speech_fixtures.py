"""A tiny embedded spoken corpus for the speech tests, built once per test session.

``tiny_espeak_cache(tmp_path_factory)`` returns a data cache dir (``SIGMA_REPRO_DATA``) that holds the
espeak corpus at ``TINY_ESPEAK`` size: 26 training utterances (about 74 s), 10 dev and 10 test (about
31 s each), built in about 7 s on first call (most of it reading the standard library's docstrings)
under the session's pytest tmp dir. A test then points ``SIGMA_REPRO_DATA`` at it and asks for that size,
``data=espeak`` plus ``TINY_ESPEAK_OVERRIDES``, or ``EspeakSpeechDataModule(**TINY_ESPEAK, ...)``;
the ``tiny_espeak_data`` fixture does the first for a test (monkeypatch) and returns the dir.
"""

import os
from pathlib import Path

import pytest

from sigma_repro.data import audio

TINY_ESPEAK = {"hours": 0.02, "eval_minutes": 0.5}
TINY_ESPEAK_OVERRIDES = [f"data.{key}={value}" for key, value in TINY_ESPEAK.items()]


def tiny_espeak_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's data cache dir holding the tiny espeak corpus (built on the first call)."""
    cache = tmp_path_factory.getbasetemp() / "tiny_espeak_cache"
    before = os.environ.get("SIGMA_REPRO_DATA")
    os.environ["SIGMA_REPRO_DATA"] = str(cache)
    try:
        audio.espeak_corpus_dir(**TINY_ESPEAK)  # returns at once when the corpus is there
    finally:
        if before is None:
            del os.environ["SIGMA_REPRO_DATA"]
        else:
            os.environ["SIGMA_REPRO_DATA"] = before
    return cache


@pytest.fixture
def tiny_espeak_data(tmp_path_factory, monkeypatch) -> Path:
    """``SIGMA_REPRO_DATA`` set to ``tiny_espeak_cache`` for the test; the dir."""
    cache = tiny_espeak_cache(tmp_path_factory)
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(cache))
    return cache
