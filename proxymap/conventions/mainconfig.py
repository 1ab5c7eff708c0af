"""One main.cf's parameters with their defaults, expanded and converted on access.

Parameters not set in main.cf take the `postconf -d` default of Postfix
3.7.11 (Debian), or where 3.11 changed them (proxy_read_maps) 3.11.7's
when the site runs 3.11+ (`proxymap_postfix_version`, by default the
installed Postfix's version); like `postconf -x`, a `$name` of an unset
parameter expands to its default. `-o name=value` overrides (master.cf)
apply on top, later ones winning.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping

from proxymap.conventions.config_error import ConfigError
from proxymap.conventions.expansion import (MacroError, expand, parse_compat_level,
                                            referenced_names)
from proxymap.conventions.host_defaults import default_myhostname, domain_of, interface_networks
from proxymap.conventions.parameters import (BOOL, DEFAULTS, DEFAULTS_311, INT, LIST, LONG,
                                             PARAMETERS, TIME, Parameter)
from proxymap.conventions.values import (INT_MAX, LONG_MAX, parse_bool, parse_int, parse_release,
                                         parse_time, split_list)


@dataclass(frozen=True)
class _Setting:
    value: str
    filename: str | None  # None: from an override
    line: int | None


class MainConfig:
    """Parameters of one main.cf plus overrides; values expand on access."""

    def __init__(self, config_directory: str, path: str,
                 entries: Mapping[str, tuple[str, int]],
                 overrides: Mapping[str, str] | None = None,
                 warnings: Iterable[str] = ()):
        self.config_directory = config_directory
        self.path = path
        self.warnings = list(warnings)
        self.process_name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        self._settings: dict[str, _Setting] = {
            "config_directory": _Setting(config_directory, path, None)}
        for name, (value, line) in entries.items():
            if not _read_only(name) and name != "config_directory":
                self._settings[name] = _Setting(value, path, line)
        self._explicit = dict((name, value) for name, (value, _) in entries.items())
        self._explicit.setdefault("config_directory", config_directory)
        self._cache: dict[str, str] = {}
        self._busy_mydomain = False
        self._release: tuple[int, int] | None = None
        for name, value in (overrides or {}).items():
            self._set_override(name, value)

    def _set_override(self, name: str, value: str) -> None:
        if _read_only(name):
            return
        self._settings[name] = _Setting(value, None, None)
        self._explicit[name] = value
        if name == "config_directory":
            self.config_directory = value
        self._cache.clear()
        self._release = None

    # -- raw access ---------------------------------------------------------

    def raw(self, name: str) -> str | None:
        """The value as written in main.cf (or an override), None if unset."""
        if _read_only(name):
            return None
        setting = self._settings.get(name)
        return setting.value if setting else None

    def default(self, name: str) -> str | None:
        """The unexpanded default of a known parameter, else None."""
        if name in DEFAULTS_311 and self.postfix_release() >= (3, 11):
            return DEFAULTS_311[name]
        if name in DEFAULTS:
            return DEFAULTS[name]
        parameter = PARAMETERS.get(name)
        if parameter is not None and parameter.dynamic:
            return self._dynamic_default(name)
        return None

    def postfix_release(self) -> tuple[int, int]:
        """(major, minor) of the Postfix whose defaults apply: the value of
        proxymap_postfix_version, or with "auto" (the default) the
        mail_version of the installed Postfix ($command_directory/postconf),
        or 3.7 when none answers."""
        if self._release is None:
            self._release = (3, 7)   # while finding out: the reference release
            value = self.get("proxymap_postfix_version").strip()
            if value.lower() == "auto":
                from proxymap.conventions.installed_postfix import installed_mail_version
                value = installed_mail_version(self.get("command_directory")) or "3.7"
            release = parse_release(value)
            if release is None:
                self._release = None
                raise self._where("proxymap_postfix_version",
                                  f"bad proxymap_postfix_version value: {value}"
                                  " (expected auto or a release such as 3.11)")
            self._release = release
        return self._release

    def _dynamic_default(self, name: str) -> str:
        if name == "process_id":
            return str(os.getpid())
        if name == "process_name":
            return self.process_name
        if name == "myhostname":
            return default_myhostname()
        if name == "mydomain":
            # `myhostname = host.$mydomain` with mydomain unset: Postfix
            # ends up with an empty mydomain; so do we, without looping.
            if self._busy_mydomain:
                return ""
            self._busy_mydomain = True
            try:
                return domain_of(self.get("myhostname"))
            finally:
                self._busy_mydomain = False
        # mynetworks
        interfaces = self.get("inet_interfaces").lower()
        return interface_networks(self.get("mynetworks_style").lower(),
                                  self.get("inet_protocols"),
                                  loopback_only=interfaces in ("loopback-only", "localhost"))

    def _lookup(self, name: str) -> str | None:
        value = self.raw(name)
        return value if value is not None else self.default(name)

    def _where(self, name: str, reason: str) -> ConfigError:
        setting = self._settings.get(name)
        if setting and setting.filename:
            return ConfigError(reason, setting.filename, setting.line)
        if setting:
            return ConfigError(f"-o {name}={setting.value}: {reason}")
        return ConfigError(reason)

    def locate(self, name: str, reason: str) -> ConfigError:
        """A ConfigError for parameter `name` naming where it was set
        (main.cf file and line, or the -o override; main.cf alone for a
        default value)."""
        if name not in self._settings:
            return ConfigError(reason, self.path)
        return self._where(name, reason)

    # -- expanded values ----------------------------------------------------

    def get(self, name: str) -> str:
        """Fully expanded value: main.cf/override, else the default, else ''."""
        if name in self._cache:
            return self._cache[name]
        raw = self._lookup(name)
        if raw is None:
            return ""
        try:
            value = expand(raw, self._lookup)
        except MacroError as exc:
            raise self._where(name, f"parameter {name}: {exc.reason}") from None
        if not _read_only(name):
            self._cache[name] = value
        return value

    def get_int(self, name: str) -> int:
        """An integer within the declared bounds; `long` parameters may go
        beyond an int, as in Postfix."""
        parameter = _declared_as(name, INT, LONG)
        value = self.get(name)
        maximum = LONG_MAX if parameter is not None and parameter.kind == LONG else INT_MAX
        try:
            number = parse_int(value, maximum)
        except ValueError:
            raise self._where(name, f"bad numerical configuration: {name} = {value}") from None
        broken = _broken_bound(parameter, number)
        if broken is not None:
            raise self._where(name, f"invalid {name} parameter value {number} {broken[0]}"
                                    f" {broken[1]}")
        return number

    def get_time(self, name: str, unit: str = "s") -> int:
        """Seconds within the declared bounds. A bare number takes the unit
        the parameter is declared with, or `unit` for an undeclared name."""
        parameter = _declared_as(name, TIME)
        value = self.get(name)
        try:
            seconds = parse_time(value, parameter.unit if parameter is not None else unit)
        except ValueError:
            raise self._where(name, f"parameter {name}: bad time value or unit: {value}") from None
        broken = _broken_bound(parameter, seconds)
        if broken is not None:
            limit = "min" if broken[0] == "<" else "max"
            raise self._where(name, f"invalid {name}: {seconds} ({limit} {broken[1]})")
        return seconds

    def get_bool(self, name: str) -> bool:
        _declared_as(name, BOOL)
        value = self.get(name)
        try:
            return parse_bool(value)
        except ValueError:
            raise self._where(name, f"bad boolean configuration: {name} = {value}") from None

    def get_list(self, name: str) -> list[str]:
        _declared_as(name, LIST)
        value = self.get(name)
        try:
            return split_list(value)
        except ConfigError as exc:
            raise self._where(name, f"{name}: {exc.reason}") from None

    def compatibility_level(self) -> tuple[int, int, int]:
        try:
            return parse_compat_level(self.get("compatibility_level"))
        except MacroError as exc:
            raise self._where("compatibility_level", exc.reason) from None

    # -- whole-configuration views -------------------------------------------

    def with_overrides(self, overrides: Mapping[str, str]) -> "MainConfig":
        """A copy with `-o name=value` settings applied in order (later wins)."""
        clone = MainConfig.__new__(MainConfig)
        clone.__dict__.update(self.__dict__)
        clone._settings = dict(self._settings)
        clone._explicit = dict(self._explicit)
        clone.warnings = list(self.warnings)
        clone._cache = {}
        clone._release = None
        for name, value in overrides.items():
            clone._set_override(name, value)
        return clone

    def explicit(self) -> dict[str, str]:
        """Names set in main.cf (and overrides) with raw values, plus
        config_directory, as `postconf -n` lists them."""
        return dict(self._explicit)

    def defaults(self) -> dict[str, str]:
        """Every known default, unexpanded, as `postconf -d` shows them."""
        result = dict(DEFAULTS)
        if self.postfix_release() >= (3, 11):
            result.update(DEFAULTS_311)
        hostname = default_myhostname()
        result.update(process_id=str(os.getpid()), process_name=self.process_name,
                      myhostname=hostname, mydomain=domain_of(hostname),
                      # evaluated with the default mynetworks_style, as postconf -d does
                      mynetworks=interface_networks(expand(DEFAULTS["mynetworks_style"],
                                                           DEFAULTS.get)))
        return dict(sorted(result.items()))

    def unused(self) -> list[str]:
        """Names set in main.cf that are neither known here nor referenced as
        `$name` by another value (a hint, since only part of Postfix's
        parameter list is known here)."""
        referenced: set[str] = set()
        for setting in self._settings.values():
            referenced.update(referenced_names(setting.value))
        return [name for name in self._explicit
                if name not in PARAMETERS and name not in referenced]



def _read_only(name: str) -> bool:
    parameter = PARAMETERS.get(name)
    return parameter is not None and parameter.read_only


def _declared_as(name: str, *kinds: str) -> Parameter | None:
    """The declaration of `name` (None for a name we do not declare). A
    getter of another type than the declared one is a programming error."""
    parameter = PARAMETERS.get(name)
    if parameter is not None and parameter.kind not in kinds:
        raise TypeError(f"parameter {name} is declared {parameter.kind}, not {'/'.join(kinds)}")
    return parameter


def _broken_bound(parameter: Parameter | None, number: int) -> tuple[str, int] | None:
    """("<", low) or (">", high) when `number` lies outside the bounds
    `parameter` is declared with; None when within them (or undeclared)."""
    if parameter is None:
        return None
    if parameter.low is not None and number < parameter.low:
        return "<", parameter.low
    if parameter.high is not None and number > parameter.high:
        return ">", parameter.high
    return None


class ParamView:
    """Read-only mapping view of main.cf for tables (expanded values)."""

    def __init__(self, config):
        self._config = config

    def get(self, name, default=None):
        value = self._config.get(name)
        return value if value != "" else default

    def __getitem__(self, name):
        return self._config.get(name)
