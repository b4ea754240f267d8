"""``--config FILE.yaml`` for the job entrypoints: option names and values, flags win elsewhere."""

from __future__ import annotations

from agc_ray.distributed.errors import InputError, one_line


def load_options(path: str, known) -> dict:
    """The YAML mapping at ``path`` as {option name: value} (dashes in keys become underscores).

    Raises:
        InputError: the file is missing or unreadable, not YAML, not a mapping, or has a key not in ``known``.
    """
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as e:
        raise InputError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InputError(f"--config {path}: invalid YAML ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of options, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise InputError(f"--config {path}: unknown option {key!r}")
        out[name] = value
    return out
