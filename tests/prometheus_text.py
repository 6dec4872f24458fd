"""A node's ``/metrics`` as the tests read it: parsed by prometheus_client's parser, never by
regular expressions over the text."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class Exposition:
    """The samples of one scrape, by sample name (``idis_requests_total``,
    ``idis_request_duration_seconds_count``), and the names of their families."""

    by_name: dict[str, list[Sample]]
    families: set[str]

    def samples(self, name: str, /, **labels: str) -> list[Sample]:
        """The samples called ``name`` whose labels include ``labels``."""
        return [s for s in self.by_name.get(name, []) if labels.items() <= s.labels.items()]

    def value(self, name: str, /, **labels: str) -> float:
        """The one sample called ``name`` with exactly ``labels``; KeyError when there is none."""
        for sample in self.samples(name, **labels):
            if sample.labels == labels:
                return float(sample.value)
        raise KeyError(f"{name}{labels}")

    def total(self, name: str, /, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
        return float(sum(s.value for s in self.samples(name, **labels)))

    def label_values(self, name: str, label: str) -> list[str]:
        """Every value ``label`` takes in the samples called ``name``, one per sample."""
        return [s.labels[label] for s in self.samples(name) if label in s.labels]


def parse(text: str) -> Exposition:
    by_name: dict[str, list[Sample]] = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append(sample)
    return Exposition(by_name, families)


def scrape(port: int) -> Exposition:
    """``/metrics`` of the node whose metrics port is ``port`` on 127.0.0.1."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return parse(answer.read().decode())
