"""The metrics every process exports besides its traffic: what it is (`fewstep_build_info`)."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import fewstep
from fewstep.service.metrics import Metrics


def test_build_info_names_the_version_and_the_role() -> None:
    for role in ("gateway", "worker"):
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(Metrics(role).registry).decode())}
        (sample,) = families["fewstep_build_info"].samples
        assert sample.name == "fewstep_build_info" and sample.value == 1.0
        assert sample.labels["version"] == fewstep.__version__ and sample.labels["role"] == role
        assert sample.labels["torch"].startswith("2.")
