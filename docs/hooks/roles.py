"""MkDocs hook: Sphinx cross-reference roles in docstrings (``:func:`x```) on the API page.

The code's docstrings use Sphinx roles, which mkdocstrings' Google-style parser leaves as literal
text (``:func:<code>x</code>`` in the HTML). This drops the role and, when the named object is
documented on the same page, links to its anchor.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj):<code>([A-Za-z_][\w.]*)</code>")
_ID = re.compile(r'id="([A-Za-z_][\w.]*)"')


def on_page_content(html: str, page: Any, **_: Any) -> str:
    if ":<code>" not in html:
        return html
    ids = set(_ID.findall(html))

    def link(m: re.Match[str]) -> str:
        name = m.group(1)
        target = name if name in ids else next((i for i in sorted(ids) if i.endswith("." + name)), None)
        code = f"<code>{name}</code>"
        return f'<a href="#{target}">{code}</a>' if target else code

    return _ROLE.sub(link, html)
