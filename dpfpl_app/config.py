"""The run configuration: one validated pydantic model read once at each entry point.

Flower passes ``[tool.flwr.app.config]`` (plus ``--run-config`` overrides) as a flat dict
of kebab-case keys with int/float/bool/str values. ``RunConfig.from_flower`` turns it
into a typed, frozen object or stops with one message that names every bad key, its
value and what is allowed, so nothing runs half-configured.
"""

from __future__ import annotations

import warnings
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Method(str, Enum):
    """Prompt structures; all are configurations of one prompt learner."""

    DPFPL = "dpfpl"  # global + low-rank carriers + residual (the paper's method)
    DPLORA = "dplora"  # as dpfpl without the residual
    FEDPGP = "fedpgp"  # global + u v learned directly (no re-factorisation)
    FEDOTP = "fedotp"  # global + full-rank local prompt
    SECFPP = "secfpp"  # domain prompt of a secure cluster + full-rank class-level prompt
    PROMPTFL = "promptfl"  # global prompt only
    LOCAL = "local"  # local CoOp prompt only, nothing shared
    ZEROSHOT = "zeroshot"  # hand-written template, nothing trained

    @property
    def has_global(self) -> bool:
        return self not in {Method.LOCAL, Method.ZEROSHOT}

    @property
    def has_local(self) -> bool:
        return self not in {Method.PROMPTFL, Method.ZEROSHOT}

    @property
    def clustered(self) -> bool:
        """The shared prompt is one per secure cluster (SecFPP), not one for everyone."""
        return self is Method.SECFPP

    @property
    def low_rank(self) -> bool:
        return self in {Method.DPFPL, Method.DPLORA, Method.FEDPGP}


class DPMode(str, Enum):
    """How gradients are clipped and how the noise is chosen."""

    OFF = "off"
    PAPER = "paper"  # batch-mean clipping + the paper's sigma: no formal guarantee
    PER_SAMPLE = "per-sample"  # per-sample clipping + accountant-calibrated noise


class Aggregation(str, Enum):
    """How the server combines the clients' global-prompt gradients."""

    AUTO = "auto"  # secure against real SuperNodes, plain in a local simulation
    PLAIN = "plain"  # the server sees each clipped gradient and adds the Gaussian noise
    SECURE = "secure"  # SecAgg+: the server sees only the sum, noised by the clients


class Accountant(str, Enum):
    RDP = "rdp"
    PRV = "prv"


class Partitioner(str, Enum):
    PATHOLOGICAL = "pathological"
    DIRICHLET = "dirichlet"
    IID = "iid"


class Holdout(str, Enum):
    """The images a run evaluates on."""

    TEST = "test"  # the held-out test split: the figures a run reports
    VALIDATION = "validation"  # a split of the training pool: for choosing hyperparameters


_ALIAS = {"alias_generator": lambda name: name.replace("_", "-"), "populate_by_name": True}


