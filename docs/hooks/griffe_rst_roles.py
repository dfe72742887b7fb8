"""Griffe extension: render the reST roles of the docstrings (``:func:`x```) as code spans.

The docstrings are Google style read by Sphinx-minded tools and by ``help()``; mkdocstrings
renders Markdown, where ``:func:`merge``` would print the role name. Only the site's copy of a
docstring changes, never the source.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|data|mod|meth|attr|exc):`~?([^`]+)`")


def strip_roles(text: str) -> str:
    """Turn every ``:role:`target``` of ``text`` into the code span ```target```."""
    return ROLE.sub(r"`\1`", text)


class RstRoles(griffe.Extension):
    """Strip reST roles from every docstring griffe loads."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        """Rewrite the docstring of each loaded object."""
        if obj.docstring is not None:
            obj.docstring.value = strip_roles(obj.docstring.value)
