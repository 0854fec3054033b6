"""What bad input is, and the exit status it ends with (one definition for every command)."""

EXIT_BAD_INPUT = 2  # a config, data, checkpoint or environment problem, found before or during the run


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and what is allowed."""
