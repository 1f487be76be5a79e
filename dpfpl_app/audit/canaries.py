"""Gradient canaries for the one-run audit, from the auditor's file to a client's batches.

An auditing organisation adds m canaries to one client's training data, each kept or
left out by a secret fair coin (Steinke, Nasr and Jagielski, NeurIPS 2023). A canary
here is a training example whose per-sample gradient is fixed: ``scale * C * u_i`` for
an orthonormal direction ``u_i`` of the prompt space. With ``scale`` >> 1 every clipped
piece it feeds reaches the clipping bound C (the global-prompt gradient, and in DP-FPL
both carrier gradients of the local prompt), which is the strongest example the
mechanism admits; orthonormal directions keep canaries from masking one another.

Each kept canary is drawn into each step's batch with the rate the client samples its
own data with (``ClientTrainer.sample_rate``, passed to ``draw`` by the trainer), from
the same secret stream as the real batch: a canary is an example like any other of that
client, so the audit tests the epsilon that client's examples really have, whatever
rule set its rate. Canaries do not count in the client's |D_i| (they would lower its
own rate and weaken the audit, not change the claim).

Who can turn this on: only the node's operator, through the environment variable
:data:`ENV_VAR` naming the canary file on the node (read by ``federation/client_node``,
which hands the injector to the trainer: ``method/`` never imports this package).
Nothing in a Message can: the coins are the auditor's secret, and a server that could
inject canaries could only spoil the training, but it has no business reading node
files. A node with canaries says so in
its log whenever it builds its trainer.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from dpfpl_app.privacy.noise import NoiseSource

logger = logging.getLogger(__name__)

ENV_VAR = "DPFPL_AUDIT_CANARIES"
FORMAT_NAME = "dpfpl-canaries"
DEFAULT_SCALE = 1000.0


class CanaryError(ValueError):
    """The canary file is missing, unreadable or does not fit the run."""


class CanarySpec(BaseModel):
    """The auditor's canary file: which client, how many, which are in (the secret)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dpfpl-canaries"] = FORMAT_NAME
    partition_id: int = Field(ge=0)
    direction_seed: int = Field(ge=0, description="public: the adversary knows the directions")
    included: tuple[bool, ...] = Field(min_length=2, description="the secret coins")
    scale: float = Field(default=DEFAULT_SCALE, ge=1.0)

    @model_validator(mode="after")
    def _both_sides(self) -> CanarySpec:
        if all(self.included) or not any(self.included):
            raise ValueError("the coins put every canary on one side: nothing to audit")
        return self

    @property
    def count(self) -> int:
        return len(self.included)

    def save(self, path: Path) -> Path:
        """Write the file readable by its owner only: the coins decide the audit."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(self.model_dump_json(indent=1))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return path


def load_spec(path: Path) -> CanarySpec:
    path = Path(path)
    try:
        return CanarySpec.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise CanaryError(
            f"{ENV_VAR}={str(path)!r}: no such canary file (written by `dpfpl audit --one-run`)"
        ) from None
    except (ValidationError, json.JSONDecodeError) as err:
        raise CanaryError(f"{ENV_VAR}={str(path)!r} is not a valid canary file:\n{err}") from None


def directions(seed: int, count: int, shape: tuple[int, int]) -> Tensor:
    """``count`` orthonormal directions of the (n_ctx, width) prompt space, (count, *shape)."""
    dim = shape[0] * shape[1]
    if not 1 <= count <= dim:
        raise CanaryError(
            f"{count} orthonormal canaries do not fit a prompt of {shape[0]} x {shape[1]} = "
            f"{dim} numbers: use at most {dim} canaries"
        )
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, count, generator=g, dtype=torch.float64))
    return q.T.reshape(count, *shape).float()


class CanaryInjector:
    """The kept canaries of one client, drawn into each step's batch (``CanaryRows``)."""

    def __init__(self, spec: CanarySpec, *, shape: tuple[int, int], clip_norm: float) -> None:
        kept = torch.tensor(spec.included)
        self.spec = spec
        self.gradients = directions(spec.direction_seed, spec.count, shape)[kept] * (
            spec.scale * clip_norm
        )

    def draw(self, sampler: NoiseSource, sample_rate: float) -> Tensor:
        """Per-sample gradient rows (k, n_ctx, width) of the canaries in this step's batch,
        each kept canary drawn with the client's own ``sample_rate``.
        """
        picked = sampler.bernoulli(self.gradients.shape[0], sample_rate)
        return self.gradients[picked]


def injector_from_env(
    partition_id: int, *, shape: tuple[int, int], clip_norm: float
) -> CanaryInjector | None:
    """The canaries of this partition, if the node's operator named a canary file."""
    value = os.environ.get(ENV_VAR, "")
    if not value:
        return None
    spec = load_spec(Path(value))
    if spec.partition_id != partition_id:
        return None
    logger.warning(
        "AUDIT: partition %d trains with %d canaries from %s (%s is set on this node); "
        "its prompts are audit artefacts, not for use",
        partition_id,
        spec.count,
        value,
        ENV_VAR,
    )
    return CanaryInjector(spec, shape=shape, clip_norm=clip_norm)