class RunConfig(BaseModel):
    """Every hyperparameter of a run; keys are the kebab-case names of the fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, **_ALIAS)  # type: ignore[typeddict-item]

    method: Method = Field(
        Method.DPFPL,
        description="prompt structure; every method is a configuration of one prompt learner "
        "(the method page's table says what each trains and shares)",
    )
    rank: int = Field(
        8, ge=1, description="rank r of the local carriers u (n-ctx x r), v (r x d); at most n-ctx"
    )
    n_ctx: int = Field(16, ge=1, le=60, description="number of learned context vectors")
    init_std: float = Field(0.02, gt=0, description="prompts start from N(0, init-std^2)")
    zeroshot_template: str = Field(
        "a photo of a", description="the context words of the `zeroshot` method"
    )
    ctx_init: str = Field(
        "",
        description="words whose token embeddings initialise the first context vectors (of the "
        "global prompt; `local`: of the local prompt), the rest N(0, init-std^2); empty: all "
        "random",
    )
    num_server_rounds: int = Field(
        30, ge=1, le=100_000, description="rounds T (one server update each)"
    )
    local_steps: int = Field(
        1, ge=1, le=10_000, description="local iterations per round (paper: 1)"
    )
    batch_size: int = Field(32, ge=1, description="(expected) Poisson minibatch size B")
    lr_local: float = Field(
        0.003,
        gt=0,
        description="SGD learning rate of the private local prompt (DP-FPL's choice on the "
        "offline testbed; other methods': `configs/styled-digits-lrs.toml`)",
    )
    lr_global: float = Field(0.003, gt=0, description="server learning rate of the global prompt")
    momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="local SGD momentum (the authors use 0.9; it stalls DP-FPL on the offline "
        "testbed)",
    )
    weight_decay: float = Field(5e-4, ge=0, description="local SGD weight decay")
    dp_mode: DPMode = Field(
        DPMode.PER_SAMPLE,
        description="`per-sample`: per-sample clipping and accountant-calibrated noise (a formal "
        "guarantee); `paper`: the paper's batch-mean clipping and noise formula (a nominal "
        "epsilon); `off`: no clipping, no noise",
    )
    epsilon: float = Field(
        4.0,
        gt=0,
        description="target epsilon of everything released about a client's data (both "
        "channels composed)",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the composed guarantee")
    global_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="share of the per-step noise precision given to the global channel (more: "
        "less noise on the global prompt, more on the local carriers, same epsilon)",
    )
    max_sample_rate: float = Field(
        0.5,
        gt=0,
        le=1,
        description="public bound on every node's declared Poisson rate (node config "
        "`sample-rate`); the noise is sized for it",
    )
    clip_norm: float = Field(
        10.0, gt=0, description="L2 clip C (per sample; of the batch mean in `paper` mode)"
    )
    accountant: Accountant = Field(Accountant.RDP, description="opacus accountant: rdp or prv")
    aggregation: Aggregation = Field(
        Aggregation.AUTO,
        description="`auto`: secure against real SuperNodes, plain in a local simulation "
        "(`secfpp`: always secure); `plain`: the server sees each clipped gradient and adds the "
        "global noise; `secure`: SecAgg+ masking, the clients add Skellam noise and the server "
        "sees only the noised sum",
    )
    model: str = Field(
        "dpfpl-tiny-digits",
        min_length=1,
        description="an offline backbone name, a Hugging Face hub id, or a local directory",
    )
    dataset: str = Field(
        "styled-digits",
        min_length=1,
        description="offline (styled-digits, domain-digits, digits, fashion-mnist), hub "
        "(caltech101, oxford-pets, flowers102, food101, cifar100, cifar10), `hf:<hub id>`, or "
        "`imagefolder`",
    )
    data_dir: str = Field(
        "",
        description="local copy of the dataset on the node: a `save_to_disk` directory, data "
        "files, an image folder, or the Fashion-MNIST IDX directory; nothing is downloaded "
        "when set",
    )
    image_column: str = Field(
        "", description="image column of an `hf:` dataset; empty: the first image column"
    )
    label_column: str = Field(
        "", description="label column of an `hf:` dataset; empty: the first class-label column"
    )
    class_names_file: str = Field(
        "",
        description="text file, one class name per line in label order; overrides the "
        "dataset's names (needed when they are numbers)",
    )
    partitioner: Partitioner = Field(
        Partitioner.PATHOLOGICAL,
        description="how training images are split over clients: pathological (the paper's: "
        "round(C/N) classes per client), dirichlet, iid",
    )
    dirichlet_alpha: float = Field(0.3, gt=0, description="Dirichlet concentration (paper: 0.3)")
    test_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="share of each class held out as test data (datasets without a test split)",
    )
    holdout: Holdout = Field(
        Holdout.TEST,
        description="images evaluated on: the test split, or `validation` (a per-class split "
        "of the training pool, for choosing hyperparameters without test images)",
    )
    feature_views: int = Field(
        0,
        ge=0,
        le=64,
        description="augmented views (random-resized-crop + flip) per training image; 0: clean "
        "only",
    )
    seed: int = Field(0, ge=0, description="seed of the data split, partition and prompt init")
    reproducible_noise: bool = Field(
        False,
        description="derive DP noise and sampling from the public seed (experiments only: the "
        "epsilon becomes nominal); else OS entropy",
    )
    min_nodes: int = Field(10, ge=1, description="nodes the server waits for each round")
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of nodes trained per round")
    fraction_evaluate: float = Field(
        1.0, gt=0, le=1, description="share of nodes evaluated per round"
    )
    evaluate_every: int = Field(
        1,
        ge=1,
        description="evaluate every k-th round and the last one; the other rounds keep their "
        "training figures only, and the summary's last-10 means cover the last 10 evaluated "
        "rounds (k > 1 nearly halves a plain run's messages)",
    )
    fold_evaluation: bool = Field(
        False,
        description="plain rounds: evaluate round r in the train message of round r+1 (the "
        "same prompt, the same figures), so a round is one exchange, plus one evaluation "
        "after the last; needs fraction-evaluate = fraction-train; a secure round keeps "
        "its own secure evaluation",
    )
    node_wait_timeout: float = Field(
        120.0, gt=0, description="seconds to wait for min-nodes before failing with a clear error"
    )
    message_window: Annotated[int, Field(ge=1)] | Literal["auto", "off"] = Field(
        "auto",
        description="simulation: most messages in flight at once; auto = 2 x CPU cores, "
        "off = all at once (docs/simulation-scale.md)",
    )
    max_clusters: int = Field(
        4, ge=1, le=16, description="secfpp: largest number of domain clusters tried"
    )
    min_cluster_size: int = Field(
        3,
        ge=3,
        description="secfpp: no statistic of a group smaller than this is ever released; at "
        "most min-nodes",
    )
    cluster_iterations: int = Field(
        5, ge=1, le=50, description="secfpp: secure Lloyd iterations (two secure sums each)"
    )
    cluster_restarts: int = Field(
        8, ge=1, le=16, description="secfpp: random starts per k (least squared error wins)"
    )
    summary_dim: int = Field(
        64, ge=1, le=1024, description="secfpp: length of a client's domain summary (a public "
        "projection)"
    )
    summary_clip: float = Field(
        0.5, gt=0, le=2.0,
        description="secfpp: L2 clip of each image's projected vector in the domain summary "
        "(the summary's sensitivity is summary-clip / (B / q))",
    )
    summary_noise_multiplier: float = Field(
        2.0, gt=0, le=1000.0,
        description="secfpp: Gaussian multiplier of the summary's one DP release (per-sample "
        "DP), composed into the printed epsilon",
    )
    output_dir: str = Field(
        "runs",
        min_length=1,
        description="where run directories go (relative: to the local SuperLink's working "
        "directory)",
    )
    run_name: str = Field(
        "", description="run directory name (and state subdirectory); empty: generated"
    )
    state_dir: str = Field(
        "", description="node-local directory for private state; empty: `$DPFPL_CACHE/state`"
    )
    resume: str = Field(
        "",
        description="server checkpoint (`<run dir>/checkpoints/round-NNNN.safetensors`) to "
        "continue from; needs the same run-name; empty: start fresh",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        """TOML's true/false must not pass as 1/0 for a numeric key."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(str(key).replace("-", "_"))
                if (
                    isinstance(value, bool)
                    and field is not None
                    and (field.annotation in (int, float) or key == "message-window")
                ):
                    raise ValueError(f"{key}={value!r}: expected a number, got a boolean")
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        from dpfpl_app.data.data_sources import check_dataset_name

        check_dataset_name(self.dataset, self.data_dir)
        if self.method.low_rank and self.rank > self.n_ctx:
            raise ValueError(
                f"rank={self.rank} exceeds n-ctx={self.n_ctx}; the carriers u (n_ctx x r) "
                f"need rank <= min(n-ctx, embedding width): lower rank or raise n-ctx"
            )
        if self.resume and not self.run_name:
            raise ValueError(
                f"resume={self.resume!r} needs run-name: the resumed run continues that run's "
                "results directory and its clients' private state; set run-name to the name "
                "of the run being resumed"
            )
        if self.fold_evaluation and self.fraction_evaluate != self.fraction_train:
            raise ValueError(
                f"fold-evaluation=true evaluates the nodes sampled for the next round's "
                f"training, so it needs fraction-evaluate = fraction-train (got "
                f"{self.fraction_evaluate} and {self.fraction_train}): set them equal, or "
                "fold-evaluation=false"
            )
        if self.aggregation is Aggregation.SECURE or self.method.clustered:
            self._check_secure()
        if self.method.clustered:
            self._check_clustering()
        if self.dp_mode is DPMode.PAPER:
            warnings.warn(
                "dp-mode='paper' clips minibatch means, not samples: its epsilon is the "
                "paper's nominal figure, not a formal sample-level guarantee",
                stacklevel=2,
            )
        if self.reproducible_noise and self.dp_mode is not DPMode.OFF:
            warnings.warn(
                "reproducible-noise=true derives the DP noise from the public seed: anyone "
                "who knows the seed can subtract it. Use it for experiments, never deployment",
                stacklevel=2,
            )
        return self

    def _check_secure(self) -> None:
        """What secure aggregation needs (``secure_channel`` says why for each rule)."""
        if self.fold_evaluation:
            raise ValueError(
                "fold-evaluation=true folds a plain evaluation into training; a secure round "
                "evaluates through its own secure sum: set fold-evaluation=false or "
                "aggregation='plain' (with 'auto', folding applies to plain runs only)"
            )
        if not self.method.has_global:
            raise ValueError(
                f"aggregation='secure' sums the clients' global-prompt gradients, but "
                f"method={self.method.value!r} shares no global prompt: use aggregation='plain'"
            )
        if self.dp_mode is DPMode.PAPER:
            raise ValueError(
                "aggregation='secure' needs dp-mode='per-sample' (accounted client noise) or "
                "'off' (secure aggregation without DP); dp-mode='paper' has no accounting for it"
            )
        if self.min_nodes < 3:
            raise ValueError(
                f"aggregation='secure' needs min-nodes >= 3 (a sum of two inputs reveals each "
                f"to the other), got min-nodes={self.min_nodes}"
            )
        if self.dp_mode is DPMode.PER_SAMPLE and self.accountant is not Accountant.RDP:
            raise ValueError(
                f"aggregation='secure' is accounted with RDP (a subsampled bound for Skellam "
                f"noise; PRV has none): set accountant='rdp', got {self.accountant.value!r}"
            )
        if self.dp_mode is DPMode.PER_SAMPLE and self.local_steps != 1:
            raise ValueError(
                f"aggregation='secure' with dp-mode='per-sample' needs local-steps=1, got "
                f"{self.local_steps}: the accounting splits a round into per-step releases, "
                "and one rounding of a K-step mean does not split (secure_channel docstring)"
            )

    def _check_clustering(self) -> None:
        """SecFPP's clustering and per-cluster sums exist only under secure aggregation."""
        if self.aggregation is Aggregation.PLAIN:
            raise ValueError(
                "method='secfpp' learns one domain prompt per secure cluster; with "
                "aggregation='plain' the server would see every client's cluster and gradient: "
                "use aggregation='auto' or 'secure'"
            )
        if self.fraction_train < 1.0:
            raise ValueError(
                f"method='secfpp' trains every node of its clusters each round (a cluster's sum "
                f"is divided by its size), got fraction-train={self.fraction_train}: set 1.0"
            )
        if self.min_cluster_size > self.min_nodes:
            raise ValueError(
                f"min-cluster-size={self.min_cluster_size} exceeds min-nodes={self.min_nodes}: "
                "no cluster could ever open; lower min-cluster-size or raise min-nodes"
            )

    def resolve_aggregation(self, mode: Aggregation) -> RunConfig:
        """The config with ``auto`` made ``mode``; a config naming the other mode refuses.

        The ServerApp resolves ``auto`` once per run (secure against real SuperNodes, plain
        in simulation: ``server_run.aggregation_mode``) and every message it sends says
        which; a client resolves its own copy from the message, so both sides plan the
        same noise. Methods that share no global prompt have nothing to aggregate and
        stay plain.
        """
        if mode is Aggregation.AUTO:
            raise ValueError("resolve aggregation to 'plain' or 'secure', not 'auto'")
        if self.aggregation is mode:
            return self
        if self.aggregation is not Aggregation.AUTO:
            raise ConfigError(
                f"this is a {mode.value} round, but the run config says "
                f"aggregation={self.aggregation.value!r}: the ServerApp and this node disagree "
                "on the aggregation (and so on the noise); run both from the same config"
            )
        if mode is Aggregation.SECURE and not self.method.has_global:
            mode = Aggregation.PLAIN
        if self.method.clustered:  # SecFPP is secure wherever it runs, simulation included
            mode = Aggregation.SECURE
        # a secure round has its own secure evaluation: folding is for plain runs only
        fold = self.fold_evaluation and mode is Aggregation.PLAIN
        try:
            return RunConfig.from_flower(
                {**self.to_flower(), "aggregation": mode.value, "fold-evaluation": fold}
            )
        except ConfigError as err:
            raise ConfigError(
                f"aggregation='auto' runs secure aggregation against real SuperNodes, and this "
                f"config cannot: {str(err).splitlines()[1].strip()}. Fix that, or set "
                "aggregation='plain' to let the server see each client's clipped gradient"
            ) from None

    @property
    def dp_on(self) -> bool:
        return self.dp_mode is not DPMode.OFF and self.method is not Method.ZEROSHOT

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        """Validate Flower's run config, raising one readable error for all bad keys."""
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as err:
            raise ConfigError(_describe(err)) from None

    def to_flower(self) -> dict[str, int | float | bool | str]:
        """Flat kebab-case dict in the value types Flower's run config accepts."""
        return {
            k: (v.value if isinstance(v, Enum) else v)
            for k, v in self.model_dump(by_alias=True).items()
        }


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key and what is allowed."""


def _describe(err: ValidationError) -> str:
    """One line per bad key; never the whole config (Flower passes ~40 keys)."""
    lines = ["invalid run config:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if not key:
            # a cross-field rule: its own message names the keys; the input is every key
            cause = e.get("ctx", {}).get("error")
            lines.append(f"  {cause if cause is not None else e['msg']}")
            continue
        if e["type"] == "extra_forbidden":
            known = ", ".join(
                sorted(RunConfig.model_fields[f].alias or f for f in RunConfig.model_fields)
            )
            lines.append(f"  {key}: unknown key; known keys: {known}")
            continue
        value = e.get("input")
        lines.append(f"  {key}={value!r}: {e['msg']}")
    lines.append("fix the values in pyproject.toml [tool.flwr.app.config] or --run-config")
    return "\n".join(lines)
