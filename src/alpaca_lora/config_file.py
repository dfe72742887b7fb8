"""Reading a config file: bounded in size, depth and YAML alias expansion, every refusal naming the file.

A config holds a few dozen fields, so anything far larger is refused before it is parsed or walked:
the file's bytes (it may be ``/dev/zero``), its nesting, and the values its YAML aliases repeat (a
1.3 KB "billion laughs" file expands to hundreds of millions).
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path
from typing import Any

import yaml

from alpaca_lora.errors import ConfigError, shown

MAX_CONFIG_BYTES = 2**20
"""Largest config file read: a config holds a few dozen fields, a megabyte is not one."""
MAX_CONFIG_VALUES = 10_000
"""Most values a config file may hold, counting what every YAML alias repeats: a 1.3 KB file of nested
aliases (a "billion laughs") expands to hundreds of millions, which no message or check should walk."""
MAX_CONFIG_DEPTH = 64
"""Deepest nesting of values in a config file (a template dict is two levels deep)."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json`` or any other suffix) or YAML (``.yaml``/``.yml``) config file into a dict.

    Args:
        path: The file.

    Returns:
        The mapping of field names to values it holds (not yet validated).

    Raises:
        ConfigError: Naming the file when it is missing, a folder, empty, larger than
            ``MAX_CONFIG_BYTES``, not UTF-8, unparsable, nested deeper than ``MAX_CONFIG_DEPTH``,
            holding more than ``MAX_CONFIG_VALUES`` values once YAML aliases are expanded, or not
            a mapping.

    """
    if isinstance(path, str) and not path.strip():
        raise ConfigError("the config file path is empty; pass a .json or .yaml file of FinetuneConfig fields")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a .json or .yaml file of FinetuneConfig fields")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)  # never more: the "file" may be /dev/zero
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES:,} bytes; a config holds a few "
                          "dozen fields: is it the right file?")
    text = _decode(path, raw)
    if not text.strip():
        raise ConfigError(f"config file {path} is empty; write FinetuneConfig fields in it, e.g. 'lora_r: 8' (YAML)")
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} holds a {type(data).__name__}; it must hold a mapping of field names "
                          "to values, e.g. 'lora_r: 8' (YAML) or {\"lora_r\": 8} (JSON)")
    return data


def _decode(path: Path, raw: bytes) -> str:
    if raw[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        raise ConfigError(f"config file {path} is UTF-32 text; save it as UTF-8")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ConfigError(f"config file {path} is UTF-16 text; save it as UTF-8")
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise ConfigError(f"config file {path} holds a NUL byte on line {line}: it is binary or UTF-16/32 text, "
                          "not a config; save it as UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {raw[exc.start]:#04x} on line {line}); "
                          "save it as UTF-8") from None


def _parse(path: Path, text: str) -> Any:
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            return _yaml_load(text, str(path))
        return json.loads(text)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config (at most "
                          f"{MAX_CONFIG_DEPTH} levels)") from None
    except Exception as exc:  # noqa: BLE001 - YAMLError, ValueError (an over-long int), and PyYAML's own slips:
        # `!!timestamp 'x'` ends in an AttributeError inside its constructor
        raise ConfigError(f"config file {path} does not parse: {shown(' '.join(str(exc).split()), 400)}") from None


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float and stops composing past ``MAX_CONFIG_VALUES`` nodes.

    YAML 1.1 reads an exponent without a dot as text; a config means a number. The node count bounds
    the parse itself (an alias counts once here; :func:`_check_expansion` counts what it repeats).
    """

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.name = source  # marks in parse errors name the file, not "<unicode string>"
        self.nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.nodes += 1
        if self.nodes > MAX_CONFIG_VALUES:
            raise ConfigError(f"config file {self.name} holds more than {MAX_CONFIG_VALUES:,} values; a config holds "
                              "a few dozen fields: is it the right file?")
        return super().compose_node(parent, index)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml_load(text: str, source: str = "<config>") -> Any:
    """Parse one YAML document, refusing one whose aliases expand past ``MAX_CONFIG_VALUES`` values."""
    loader = _YamlLoader(text, source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Count the nodes of ``root`` as if every alias were a copy; refuse cycles, depth and size past the limits.

    Sizes are memoized per node, so a "billion laughs" file is counted in as many steps as it has nodes.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"config file {source} has an alias inside the value it names (a cycle); "
                              "write the values out")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"config file {source} is nested deeper than {MAX_CONFIG_DEPTH} levels; "
                              "a config is a flat mapping of fields")
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_CONFIG_VALUES:
                raise ConfigError(f"config file {source} holds more than {MAX_CONFIG_VALUES:,} values once its YAML "
                                  "aliases (*name) are expanded; a config holds a few dozen fields: write them out "
                                  "instead of nesting aliases")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root, 0)


def field_docs(cls: type) -> dict[str, str]:
    """Return the docstring written under each field of dataclass ``cls``, by field name."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
