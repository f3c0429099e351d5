"""Settings of the ingest stage ([ingest] in the pipeline TOML)."""

from __future__ import annotations

from ccurate.configbase import Section


class IngestConfig(Section):
    """Sources to read and how to fetch them. Extended by the ingest stage."""

    allow_private: bool = False
    user_agent: str = "ccurate/0.1 (+https://github.com/ccurate/ccurate; dataset research bot)"
