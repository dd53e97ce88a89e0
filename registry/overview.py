"""What `GET /models` and `autoglm models` show: versions, aliases, arms, gate and online metrics."""

from __future__ import annotations

from typing import Callable

from feedback.online import ArmStats
from registry.models import ModelRegistry
from search.serving import ServedModels


def models_overview(registry: ModelRegistry | None, models: ServedModels,
                    online: Callable[[], dict[tuple[str, str], ArmStats]], alpha: float,
                    canary_verdict: str | None = None, champion_verdict: str | None = None) -> dict:
    challenger = models.challenger
    return {
        "mlflow_uri": registry.tracking_uri if registry else None,
        "arms": {"champion": models.champion.version,
                 "challenger": challenger.version if challenger else None,
                 "challenger_share": models.challenger_share if challenger else 0.0},
        "versions": registry.versions() if registry else [],
        "online": [{"version": version, "arm": arm, **stats.summary(alpha)}
                   for (version, arm), stats in sorted(online().items())],
        "online_interval": f"anytime-valid {1 - alpha:.0%} confidence sequence (feedback/online.py)",
        "canary": canary_verdict,  # the rollback guard's last comparison of the arms
        "champion_watch": champion_verdict,  # ... and of a new champion with its predecessor
    }
