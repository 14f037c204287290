"""Reading Prometheus text in tests: parse with prometheus_client.parser, then sum samples.

``Scrape(text).total("ballast_upstream_attempts_total", upstream="inference")`` is the
sum of every sample of that name whose labels include the given ones; the whole text
is parsed on construction, so a malformed exposition fails the test there.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Scrape:
    text: str
    families: dict[str, str] = field(default_factory=dict)  # family name -> type
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for family in text_string_to_metric_families(self.text):
            self.families[family.name] = family.type
            for s in family.samples:
                self.samples.append((s.name, dict(s.labels), float(s.value)))

    def total(self, name: str, **labels: str) -> float:
        return sum(value for n, got, value in self.samples
                   if n == name and all(got.get(k) == v for k, v in labels.items()))

    def label_values(self, name: str, label: str) -> set[str]:
        return {got[label] for n, got, _ in self.samples if n == name and label in got}


def scrape(base_url: str, path: str = "/metrics") -> Scrape:
    """GET the metrics of a running server; checks the content type."""
    with urllib.request.urlopen(base_url + path, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE, resp.headers["Content-Type"]
        return Scrape(resp.read().decode())
