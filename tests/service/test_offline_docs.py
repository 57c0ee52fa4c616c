"""/docs and /redoc work offline: every script, style and image they load is served by the app
itself (fastapi-offline's copies), and their requests are counted under their route templates."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from scripts.tools.service_process import serving
from service.backends import load_engine
from service.settings import Settings

# src="..."/href="..." attributes, Swagger UI's `url: '...'` and ReDoc's spec-url="..."
ASSET = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl\s*:\s*["']([^"']+)["']""")


def referenced_urls(html: str) -> list[str]:
    return [a or b for a, b in ASSET.findall(html)]


@pytest.fixture(scope="module")
def server(engine_dir: Path):
    with serving(Settings(), load_engine(engine_dir), ready=False) as live:
        yield live


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_what_the_app_serves(server, page):
    html = httpx.get(server.url + page)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    urls = referenced_urls(html.text)
    assert any(u.endswith(".js") for u in urls), urls
    assert "/openapi.json" in urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        asset = httpx.get(server.url + url)
        assert asset.status_code == 200 and len(asset.content) > 100, url
    if page == "/docs":  # nor does its script ask an online validator about the spec
        assert re.search(r'"validatorUrl":\s*null', html.text), "Swagger UI keeps its online validator"


def test_docs_requests_are_counted_by_route(server):
    for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui.css", "/page/app.js", "/no-such-route"):
        httpx.get(server.url + path)
    counted = {endpoint: server.metric("maskrcnn_requests_total", endpoint=endpoint)
               for endpoint in ("/docs", "/openapi.json", "/docs/assets/{path}", "/page/{path}", "unmatched")}
    assert all(count >= 1 for count in counted.values()), counted
