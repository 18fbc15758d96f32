"""Error and warning types of the configuration layer."""


class ConfigError(ValueError):
    """A configuration a user has to fix; the message says what and where."""


class ConfigWarning(UserWarning):
    """A configuration that is valid but probably not what the user meant."""
