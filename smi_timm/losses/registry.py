"""The loss registry: every loss by name, with the display name and hyper-parameters it describes itself with.

A loss is an ``nn.Module`` whose constructor takes its hyper-parameters as keyword arguments with defaults, and whose
class docstring has an ``Args:`` section (one ``name: help`` entry per hyper-parameter); a class attribute
``implementation_args`` may name those that change how, not what, it computes (a backend, a chunk size).
Registering it is one line (``LOSSES.register("simclr", SimCLRLoss, "SimCLR")`` in :mod:`smi_timm.losses`); from
then on:

* :func:`~smi_timm.losses.create_loss` builds it by name;
* :class:`~smi_timm.train.TrainConfig` takes ``loss="simclr"`` and ``loss_args={...}``, and every command line that
  trains has ``--loss simclr --loss-args temperature=0.2`` and one flag per hyper-parameter (``--temperature``),
  with the help text of the docstring;
* the model card, the quick start and the comparison harness show its display name and its defaults.

The hyper-parameters are read from the constructor's signature (:attr:`LossEntry.hparams`); ``gather`` is not one
of them: whether the loss sees the global batch is a property of the run (``--gather``), passed to every loss whose
constructor accepts it.
"""
from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from torch import nn

from ..errors import ConfigError

__all__ = ["HParam", "LossEntry", "LossRegistry", "RUN_LEVEL_ARGS"]

#: constructor arguments set by the run, not by the loss's settings
RUN_LEVEL_ARGS = ("gather",)


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter of a loss: its name, default, type (of the default) and help text."""

    name: str
    default: Any
    help: str

    def coerce(self, value: Any) -> Any:
        """``value`` as this parameter's type: text from a flag is read as JSON (``16``, ``0.01``, ``true``,
        ``null``) unless the parameter is a string; an int becomes a float where the default is one."""
        kind = type(self.default)
        if isinstance(value, str) and kind is not str:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if self.default is None or value is None or isinstance(value, kind):
            return value
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"loss setting {self.name}={value!r}: expected a {kind.__name__} (default "
                          f"{self.default!r})")


def _docstring_args(cls: type) -> Dict[str, str]:
    """``{name: help}`` from the ``Args:`` section of a class docstring (continuation lines joined)."""
    doc = inspect.getdoc(cls) or ""
    match = re.search(r"^Args:\n(.*?)(?:\n\S|\Z)", doc, flags=re.S | re.M)
    out: Dict[str, str] = {}
    current = None
    for line in (match.group(1) if match else "").splitlines():
        entry = re.match(r"^\s{2,}(\w+):\s*(.*)$", line)
        if entry and (current is None or len(line) - len(line.lstrip()) <= 4):
            current = entry.group(1)
            out[current] = entry.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: ``name`` (what ``--loss`` takes), the class, and the name tables and cards show."""

    name: str
    cls: type
    display_name: str

    @property
    def hparams(self) -> Dict[str, HParam]:
        """The constructor's keyword arguments with defaults (but the run-level ``gather``), in signature order."""
        helps = _docstring_args(self.cls)
        out = {}
        for p in inspect.signature(self.cls.__init__).parameters.values():
            if p.name == "self" or p.name in RUN_LEVEL_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.default is inspect.Parameter.empty:
                raise ConfigError(f"loss {self.name!r}: constructor argument {p.name!r} has no default; every "
                                  f"hyper-parameter of a registered loss needs one")
            out[p.name] = HParam(p.name, p.default, helps.get(p.name, ""))
        return out

    @property
    def summary(self) -> str:
        """The first sentence of the class docstring (what the loss is, in its own words)."""
        first = (inspect.getdoc(self.cls) or self.display_name).split("\n\n")[0]
        return " ".join(first.split())

    def defaults(self) -> Dict[str, Any]:
        return {name: h.default for name, h in self.hparams.items()}

    def accepts_gather(self) -> bool:
        return "gather" in inspect.signature(self.cls.__init__).parameters

    def check_args(self, args: Mapping[str, Any]) -> Dict[str, Any]:
        """``args`` validated against the hyper-parameters (an unknown name is an error listing the valid ones)."""
        known = self.hparams
        unknown = [k for k in args if k not in known]
        if unknown:
            raise ConfigError(f"loss {self.name!r} has no setting {', '.join(map(repr, unknown))}; its settings are: "
                              f"{', '.join(f'{k} (default {h.default!r})' for k, h in known.items())}")
        return {k: known[k].coerce(v) for k, v in args.items()}

    def settings(self, args: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Every hyper-parameter's value: the defaults with ``args`` on top."""
        return {**self.defaults(), **self.check_args(args or {})}

    def definition(self, args: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """:meth:`settings` without those that change how, not what, the loss computes (the class's
        ``implementation_args``, e.g. SMI's backend): what a run config or model card records."""
        skip = set(getattr(self.cls, "implementation_args", ()))
        return {k: v for k, v in self.settings(args).items() if k not in skip}

    def create(self, args: Optional[Mapping[str, Any]] = None, gather: Optional[bool] = None) -> nn.Module:
        """The loss module with ``args`` (and ``gather`` when given and the loss takes it)."""
        kwargs = self.check_args(args or {})
        if gather is not None and self.accepts_gather():
            kwargs["gather"] = bool(gather)
        elif gather:
            raise ConfigError(f"loss {self.name!r} has no gather option (its constructor takes no 'gather')")
        return self.cls(**kwargs)


class LossRegistry(Mapping[str, LossEntry]):
    """Name -> :class:`LossEntry`, in registration order."""

    def __init__(self):
        self._entries: Dict[str, LossEntry] = {}

    def register(self, name: str, cls: type, display_name: str) -> type:
        """Register ``cls`` as ``name`` (shown as ``display_name``); returns ``cls``."""
        if name in self._entries and self._entries[name].cls is not cls:
            raise ConfigError(f"a loss named {name!r} is already registered ({self._entries[name].cls.__name__})")
        entry = LossEntry(name, cls, display_name)
        entry.hparams  # noqa: B018 - validates the signature at registration
        self._entries[name] = entry
        return cls

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def entry(self, name: str) -> LossEntry:
        """The entry of ``name``; an unknown name is an error listing the registered ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown loss {name!r}; valid values are: "
                              f"{', '.join(map(repr, self._entries))}") from None

    def __getitem__(self, name: str) -> LossEntry:
        return self.entry(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def hparam_owners(self) -> Dict[str, Tuple[Tuple[str, HParam], ...]]:
        """``{hyper-parameter name: ((loss name, HParam), ...)}`` over every registered loss."""
        owners: Dict[str, list] = {}
        for entry in self._entries.values():
            for name, h in entry.hparams.items():
                owners.setdefault(name, []).append((entry.name, h))
        return {k: tuple(v) for k, v in owners.items()}
