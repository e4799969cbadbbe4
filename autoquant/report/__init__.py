"""The search report: the JSON data built from a `SearchResult` (and its schema), the
Markdown/HTML rendering with plots, and saving a result to a folder."""
