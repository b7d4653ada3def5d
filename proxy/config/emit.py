"""TOML text from a Config: what `rwproxy sandbox up` writes and Config.to_toml returns. Secrets read
from a variable or a file are never written out."""

from __future__ import annotations

from proxy.config.schema import secret_keys, spec_fields, toml_str

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot emit {type(v).__name__} as TOML")


def emit(obj, prefix: str, header: str | None, out: list[str]) -> None:
    """Scalars first, then sub-tables and arrays of tables, as TOML requires."""
    specs = spec_fields(type(obj))
    if header:
        out += ["", header]
    secrets = {k for k in secret_keys(type(obj)) if getattr(obj, k + "_env") or getattr(obj, k + "_file")}
    for f in specs:
        if f.name in secrets:
            continue  # read from its variable or file, never written out
        if f.metadata["kind"] not in ("table", "tables"):
            out.append(f"{f.name} = {toml_value(getattr(obj, f.name))}")
    for f in specs:
        path, value = prefix + f.name, getattr(obj, f.name)
        if f.metadata["kind"] == "table":
            emit(value, path + ".", f"[{path}]", out)
        elif f.metadata["kind"] == "tables":
            for item in value:
                emit(item, path + ".", f"[[{path}]]", out)
