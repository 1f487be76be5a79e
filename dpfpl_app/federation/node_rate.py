"""Which Poisson rate a node samples at, decided before its data is read.

The rule (``privacy.dp_channel`` explains why the rate must not depend on the data):

1. the rate the organisation declares in its node config (``sample-rate``);
2. else, when the node's data is its share of the public simulation partition plan (a
   public dataset split by ``partition-id`` / ``num-partitions`` with the run's public
   seed, no node-local ``dataset`` / ``data-dir``), the plan's rate: B / the planned
   partition size, capped at the bound. The plan is public, so is this rate;
3. else the run's bound ``max-sample-rate``, used as is.

Any of them above the bound is refused before training (``ChannelPlan.check_rate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from dpfpl_app.config import ConfigError, RunConfig
from dpfpl_app.privacy.dp_channel import NODE_RATE_KEY, ChannelPlan
from dpfpl_app.privacy.sample_rate import matching_rate

NODE_DATA_KEYS = ("dataset", "data-dir")
"""Node config keys that name an organisation's own data (``client_node.with_node_data``)."""


class RateSource(str, Enum):
    """Where a node's rate came from (for its log; the rate itself is public)."""

    DECLARED = "declared in node config"
    PARTITION_PLAN = "the public partition plan"
    BOUND = "the run's max-sample-rate"


@dataclass(frozen=True)
class NodeRate:
    rate: float
    source: RateSource

    def describe(self) -> str:
        return f"sample rate {self.rate:.4g} ({self.source.value})"


def public_partition(cfg: RunConfig, node_config: Mapping[str, object]) -> bool:
    """Whether the node's data is its share of a public dataset's simulation split."""
    from dpfpl_app.data.data_sources import HUB_DATASETS
    from dpfpl_app.data.image_styles import STYLED_DATASETS
    from dpfpl_app.data.offline_data import DATASETS

    if any(key in node_config for key in NODE_DATA_KEYS):
        return False
    name = cfg.dataset
    return (
        name in DATASETS or name in STYLED_DATASETS or name in HUB_DATASETS
        or name.startswith("hf:")
    )


def planned_sizes(cfg: RunConfig, num_partitions: int) -> list[int]:
    """Training records of every partition of the public plan (labels only, no images)."""
    from dpfpl_app.data.federated_data import partitions_for

    return [len(part.train) for part in partitions_for(cfg, num_partitions)]


def node_rate(
    cfg: RunConfig,
    plan: ChannelPlan,
    node_config: Mapping[str, object],
    *,
    partition_id: int,
    num_partitions: int,
) -> NodeRate:
    """The node's rate by the rule above, checked against the run's bound."""
    if NODE_RATE_KEY in node_config:
        raw = node_config[NODE_RATE_KEY]
        try:
            rate = float(str(raw))
        except ValueError:
            raise ConfigError(
                f"node config {NODE_RATE_KEY}={raw!r} is not a number: restart the SuperNode "
                f'with --node-config "... {NODE_RATE_KEY}=0.02" (`dpfpl sample-rate` suggests one)'
            ) from None
        return NodeRate(plan.check_rate(rate), RateSource.DECLARED)
    if public_partition(cfg, node_config):
        size = planned_sizes(cfg, num_partitions)[partition_id]
        rate = matching_rate(cfg.batch_size, size, plan.sample_rate)
        return NodeRate(plan.check_rate(rate), RateSource.PARTITION_PLAN)
    return NodeRate(plan.sample_rate, RateSource.BOUND)
