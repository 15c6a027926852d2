"""The errors that mean "bad input": the user fixes a file, a key or a folder and reruns.

Every entry point (main, export, generate, the tools) catches `BadInput` at its top and
exits 2 with one line; anything else that escapes is a bug and ends the run with a
traceback and exit 1. So none of these derives from ValueError: a ValueError raised by
a library (or by a slip in this code) must not pass for the user's mistake. Code that
meets a library's ValueError on user input (a JSON file that does not parse, an image
that does not decode) converts it where it is met, into one of these with the file and
the fix named.

A leaf module (standard library only): config errors are reported before torch and MPI
load, and every layer may import it.
"""

from __future__ import annotations


class BadInput(Exception):
    """Input the user must fix (exit 2); the message names the file, record or key and the fix."""


class ConfigError(BadInput):
    """A config problem that the user fixes in the YAML file or on the command line."""


class DataError(BadInput):
    """A data file, record or image that cannot be used; the message names the file and record."""


class CheckpointError(BadInput):
    """A checkpoint that cannot be used; the message names the file and the key."""


class ExportError(BadInput):
    """Bad input to export or load_client; the message names the path, round or client."""
