"""Sphinx configuration of the lorax_fn documentation (built by scripts/docs.sh).

Pages are MyST markdown; the API reference is autodoc over the installed package, with
napoleon reading the Google-style docstrings. Benchmark tables and figures are rendered
at build time from the committed JSON under docs/results/ (docs/_ext/lorax_results.py).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's lorax_fn, even if not installed
sys.path.insert(0, str(HERE / "_ext"))

import lorax_fn  # noqa: E402

project = "lorax_fn"
author = "lorax_fn contributors"
copyright = "the lorax_fn contributors"
release = version = lorax_fn.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "lorax_results",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated/*.md", "Thumbs.db", ".DS_Store"]
# lorax_fn.inits is written beside this site; its page is built once the package exists.
if importlib.util.find_spec("lorax_fn.inits") is None:
    exclude_patterns.append("api/inits.md")

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
# Types go beside each documented parameter, keeping signatures short (LoraSpec has 14).
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

html_theme = "sphinx_book_theme"
html_title = f"lorax_fn {release}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_static_path: list[str] = []
