"""``python -m bsa_ext config``: read and edit the BSA settings of a LongCat ``config.json``.

LongCat's DiT (``dit/config.json`` upstream, ``transformer/config.json`` in FastVideo's
layout) carries ``enable_bsa`` and ``bsa_params``; this tool edits those two keys in
place and nothing else. Before its first edit it keeps the original as
``config.json.bsa_ext.bak`` (``--restore`` puts it back); every write goes to a
temporary file that replaces the config in one ``os.replace``, so the config is
always either the old or the new complete file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from .presets import (
    PARAM_KEYS,
    BSAParamError,
    default_preset_name,
    describe_presets,
    get_preset,
    match_preset,
    preset_names,
    validate_bsa_params,
)

BACKUP_SUFFIX = ".bsa_ext.bak"
# Where LongCat checkpoints keep the DiT config, tried in this order inside a directory.
CONFIG_CANDIDATES = ("config.json", "dit/config.json", "transformer/config.json")
SETTABLE = ("enable_bsa",) + PARAM_KEYS


class ConfigError(Exception):
    """A problem with the file or the request; the message is shown to the user as is."""


# ------------------------------------------------------------------ file handling
def find_config(path: str) -> str:
    if os.path.isdir(path):
        for rel in CONFIG_CANDIDATES:
            candidate = os.path.join(path, rel)
            if os.path.isfile(candidate):
                return candidate
        raise ConfigError(f"{path}: a directory without {', '.join(CONFIG_CANDIDATES)}")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not a regular file")
    return path


def read_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _atomic_write_text(path: str, text: str, mode_from: Optional[str] = None) -> None:
    """Write ``text`` to a sibling temporary file, fsync it, then ``os.replace`` it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        source = mode_from if mode_from and os.path.exists(mode_from) else None
        if source:
            shutil.copymode(source, tmp)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        # Whatever went wrong (disk full, Ctrl-C), the original file is untouched.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _detect_indent(path: str) -> int:
    """Keep the file's indentation so that an edit shows as a small diff."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                stripped = line.lstrip(" ")
                if stripped.startswith('"'):
                    return max(1, len(line) - len(stripped))
    except OSError:
        pass
    return 2


def dumps(obj: Any, indent: int = 2, level: int = 0) -> str:
    """JSON with objects one key a line and lists of scalars on one line, as LongCat's configs are written."""
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {dumps(v, indent, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) for x in obj):
            return "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in obj) + "]"
        return "[\n" + ",\n".join(inner + dumps(x, indent, level + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_config(path: str, data: Dict[str, Any]) -> None:
    text = dumps(data, indent=_detect_indent(path)) + "\n"
    json.loads(text)  # never write something we could not read back
    _atomic_write_text(path, text, mode_from=path)


def backup_path(path: str) -> str:
    return path + BACKUP_SUFFIX


def ensure_backup(path: str) -> Optional[str]:
    """Copy the config aside before the first edit; later edits keep that first copy."""
    bak = backup_path(path)
    if os.path.exists(bak):
        return None
    with open(path, encoding="utf-8") as f:
        _atomic_write_text(bak, f.read(), mode_from=path)
    return bak


# ------------------------------------------------------------------ edits
def parse_value(key: str, text: str) -> Any:
    """``--set`` values: JSON (``0.9``, ``null``, ``[4,4,4]``, ``true``) or ``4,4,4`` / ``4x4x4`` for chunks."""
    raw = text.strip()
    if raw.lower() in ("none", "null"):
        return None
    if key.startswith("chunk_3d_shape") and not raw.startswith("["):
        parts = raw.replace("x", ",").replace("X", ",").split(",")
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--set {key}: expected three integers like 4,4,4 or [4,4,4], got {text!r}") from None
    if key == "enable_bsa" and raw.lower() in ("true", "false", "on", "off", "yes", "no", "1", "0"):
        return raw.lower() in ("true", "on", "yes", "1")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"--set {key}: {text!r} is not a JSON value (numbers like 0.9, null, [4,4,4], true)") from None


def parse_assignments(items: List[str]) -> List[Tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, _, value = item.partition("=")
        key = key.strip()
        if key.startswith("bsa_params."):
            key = key[len("bsa_params."):]
        if key not in SETTABLE:
            raise ConfigError(f"--set {key!r}: unknown key; settable keys: {', '.join(SETTABLE)}")
        out.append((key, parse_value(key, value)))
    return out


def check_bsa_settings(data: Dict[str, Any]) -> List[str]:
    """Every problem with ``enable_bsa`` / ``bsa_params`` in ``data`` (empty: valid)."""
    problems = []
    enabled = data.get("enable_bsa", False)
    if not isinstance(enabled, bool):
        problems.append(f"enable_bsa: expected true or false, got {json.dumps(enabled)}")
    params = data.get("bsa_params")
    if params is None:
        if enabled is True:
            problems.append("bsa_params: missing, but enable_bsa is true (LongCat's attention layer asserts on it)")
    else:
        try:
            validate_bsa_params(params)
        except BSAParamError as exc:
            problems.append(str(exc))
    return problems


def apply_request(data: Dict[str, Any], args) -> Dict[str, Any]:
    """The edited copy of ``data``; raises ConfigError before anything is written."""
    new = json.loads(json.dumps(data))
    if args.preset is not None:
        try:
            preset = get_preset(args.preset)
        except BSAParamError as exc:
            raise ConfigError(str(exc)) from None
        new["enable_bsa"] = preset.enable_bsa
        if preset.bsa_params is not None:
            new["bsa_params"] = preset.params()
    if args.enable:
        new["enable_bsa"] = True
        if new.get("bsa_params") is None:
            # Same fallback as FastVideo's pipeline: LongCat's released refinement setting.
            new["bsa_params"] = get_preset(default_preset_name()).params()
    if args.disable:
        new["enable_bsa"] = False
    for key, value in parse_assignments(args.set or []):
        if key == "enable_bsa":
            if not isinstance(value, bool):
                raise ConfigError(f"--set enable_bsa: expected true or false, got {json.dumps(value)}")
            new["enable_bsa"] = value
            continue
        params = new.get("bsa_params")
        if params is None:
            params = {}
        elif not isinstance(params, dict):
            raise ConfigError(f"bsa_params in the file is a {type(params).__name__}, not an object; fix it with --preset")
        params[key] = value
        new["bsa_params"] = params
    problems = check_bsa_settings(new)
    if problems:
        raise ConfigError("the result would be invalid, nothing written:\n  " + "\n  ".join(problems))
    return new


def diff_lines(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    lines = []
    if old.get("enable_bsa") != new.get("enable_bsa"):
        lines.append(f"enable_bsa: {json.dumps(old.get('enable_bsa'))} -> {json.dumps(new.get('enable_bsa'))}")
    op, np_ = old.get("bsa_params"), new.get("bsa_params")
    if op != np_:
        if not isinstance(op, dict) or not isinstance(np_, dict):
            lines.append(f"bsa_params: {json.dumps(op)} -> {json.dumps(np_)}")
        else:
            for key in list(dict.fromkeys(list(op) + list(np_))):
                if op.get(key, "<unset>") != np_.get(key, "<unset>"):
                    before = json.dumps(op[key]) if key in op else "<unset>"
                    after = json.dumps(np_[key]) if key in np_ else "<unset>"
                    lines.append(f"bsa_params.{key}: {before} -> {after}")
    return lines


# ------------------------------------------------------------------ commands
def status_text(path: str, data: Dict[str, Any]) -> Tuple[str, bool]:
    problems = check_bsa_settings(data)
    enabled = data.get("enable_bsa", False)
    params = data.get("bsa_params")
    lines = [f"config:     {path}", f"enable_bsa: {json.dumps(enabled)}" + ("" if "enable_bsa" in data else " (key absent)")]
    lines.append(f"bsa_params: {json.dumps(params)}")
    if not problems:
        full = validate_bsa_params(params, fill_defaults=True) if params is not None else None
        if full is not None and full != params:
            lines.append(f"in effect:  {json.dumps(full)} (missing keys take flash_attn_bsa_3d's defaults)")
        preset = match_preset(bool(enabled), params)
        if preset is not None and not get_preset(preset).enable_bsa:
            preset += " (BSA off)"
        lines.append(f"preset:     {preset or 'custom (no preset matches)'}")
        lines.append("valid:      yes")
    else:
        lines.append("valid:      NO")
        lines += [f"  - {p}" for p in problems]
    bak = backup_path(path)
    lines.append(f"backup:     {bak if os.path.exists(bak) else 'none'}")
    return "\n".join(lines), not problems


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bsa_ext config",
        description="Show or edit the BSA settings (enable_bsa, bsa_params) of a LongCat DiT config.json.",
        epilog="Presets: " + ", ".join(preset_names()) + ". Settable keys for --set: " + ", ".join(SETTABLE) + ".",
    )
    p.add_argument("config", nargs="?", help="config.json, or a checkpoint directory holding dit/ or transformer/config.json")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--status", action="store_true", help="show the settings and whether they are valid (default)")
    action.add_argument("--preset", metavar="NAME", help="apply a preset (see --list-presets)")
    action.add_argument("--enable", action="store_true", help="set enable_bsa true (adds the default preset's params if none)")
    action.add_argument("--disable", action="store_true", help="set enable_bsa false, keeping bsa_params")
    action.add_argument("--restore", action="store_true", help="put back the config as it was before the first edit")
    action.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="set one key (repeatable), after --preset/--enable/--disable")
    p.add_argument("--no-backup", action="store_true", help="do not keep a backup before editing")
    p.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    return p


def _restore(path: str) -> int:
    bak = backup_path(path)
    if not os.path.exists(bak):
        raise ConfigError(f"{path}: no backup to restore ({bak} does not exist)")
    read_config(bak)  # a damaged backup must not replace a good config
    with open(bak, encoding="utf-8") as f:
        _atomic_write_text(path, f.read(), mode_from=path)
    os.unlink(bak)
    print(f"restored {path} from {bak} (backup removed)")
    return 0


def run(argv: List[str]) -> int:
    args = _parser().parse_args(argv)
    if args.list_presets:
        print(describe_presets())
        return 0
    if args.config is None:
        raise ConfigError("missing the config.json path (or a checkpoint directory)")
    if args.set and (args.status or args.restore):
        raise ConfigError("--set cannot be combined with --status or --restore")
    path = find_config(args.config)
    if args.restore:
        return _restore(path)
    data = read_config(path)
    editing = args.preset is not None or args.enable or args.disable or bool(args.set)
    if not editing:
        text, valid = status_text(path, data)
        print(text)
        return 0 if valid else 1
    new = apply_request(data, args)
    changes = diff_lines(data, new)
    if not changes:
        print(f"{path}: already as requested, nothing written")
        return 0
    if args.dry_run:
        print("would change (dry run, nothing written):\n  " + "\n  ".join(changes))
        return 0
    bak = None if args.no_backup else ensure_backup(path)
    write_config(path, new)
    print(f"updated {path}:\n  " + "\n  ".join(changes))
    if bak:
        print(f"original kept as {bak} (undo with --restore)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m bsa_ext config``; returns the exit status (0 ok, 1 invalid, 2 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except SystemExit as exc:  # argparse: --help or a usage error
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        print(f"bsa_ext config: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"bsa_ext config: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
