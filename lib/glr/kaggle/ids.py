"""Kaggle dataset ids, titles and licences: the checks every upload shares.

Plain string checks (no file, no network, no heavy import), so that :mod:`glr.kaggle.client`
can validate a dataset folder without importing the model code :mod:`glr.kaggle.publish` needs.
"""

from __future__ import annotations

import re

from glr.utils import InputError

#: Licence names ``kaggle datasets create`` accepts (Kaggle/kaggle-api ``docs/datasets_metadata.md``).
KAGGLE_LICENSES = (
    "CC0-1.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC-BY-NC-SA-4.0", "GPL-2.0", "ODbL-1.0", "DbCL-1.0",
    "copyright-authors", "other", "unknown", "CC-BY-4.0", "CC-BY-NC-4.0", "PDDL", "CC-BY-3.0", "CC-BY-3.0-IGO",
    "US-Government-Works", "CC-BY-NC-SA-3.0-IGO", "CDLA-Permissive-1.0", "CDLA-Sharing-1.0", "CC-BY-ND-4.0",
    "CC-BY-NC-ND-4.0", "ODC-BY-1.0", "LGPL-3.0", "AGPL-3.0", "FDL-1.3", "EU-ODP-Legal-Notice", "apache-2.0",
    "GPL-3.0",
)

#: Slug: lower-case letters and digits in hyphen-separated words. Kaggle's client only checks the
#: length (6–50); the character set is this kit's rule, so a slug is used as given in the URL.
_SLUG_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")

_OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_dataset_id(dataset_id: str) -> tuple[str, str]:
    """``(owner, slug)`` of an ``owner/slug`` dataset id; InputError naming what is wrong."""
    if not isinstance(dataset_id, str) or dataset_id.count("/") != 1:
        raise InputError(f"dataset id must be 'owner/slug', not {dataset_id!r}")
    owner, slug = dataset_id.split("/")
    if not _OWNER_RE.fullmatch(owner):
        raise InputError(f"dataset owner {owner!r} must be a Kaggle user or organisation name "
                         "(letters, digits, '-', '_')")
    if not 6 <= len(slug) <= 50:
        raise InputError(f"dataset slug {slug!r} has {len(slug)} characters; kaggle needs 6 to 50")
    if not _SLUG_RE.fullmatch(slug):
        raise InputError(f"dataset slug {slug!r} must be lower-case letters and digits separated by single hyphens")
    return owner, slug


def check_title(title: str) -> str:
    """The dataset title, stripped: 6–50 characters and not kaggle's placeholder."""
    if not isinstance(title, str):
        raise InputError(f"dataset title must be a string, not {title!r}")
    title = title.strip()
    if not 6 <= len(title) <= 50:
        raise InputError(f"dataset title {title!r} has {len(title)} characters; kaggle needs 6 to 50")
    if title == "INSERT_TITLE_HERE":
        raise InputError("dataset title is kaggle's placeholder")
    return title


def check_licence(licence: str) -> str:
    """``licence`` when it is one of :data:`KAGGLE_LICENSES`; InputError listing them otherwise."""
    if licence not in KAGGLE_LICENSES:
        raise InputError(f"licence {licence!r} is not one kaggle accepts ({', '.join(KAGGLE_LICENSES)})")
    return licence
