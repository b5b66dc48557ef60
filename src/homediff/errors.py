"""Errors that mean the user has something to fix; their message says what and how."""


class HomediffError(Exception):
    """Base class of every error homediff raises for a user mistake."""


class ConfigError(HomediffError, ValueError):
    """A configuration value or key is wrong."""


class CheckpointError(HomediffError):
    """A weights file cannot be read or does not fit the model."""


def check_keys(factory, options: dict, source: str) -> dict:
    """``options`` once every key is a parameter of ``factory`` (a class or function); an unknown
    key is a ``ConfigError`` that names ``source`` and the keys ``factory`` takes."""
    import inspect

    params = {name: p for name, p in inspect.signature(factory).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))} (known: {', '.join(params)})")
    return options
