"""The one rule for an OpenAI-compatible server's base URL, shared by the offline client, the judge
model's settings and the gateway's audit (which cannot import the httpx-based client)."""

from __future__ import annotations


def normalise_base_url(url: str) -> str:
    """`http://host:port`, `.../` or `.../v1` all become `http://host:port/v1`."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base URL must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else f"{url}/v1"
