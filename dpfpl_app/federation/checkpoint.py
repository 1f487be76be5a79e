"""Server checkpoints: the global prompt, the round and the privacy plan, every round.

A resumed run must continue the privacy accounting, not restart it: the checkpoint
holds the strategy's ``state_dict`` (global prompt, round, the channel plan's public
numbers) and the run config it was taken under, and a resume refuses a config that
would change the noise or the data, and a checkpoint older than the run's latest (the
clients have trained the rounds after it: repeating them would spend their budget
twice).

No noise key is ever saved (whoever read it could subtract the noise): a resumed run
draws fresh secret noise, or with ``reproducible-noise=true`` derives each round's noise
from the public seed and the round, as the uninterrupted run did.

Format: ``<run dir>/checkpoints/round-NNNN.safetensors`` with the tensor
``global_prompt`` and the JSON of :class:`CheckpointMeta` in the header metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dpfpl_app.config import RunConfig
from dpfpl_app.federation.results import RESULTS_FILE

CHECKPOINT_DIR = "checkpoints"
FORMAT_NAME = "dpfpl-checkpoint"
PROMPT_KEY = "global_prompt"
# Keys a resumed run may change: how it finds its checkpoint, how long it waits for
# nodes and how many messages it keeps in flight. Everything else shapes the noise, the
# data or the prompt and must stay.
RESUMABLE_CHANGES = frozenset({"resume", "min-nodes", "node-wait-timeout", "message-window"})


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message says why and what to do."""


class CheckpointMeta(BaseModel):
    """The non-tensor part of a checkpoint (validated: it is read back from disk)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dpfpl-checkpoint"] = "dpfpl-checkpoint"
    format_version: Literal[1] = 1
    round: int = Field(ge=0)
    strategy: dict[str, Any] = Field(description="DPFPLStrategy.state_dict() minus the prompt")
    config: dict[str, bool | int | float | str]


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"round-{server_round:04d}.safetensors"


def save_checkpoint(run_dir: Path, state: dict[str, Any], *, config: RunConfig) -> Path:
    """Write the strategy's ``state_dict()`` for its round, atomically."""
    prompt = state[PROMPT_KEY].detach().contiguous().cpu()
    meta = CheckpointMeta(
        round=int(state["round"]),
        strategy={k: v for k, v in state.items() if k != PROMPT_KEY},
        config=config.to_flower(),
    )
    path = checkpoint_path(run_dir, meta.round)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    save_file({PROMPT_KEY: prompt}, str(tmp), metadata={FORMAT_NAME: meta.model_dump_json()})
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint
    return path


def load_checkpoint(path: Path, *, config: RunConfig) -> tuple[dict[str, Any], CheckpointMeta]:
    """The strategy state to ``load_state_dict`` and the checkpoint's metadata.

    Raises
    ------
    CheckpointError
        If the file is missing or unreadable, or the run config differs in a key that
        the resumed run must keep (the message lists them).

    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get(FORMAT_NAME)
            prompt = handle.get_tensor(PROMPT_KEY)
        if header is None:
            raise CheckpointError(f"{path} is not a dpfpl server checkpoint")
        meta = CheckpointMeta.model_validate_json(header)
    except (FileNotFoundError, SafetensorError, OSError, ValidationError) as err:
        raise CheckpointError(f"cannot resume from {str(path)!r}: {err}") from None
    latest = max(_saved_rounds(Path(path).parent), default=meta.round)
    if latest > meta.round:
        raise CheckpointError(
            f"resume={str(path)!r} is older than this run's latest checkpoint (round "
            f"{latest}): the clients have already trained the rounds after round "
            f"{meta.round}, and training them again would spend their privacy budget twice. "
            f"Resume from {str(checkpoint_path(Path(path).parent.parent, latest))!r}"
        )
    changed = _changed_keys(meta.config, config.to_flower())
    if changed:
        raise CheckpointError(
            f"resume={str(path)!r}: the run config differs from the checkpoint's in "
            f"{', '.join(changed)}; only {', '.join(sorted(RESUMABLE_CHANGES))} may change "
            "on resume (the rest shapes the noise, the data or the prompt)"
        )
    return {**meta.strategy, PROMPT_KEY: prompt}, meta


def _saved_rounds(directory: Path) -> list[int]:
    rounds = []
    for file in directory.glob("round-*.safetensors"):
        digits = file.name.removeprefix("round-").removesuffix(".safetensors")
        if digits.isdigit():
            rounds.append(int(digits))
    return rounds


def _changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(
        f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
        for k in keys
        if saved.get(k) != current.get(k)
    )


def earlier_rounds(run_dir: Path, up_to: int) -> list[dict[str, Any]]:
    """The per-round results a resumed run continues from (empty if none were written)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    rounds = json.loads(path.read_text()).get("rounds", [])
    return [row for row in rounds if int(row.get("round", 0)) <= up_to]
