"""Landmark → country → continent, for continent-aware sampling and country re-ranking.

A dataset root may hold the non-official ``train_label_to_country.csv``
(``landmark_id,country``; extra columns allowed) whose ``country`` is an ISO 3166-1
alpha-2 code such as ``FR``. The country → continent step uses the shipped table
``glr/resources/country_continent.csv`` (``alpha2,continent``, 250 rows: the 249 ISO
3166-1 alpha-2 codes plus ``XK``).

Source of the table: ``COUNTRY_ALPHA2_TO_CONTINENT_CODE`` and
``CONTINENT_CODE_TO_CONTINENT_NAME`` of the pycountry-convert 0.7.2 package (TUNE Inc.,
MIT licence, https://pypi.org/project/pycountry-convert/0.7.2/, itself from Wikipedia's
"List of sovereign states and dependent territories by continent"), read from its wheel
(not a dependency), with the code list checked against pycountry 26.2.16's ISO 3166-1
data. Deliberate changes to the source (details in ``glr/resources/README.md``):

* dropped ``AB``, ``OS`` (not ISO codes) and ``TP`` (withdrawn; became ``TL``);
* added the codes the source lacks: ``AQ`` and ``TF`` → Antarctica (like the source's
  ``BV``, ``HM``), ``EH`` → Africa, ``PN`` and ``UM`` → Oceania, ``SX`` → North America,
  ``TL`` → Asia, ``VA`` → Europe;
* kept ``XK`` (Kosovo, user-assigned but widely used) → Europe.

Transcontinental countries get the source's single continent: ``RU`` Europe; ``TR``,
``CY``, ``GE``, ``AM``, ``AZ``, ``KZ`` Asia; ``EG`` Africa; ``PA`` North America.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from glr.data.readers import landmark_rows
from glr.utils import InputError

log = logging.getLogger(__name__)

CONTINENTS: tuple[str, ...] = (
    "Africa", "Antarctica", "Asia", "Europe", "North America", "Oceania", "South America",
)
#: Continent given to landmarks whose country code is not in the table.
OTHER = "other"
#: The per-landmark country table in a dataset root.
COUNTRY_FILE = "train_label_to_country.csv"

_ALPHA2 = re.compile(r"[A-Z]{2}")


@functools.lru_cache(maxsize=None)
def country_continents() -> Mapping[str, str]:
    """The shipped country → continent table.

    Returns:
        Read-only map from upper-case ISO 3166-1 alpha-2 code (plus ``XK``) to one of
        :data:`CONTINENTS`.
    """
    text = resources.files("glr").joinpath("resources").joinpath("country_continent.csv").read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines())
    return MappingProxyType({row["alpha2"]: row["continent"] for row in rows})


def continent_of(alpha2: str) -> str | None:
    """Continent of an ISO 3166-1 alpha-2 country code (case-insensitive).

    Returns:
        One of :data:`CONTINENTS`, or None for a code not in the table.
    """
    return country_continents().get(alpha2.strip().upper())


def read_landmark_countries(path: str | os.PathLike) -> dict[int, str]:
    """Read ``train_label_to_country.csv`` (``landmark_id,country``; extra columns ignored).

    Country codes are upper-cased; rows with an empty country are skipped (landmarks
    whose country is unknown).

    Returns:
        landmark id → upper-case two-letter country code, in file order.

    Raises:
        InputError: missing file or column, wrong field count, bad or duplicate
            landmark id, or a country that is not two letters A-Z (names the file and
            line).
    """
    path = Path(path)
    out: dict[int, str] = {}
    for line, landmark, cell in landmark_rows(path, "country"):
        cell = cell.strip()
        if not cell:
            continue
        code = cell.upper()
        if not _ALPHA2.fullmatch(code):
            raise InputError(
                f"country must be an ISO 3166-1 alpha-2 code (two letters, e.g. FR), got {cell!r}", path, line
            )
        out[landmark] = code
    return out


def landmark_continents(countries: Mapping[int, str]) -> dict[int, str]:
    """Map landmarks to continents through their country codes.

    Args:
        countries: landmark id → alpha-2 country code (as from
            :func:`read_landmark_countries`).

    Returns:
        landmark id → one of :data:`CONTINENTS`, or ``"other"`` for a code the table
        does not know (one warning names how many and a few of them).
    """
    out: dict[int, str] = {}
    unknown: dict[str, int] = {}
    for landmark, code in countries.items():
        continent = continent_of(code)
        if continent is None:
            unknown[code] = unknown.get(code, 0) + 1
            continent = OTHER
        out[landmark] = continent
    if unknown:
        examples = ", ".join(sorted(unknown)[:5])
        log.warning(
            "%d landmark(s) have %d country code(s) not in the ISO 3166-1 table (e.g. %s); their continent is %r",
            sum(unknown.values()), len(unknown), examples, OTHER,
        )
    return out


def load_landmark_continents(root: str | os.PathLike) -> dict[int, str] | None:
    """Landmark → continent from ``<root>/train_label_to_country.csv``, if the file exists.

    A missing file is normal (neither GLDv2 nor Kaggle ships it): one notice is logged
    and None returned.

    Returns:
        landmark id → continent (see :func:`landmark_continents`; landmarks with an
        empty country are absent), or None when the file is missing.

    Raises:
        InputError: the file exists but is malformed.
    """
    path = Path(root, COUNTRY_FILE)
    if not path.is_file():
        log.warning(
            "no %s in %s: continent-aware sampling and country re-ranking are skipped", COUNTRY_FILE, root
        )
        return None
    return landmark_continents(read_landmark_countries(path))
