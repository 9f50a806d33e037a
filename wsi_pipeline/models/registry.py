"""One registry mechanism for every kind of model (timm-style): a model's file holds the model and
its registration, one factory builds it by name.

    ENCODERS = Registry("encoder", fields=ENCODER_FIELDS)

    @ENCODERS.register("my_net", out_dim=768, license="Apache-2.0", reference="...")
    def my_net(**kwargs) -> nn.Module: ...

    ENCODERS.create("my_net", **kwargs)     # builder(**kwargs)
    ENCODERS.list()                         # sorted names
    ENCODERS.get_metadata("my_net")         # read-only mapping: out_dim, license, reference, ...

Each registry declares the metadata fields every entry must carry (`fields`: name -> accepted
types); registration checks them, so a new entry cannot silently lack what preprocessing, the
validation of a config or the tests read back. Every registry requires `license` (of the code or
weights the entry follows) and `reference` (the paper / repository it follows). `out_dim` is an
int, or the name of the create() argument that sets it (`"n_classes"` for MIL aggregators).

Unknown names raise :class:`UnknownModelError`, a KeyError (what callers of the older per-kind
registries catch) whose message lists the closest registered names; registering a name twice is a
ValueError.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

_MISSING = object()
COMMON_FIELDS: Mapping[str, tuple[type, ...]] = {"license": (str,), "reference": (str,)}


class UnknownModelError(KeyError):
    """A name no registry entry has. ``args[0]`` is the full message (as for any KeyError)."""

    def __str__(self) -> str:  # KeyError would repr() the message, quoting it
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    """One registered model: its name, kind, builder and read-only metadata."""

    name: str
    kind: str
    builder: Callable[..., Any]
    metadata: Mapping[str, Any]

    def create(self, **kwargs) -> Any:
        return self.builder(**kwargs)


class Registry:
    """Name -> (builder, metadata) for one kind of model (`kind` appears in every message)."""

    def __init__(self, kind: str, fields: Mapping[str, tuple[type, ...]] | None = None):
        self.kind = kind
        self.fields: Mapping[str, tuple[type, ...]] = MappingProxyType({**COMMON_FIELDS, **(fields or {})})
        self._entries: dict[str, Entry] = {}

    # -- registration ---------------------------------------------------------------------------
    def register(self, name: str, **metadata) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@registry.register("name", out_dim=..., license=..., reference=...)``."""
        def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name, builder, **metadata)
            return builder
        return decorate

    def add(self, name: str, builder: Callable[..., Any], **metadata) -> Entry:
        """Register ``builder`` under ``name`` (the non-decorator form)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        if not callable(builder):
            raise TypeError(f"{self.kind} {name!r}: builder {builder!r} is not callable")
        problems = self.metadata_problems(metadata)
        if problems:
            raise ValueError(f"{self.kind} {name!r}: bad metadata: {'; '.join(problems)}")
        entry = Entry(name=name, kind=self.kind, builder=builder, metadata=MappingProxyType(dict(metadata)))
        self._entries[name] = entry
        return entry

    def metadata_problems(self, metadata: Mapping[str, Any]) -> list[str]:
        """What is missing or of the wrong type in ``metadata`` for this registry's fields."""
        problems = []
        for key, types in self.fields.items():
            value = metadata.get(key, _MISSING)
            # bool is an int subclass: True must not pass as an int dimension.
            if value is _MISSING:
                problems.append(f"missing {key!r}")
            elif not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                problems.append(f"{key!r} must be {names}, got {value!r}")
            elif key in COMMON_FIELDS and not value.strip():
                problems.append(f"{key!r} is empty")
        return problems

    # -- lookup ---------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)

    def list(self, pattern: str | None = None) -> list[str]:
        """Registered names, sorted; ``pattern`` filters them with shell wildcards (``"*mamba*"``)."""
        names = sorted(self._entries)
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownModelError(self.unknown_message(name)) from None

    def get_metadata(self, name: str) -> Mapping[str, Any]:
        return self.entry(name).metadata

    def create(self, name: str, **kwargs) -> Any:
        """Build entry ``name``: its builder called with ``kwargs``."""
        return self.entry(name).create(**kwargs)

    def close_matches(self, name: str, n: int = 5) -> list[str]:
        return difflib.get_close_matches(str(name), self.list(), n=n, cutoff=0.6)

    def unknown_message(self, name: str) -> str:
        close = self.close_matches(name)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(self.list())}"

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
