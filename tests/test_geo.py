"""Tests for glr.data.geo: the shipped country → continent table and the landmark readers."""

from __future__ import annotations

import csv
import logging
from importlib import resources
from pathlib import Path

import pytest

from glr.data.geo import CONTINENTS, COUNTRY_FILE, continent_of, country_continents, landmark_continents, load_landmark_continents, read_landmark_countries
from glr.utils import InputError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "code, continent",
    [
        ("FR", "Europe"), ("fr", "Europe"), ("Jp", "Asia"), ("US", "North America"),
        ("BR", "South America"), ("AU", "Oceania"), ("EG", "Africa"), ("AQ", "Antarctica"),
        ("RU", "Europe"), ("TR", "Asia"), ("TL", "Asia"), ("SX", "North America"),
        ("UM", "Oceania"), ("VA", "Europe"), ("XK", "Europe"),
    ],
)
def test_continent_of(code, continent):
    assert continent_of(code) == continent


@pytest.mark.parametrize("code", ["ZZ", "", "FRA", "TP", "AB", "1A"])
def test_continent_of_unknown(code):
    assert continent_of(code) is None


def test_shipped_table():
    text = resources.files("glr").joinpath("resources").joinpath("country_continent.csv").read_text("utf-8")
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == ["alpha2", "continent"]
    codes = [r[0] for r in rows[1:]]
    assert len(codes) >= 245
    assert len(codes) == len(set(codes)) == len(country_continents())
    assert all(len(c) == 2 and c.isascii() and c.isupper() for c in codes)
    assert {r[1] for r in rows[1:]} == set(CONTINENTS)


def test_read_landmark_countries(tmp_path):
    path = write(
        tmp_path / COUNTRY_FILE,
        "landmark_id,country,continent\n1,FR,Europe\n2,jp,Asia\n3,,\n\n4, us ,North America\n",
    )
    assert read_landmark_countries(path) == {1: "FR", 2: "JP", 4: "US"}


@pytest.mark.parametrize(
    "body, line, match",
    [
        ("1,FR\n2,France\n", 3, "alpha-2"),
        ("1,F1\n", 2, "alpha-2"),
        ("1,FR\n2,DE\n1,IT\n", 4, "duplicate landmark id 1"),
        ("x,FR\n", 2, "non-negative integer"),
        ("1,FR,extra\n", 2, "expected 2 fields"),
    ],
)
def test_read_landmark_countries_errors_name_file_and_line(tmp_path, body, line, match):
    path = write(tmp_path / "countries.csv", "landmark_id,country\n" + body)
    with pytest.raises(InputError, match=match) as e:
        read_landmark_countries(path)
    assert e.value.path == str(path) and e.value.line == line
    assert str(e.value).startswith(f"{path}:{line}: ")


def test_read_landmark_countries_missing_column(tmp_path):
    path = write(tmp_path / "countries.csv", "landmark_id,nation\n1,FR\n")
    with pytest.raises(InputError, match="country") as e:
        read_landmark_countries(path)
    assert e.value.line == 1


def test_landmark_continents_unknown_codes_are_other(caplog):
    with caplog.at_level(logging.WARNING, logger="glr.data.geo"):
        out = landmark_continents({1: "FR", 2: "ZZ", 3: "QQ", 4: "ZZ", 5: "BR"})
    assert out == {1: "Europe", 2: "other", 3: "other", 4: "other", 5: "South America"}
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "3 landmark(s)" in msg and "QQ" in msg and "ZZ" in msg


def test_load_landmark_continents(tmp_path, caplog):
    write(tmp_path / COUNTRY_FILE, "landmark_id,country\n5,IN\n6,PE\n7,\n")
    with caplog.at_level(logging.INFO, logger="glr.data.geo"):
        assert load_landmark_continents(tmp_path) == {5: "Asia", 6: "South America"}
    assert not caplog.records


def test_load_landmark_continents_missing_file_is_a_notice(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="glr.data.geo"):
        assert load_landmark_continents(tmp_path) is None
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert f"no {COUNTRY_FILE} in {tmp_path}" in msg and "skipped" in msg
