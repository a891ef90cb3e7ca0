"""``/docs`` (with ``--enable-docs``): the API's routes listed from the app's OpenAPI schema on a
plain HTML page that loads nothing else (no CDN, no script), so it works offline."""
from __future__ import annotations

from html import escape

_METHODS = ("get", "post", "put", "patch", "delete")


def docs_page(schema: dict) -> str:
    """The HTML page listing every operation of ``schema`` (method, path, summary)."""
    rows = "".join(_row(method, path, op) for path, item in sorted(schema.get("paths", {}).items())
                   for method, op in item.items() if method in _METHODS)
    title = escape(f"{schema.get('info', {}).get('title', 'API')} {schema.get('info', {}).get('version', '')}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h1>{title}</h1><p>The full schema: <a href='/openapi.json'>/openapi.json</a></p>"
            f"<table><tr><th>method</th><th>path</th><th>summary</th></tr>{rows}</table></body></html>")


def _row(method: str, path: str, op: dict) -> str:
    summary = op.get("summary") or op.get("operationId", "")
    return f"<tr><td>{method.upper()}</td><td><code>{escape(path)}</code></td><td>{escape(summary)}</td></tr>"
