"""The planner's configuration: one schema for the whole tree in `conf/`, from Hydra.

`PlannerConfig` is the schema of conf/config.yaml: the engine's model, job and plan plus cluster,
search and estimate. Hydra composes the tree into it, so every key and every choice (the enum-typed
fields) is checked when a command reads its config. The dataclasses hold every default; the files
of conf/ hold only the choices of a group (a model, a GPU, a cluster) and what differs from them.
`compose(overrides)` reads the tree with Hydra's compose API (no working-directory change, no log
folders) and turns every Hydra or OmegaConf complaint into one ConfigError.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from autotune.engine.config import (
    ConfigError,
    JobConfig,
    ModelConfig,
    PlanConfig,
    Precision,
    TrainConfig,
    omegaconf_message,
    check_choices,
    choices,
    validate,
)
from autotune.engine.hf_config import model_from_hf_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SECTIONS = ("model", "job", "plan", "cluster", "search", "estimate")  # the schema's sections
GROUPS = ("model", "cluster")  # sections with options to choose in conf/<group>/

SearchMode = choices("SearchMode", "auto", "measure", "analytic")
Sampler = choices("Sampler", "tpe", "gp", "cmaes", "random", "grid")
Objective = choices("Objective", "throughput", "cost", "pareto")
Pruner = choices("Pruner", "hyperband", "halving", "none")


@dataclass
class ClusterConfig:
    """The machines a job runs on; `gpu` names a file of conf/gpu/ or is `auto` (probe this one)."""

    name: str = "local"
    gpu: str = "auto"
    gpus_per_node: int = 1
    nodes: int = 1
    intra_node_gbps: Optional[float] = None  # GB/s per GPU per direction; None: the GPU's link
    inter_node_gbps: Optional[float] = None  # GB/s per GPU per direction across nodes
    host_memory_gb: Optional[float] = None  # per node; None: probe or unlimited

    @property
    def n_gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class SearchConfig:
    """How `autotune search` explores plans."""

    mode: SearchMode = SearchMode.auto  # auto: measure on the local machine, analytic for a catalog cluster
    trials: int = 12  # enough to measure every value of every dimension once, and then some (docs/design.md)
    sampler: Sampler = Sampler.tpe
    storage: Optional[str] = None  # None: SQLite study.db in the run folder; or a SQLAlchemy URL or .journal file
    probe_steps: int = 4
    warmup_steps: int = 1
    final_steps: int = 8
    finalists: int = 2
    trial_timeout_s: float = 300.0
    objective: Objective = Objective.throughput
    precisions: list[Precision] = field(default_factory=lambda: [Precision.fp32, Precision.bf16, Precision.fp16])
    max_dp: Optional[int] = None
    seed: int = 0
    pruner: Pruner = Pruner.hyperband  # stops a trial whose first steps are clearly slower
    use_estimator: bool = True  # false: plain Optuna over all valid plans (a baseline)
    trial_memory_cap_bytes: Optional[int] = None  # passed to the probe as --max-memory-bytes (tests)
    # devices one trial may use here; None: every GPU (on a CPU, one gloo rank per GPU of a node).
    # A plan larger than that runs its share here; the estimator models the rest
    local_devices: Optional[int] = None

    def __post_init__(self) -> None:
        check_choices(self, "search")


@dataclass
class EstimateConfig:
    calibration: Optional[str] = None  # a Calibration JSON (autotune.estimate.fit_calibration) to apply


@dataclass
class PlannerConfig:
    """The whole config tree: what every autotune command reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    job: JobConfig = field(default_factory=JobConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)

    @property
    def train(self) -> TrainConfig:
        """What the engine runs (the same model, job and plan objects)."""
        return TrainConfig(model=self.model, job=self.job, plan=self.plan)


