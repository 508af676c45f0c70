"""Where the YAML configs live and how they are read: one fast, strict YAML loader shared by all configs."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from .errors import SimInputError


def _config_dir() -> Path:
    """KVQ_CONFIG_DIR if set; else the repository's configs/ (packages/kvq-sim/src/kvq_sim/configs.py is four
    levels below the root) in a checkout; else the copy a wheel ships inside the package (kvq_sim/configs)."""
    if "KVQ_CONFIG_DIR" in os.environ:
        return Path(os.environ["KVQ_CONFIG_DIR"])
    here = Path(__file__).resolve()
    if len(here.parents) > 4 and (here.parents[4] / "configs" / "hardware").is_dir():
        return here.parents[4] / "configs"
    return here.parent / "configs"


CONFIG_DIR = _config_dir()


class _Refused(ValueError):
    """A YAML construct kvq configs do not accept (a duplicated field, an alias)."""


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # the C loader parses ~10x faster
    """The safe loader, refusing a field given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)):
                if key in seen:
                    raise _Refused(f"line {key_node.start_mark.line + 1}: field {key!r} given twice")
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_text(path: Path) -> str:
    """A config file's text; an unreadable or non-UTF-8 file is a SimInputError naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SimInputError(f"{display_path(path)}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise SimInputError(f"{display_path(path)}: not UTF-8 text (byte {e.start})") from None


def _refuse_aliases(text: str) -> None:
    """Refuse YAML aliases (`*name`): kvq configs need none, and nested aliases let a file of a few hundred
    bytes stand for a structure of billions of nodes that any walk over the loaded data would expand."""
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1 if event.start_mark is not None else "?"
            raise _Refused(f"line {line}: YAML aliases (*{event.anchor}) are not accepted in kvq configs")


def read_yaml(path: Path) -> dict:
    """Parse one YAML mapping; a syntax error or non-mapping is a SimInputError naming the file."""
    text, where = read_text(path), display_path(path)
    try:
        _refuse_aliases(text)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SimInputError(f"{where}:{line} malformed YAML: {problem}") from None
    except _Refused as e:
        raise SimInputError(f"{where}: {e}") from None
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() (4300) digits
        raise SimInputError(f"{where}: unreadable value: {str(e).splitlines()[0]}") from None
    if data is None:
        raise SimInputError(f"{where}: empty file, expected a mapping of fields")
    if not isinstance(data, dict):
        raise SimInputError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    return data


def unknown_field(key, known, where: str, section: str = "") -> SimInputError:
    """The error for a field no reader uses, naming the closest known one (a misspelt field is otherwise
    ignored and its default used in silence)."""
    name = f"{section}.{key}" if section else str(key)
    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(sorted(known))}"
    return SimInputError(f"{where}: unknown field '{name}'{hint}")


def display_path(path: Path) -> str:
    """The path relative to the working directory when possible, for short error messages."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def names_in(kind: str) -> list[str]:
    """Config names (file stems) under configs/<kind>/."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


_LABEL = {"hardware": "GPU", "models": "model"}


def resolve(kind: str, name_or_path: str) -> Path:
    """An exact config name under configs/<kind>/, or a path to a file; unknown names list the valid ones."""
    label = _LABEL.get(kind, kind)
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") or os.sep in name_or_path:
        if p.is_dir():
            raise SimInputError(f"{label} config {name_or_path} is a directory, not a file")
        if not p.is_file():
            raise SimInputError(f"{label} config file not found: {name_or_path}")
        return p
    candidate = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if name_or_path and candidate.is_file():
        return candidate
    raise SimInputError(f"unknown {label} {name_or_path!r}; valid: {', '.join(names_in(kind))} (or a path to a file)")
