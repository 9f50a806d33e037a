"""The one rule for names that become file or folder names (and Snakemake wildcards, shell words).

slide_id, cohort, encoder, MIL model and segmenter names end up in paths under the run folder
(RUN/features/{encoder}/{slide_id}.h5, RUN/mil/{model}/{cohort}/, ...) and in the workflow's
commands. A safe name is 1 to 128 characters of ASCII letters, digits, `.`, `_` and `-`,
starting with a letter or digit: no path separator, no `..` component, no absolute path, no
whitespace or shell metacharacter, no hidden file, nothing an option parser reads as a flag. 128
leaves room in a 255-byte file name for the suffixes and temp marks the stages add.

Everything here is plain Python (no torch): the manifest and config loaders call it.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

MAX_NAME_LEN = 128
# The character class without anchors is also the workflow's wildcard constraint.
NAME_CHARS = r"[A-Za-z0-9][A-Za-z0-9._-]*"
# fullmatch, not ^...$: `$` also matches before a trailing newline.
_NAME_RE = re.compile(NAME_CHARS)
NAME_RULE = (f"may hold only letters, digits, '.', '_' and '-', start with a letter or digit, "
             f"and be at most {MAX_NAME_LEN} characters long")


def name_problem(value) -> str | None:
    """Why `value` is not a safe name (one short phrase to follow the field's name), or None."""
    if not isinstance(value, str):
        return f"{NAME_RULE}; got {type(value).__name__} {value!r}"
    if not value:
        return "is empty"
    if len(value) > MAX_NAME_LEN:
        return (f"is {len(value)} characters long; at most {MAX_NAME_LEN} are allowed "
                f"(it becomes a file name)")
    if not _NAME_RE.fullmatch(value):
        return f"{NAME_RULE}; got {short_repr(value)}"
    return None


def is_safe_name(value) -> bool:
    return name_problem(value) is None


def check_name(value, what: str, error=ConfigError) -> str:
    """`value` if it is a safe name, else raise `error` (default ConfigError) naming `what`
    (a config key or CLI flag, e.g. "train.model" or "--encoder")."""
    problem = name_problem(value)
    if problem is None:
        return value
    raise error(f"{what}: {problem}")


def short_repr(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