ConfigStore.instance().store(name="autotune_schema", node=PlannerConfig)


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The raw composed config for `overrides` (e.g. ["model=gpt2", "plan.zero_stage=3"])."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except MissingConfigException as e:
        missing = getattr(e, "missing_cfg_file", "") or ""
        group = missing.split("/")[0] if "/" in missing else ""
        if group and (CONF_DIR / group).is_dir():
            name = missing.split("/", 1)[1]
            raise ConfigError(f"unknown {group} {name!r}; available: {', '.join(_group_options(group))}")
        raise ConfigError(str(e).splitlines()[0])
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(_override_message(e, overrides))
    finally:
        GlobalHydra.instance().clear()


UNKNOWN_SECTION = (f"is not a config section; use one of {', '.join(SECTIONS)} "
                   "(e.g. model=gpt2, plan.zero_stage=3, cluster.gpu=h100-sxm)")


def _override_message(e: Exception, overrides) -> str:
    """One line naming the bad override and what Hydra/OmegaConf found wrong with it."""
    cause = e.__cause__
    first = str(e).splitlines()[0]
    not_a_group = re.match(r"Could not override '([^'.]+)'\. No match in the defaults list", first)
    if not_a_group:
        return f"{not_a_group.group(1)} {UNKNOWN_SECTION}"
    if isinstance(cause, OmegaConfBaseException):
        detail = str(cause).splitlines()[0]
        return _schema_message(cause) or f"{first.replace('Error merging override ', '')}: {detail}"
    return f"bad override in {list(overrides)}: {first}; write overrides as key=value or group=option"


def _schema_message(e: OmegaConfBaseException) -> str:
    """What the schema finds wrong with a key or a choice ("" for another complaint)."""
    key = getattr(e, "full_key", "") or ""
    detail = str(e).splitlines()[0]
    if key in SECTIONS:  # `job=x`: a section that is not a group
        return f"{key} has no options to choose (only {' and '.join(GROUPS)} do); set its keys, e.g. {key}.KEY=VALUE"
    if "not in" in detail and key:
        if "." not in key:  # neither a group nor a section's key
            return f"{key} {UNKNOWN_SECTION}"
        section = key.rsplit(".", 1)[0]
        schema = "autotune/config.py" if section.split(".")[0] in ("cluster", "search", "estimate") else "autotune/engine/config.py"
        return f"{key} is not a setting of {section}; check the spelling (the keys are in {schema}, the schema)"
    if detail.startswith("Invalid value"):
        return omegaconf_message(e)
    return ""


def planner_config(overrides: list[str] | tuple[str, ...] = ()) -> PlannerConfig:
    """A validated PlannerConfig from Hydra overrides."""
    cfg = compose(overrides)
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:  # `+name=value` adds a section no command reads: a typo, not a setting
        raise ConfigError(f"unknown config section(s) {unknown}; the sections are {', '.join(SECTIONS)} "
                          "(e.g. plan.zero_stage=3)")
    if cfg.model.hf_config:
        cfg.model = OmegaConf.merge(cfg.model, model_from_hf_config(cfg.model.hf_config))
    try:  # merged again into the schema: a key added with `+plan.name=...` is refused like a typo
        pc = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PlannerConfig), OmegaConf.to_container(cfg)))
    except OmegaConfBaseException as e:
        raise ConfigError(_schema_message(e) or omegaconf_message(e))
    validate(pc.train)
    cluster = pc.cluster
    if cluster.gpus_per_node < 1 or cluster.nodes < 1:
        raise ConfigError(
            f"cluster {cluster.name!r} has {cluster.nodes} node(s) x {cluster.gpus_per_node} GPU(s); "
            "both must be at least 1"
        )
    tp = pc.plan.tp
    if tp > cluster.gpus_per_node or cluster.gpus_per_node % tp:
        # tp's all-reduces run in every block: a tp group must sit inside one node's fast links
        raise ConfigError(
            f"plan.tp={tp} must fit in a node of cluster {cluster.name!r} (gpus_per_node={cluster.gpus_per_node}): "
            f"use a plan.tp that divides {cluster.gpus_per_node}"
        )
    return pc
