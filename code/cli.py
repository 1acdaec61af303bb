"""What every script's --help shares: the docstring as written, and each flag's default."""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and ends each flag's help with "(default: ...)",
    unless the help already says its default or there is none to say (None, off)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
