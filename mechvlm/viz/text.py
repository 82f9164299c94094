"""Text from data on matplotlib figures: drawn as written, never parsed as mathtext.

matplotlib reads any string with two unescaped ``$`` as mathtext, and a label such as
``$x^$`` (a token, a file name, a condition) then fails at draw time with a ``ValueError``
from the math parser, after all the compute. `plain` escapes every ``$`` (matplotlib
draws ``\\$`` as a literal dollar sign); the figure functions pass every label, path,
token and name that comes from data through it. Titles a caller passes explicitly are
left alone (they may use mathtext on purpose).
"""

from __future__ import annotations


def plain(text) -> str:
    """``str(text)`` with every ``$`` escaped, for matplotlib text that comes from data."""
    return str(text).replace("$", r"\$")
