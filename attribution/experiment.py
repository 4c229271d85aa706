"""Experiment specification: one YAML file per experiment, validated strictly.

Every knob that changes a result lives here, so an experiment file plus its seeds reproduces every artefact.
Unknown keys are errors (a typo must never silently fall back to a default).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ExperimentError(ValueError):
    """An experiment file is missing, unreadable or invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    source: Literal["digits", "mnist", "cifar10", "cifar2", "image_folder", "manifest"] = "digits"
    path: str | None = None
    classes: list[str] | None = None
    max_images: int | None = Field(default=None, ge=1)
    train_size: int = Field(default=1000, ge=2, description="images used for training; the rest are held out")
    split_seed: int = 0


class ModelSpec(_Strict):
    block_out_channels: list[int] = Field(default=[32, 64], min_length=1)
    layers_per_block: int = Field(default=1, ge=1)
    attention: bool = Field(default=False, description="self-attention at the lowest resolution")
    norm_num_groups: int = Field(default=8, ge=1)
    num_train_timesteps: int = Field(default=1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"

    @model_validator(mode="after")
    def _groups_divide_channels(self):
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels entry {bad}")
        return self


class TrainingSpec(_Strict):
    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        default="cosine", description="decay to zero at the last step: ends training in a flat, low-noise state")
    warmup_steps: int = Field(default=50, ge=0)
    ema_decay: float | None = Field(default=0.995, gt=0, lt=1)
    checkpoints: int = Field(default=5, ge=1, description="evenly spaced saved checkpoints (Diffusion-TracIn)")
    seed: int = 0
    grad_clip: float | None = Field(default=1.0, gt=0)


class QuerySpec(_Strict):
    n_generated: int = Field(default=16, ge=0)
    n_heldout: int = Field(default=16, ge=0)
    sampling_steps: int = Field(default=50, ge=1, description="DDIM steps for generated queries")
    seed: int = 10_000

    @model_validator(mode="after")
    def _some_queries(self):
        if self.n_generated + self.n_heldout == 0:
            raise ValueError("at least one of n_generated / n_heldout must be positive")
        return self


OUTPUTS = ("loss", "square", "average", "l1", "l2", "linf", "elbo", "loss_l1")


class MethodSpec(_Strict):
    """One attribution method. `kind` picks the recipe (DESIGN 1.1-1.4); other keys tune it."""

    kind: Literal["trak", "journey_trak", "tracin", "retrac", "pixel", "embedding"]
    output: str = Field(default="loss", description="output function f (trak); loss or loss_l1 (tracin/retrac)")
    timesteps: Literal["uniform", "random"] = "uniform"
    K: int = Field(default=10, ge=1, description="timesteps per train sample (trak) or query grid (tracin)")
    noise_draws: int = Field(default=1, ge=1, description="noises per query timestep (journey_trak, tracin)")
    scorer: Literal["kernel", "grad_dot", "grad_cos", "relative_if", "renormalized_if"] = "kernel"
    similarity: Literal["cosine", "dot", "neg_l2"] = "cosine"
    checkpoints: list[int] | None = Field(default=None, description="tracin: checkpoint indices (default all)")

    @field_validator("output")
    @classmethod
    def _known_output(cls, v: str) -> str:
        if v not in OUTPUTS:
            raise ValueError(f"unknown output function {v!r}; choose one of {list(OUTPUTS)}")
        return v

    @model_validator(mode="after")
    def _kind_rules(self):
        if self.kind in ("tracin", "retrac") and self.output not in ("loss", "loss_l1"):
            raise ValueError(f"{self.kind} uses a training loss: output must be 'loss' or 'loss_l1'")
        return self


def default_methods() -> dict[str, MethodSpec]:
    return {
        "trak": MethodSpec(kind="trak", output="loss"),
        "dtrak": MethodSpec(kind="trak", output="square"),
        "journey_trak": MethodSpec(kind="journey_trak", output="loss", timesteps="random", noise_draws=2),
        "tracin": MethodSpec(kind="tracin", output="loss", noise_draws=2),
        "retrac": MethodSpec(kind="retrac", output="loss", noise_draws=2),
        "pixel": MethodSpec(kind="pixel", similarity="cosine"),
        "embedding": MethodSpec(kind="embedding", similarity="cosine"),
    }


class AttributionSpec(_Strict):
    projector: Literal["countsketch", "countsketch_gaussian", "gaussian", "rademacher", "identity"] = "countsketch"
    proj_dim: int = Field(default=2048, ge=1, description="k")
    proj_seed: int = 0
    noise_seed: int = 0
    batch_size: int = Field(default=32, ge=1, description="samples per batched per-sample-gradient call")
    shard_rows: int = Field(default=256, ge=1, description="feature-store shard; a multiple of batch_size")
    lambda_factor: float = Field(default=0.1, gt=0, description="kernel lambda = factor x mean diag(Phi^T Phi)")
    top_k: int = Field(default=10, ge=1, description="proponents and opponents kept per query in DuckDB")
    show_queries: int = Field(default=6, ge=1, description="queries drawn with their top proponents")
    methods: dict[str, MethodSpec] = Field(default_factory=default_methods)

    @model_validator(mode="after")
    def _shards_align_with_batches(self):
        if self.shard_rows % self.batch_size:
            raise ValueError(f"shard_rows={self.shard_rows} must be a multiple of batch_size={self.batch_size} "
                             "(aligned batches make sharded features bit-identical to unsharded ones)")
        for name in self.methods:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"method name {name!r} must be lower_snake_case (it becomes an asset name)")
        return self


class LDSSpec(_Strict):
    """Linear datamodeling score protocol (DESIGN 2): subsets retrained with shared seeds, lambda picked on a
    selection split, the LDS reported on the rest with a bootstrap interval and the seed-noise ceiling."""

    enabled: bool = True
    n_subsets: int = Field(default=16, ge=6)
    alpha: float = Field(default=0.5, gt=0, lt=1)
    seeds: list[int] = Field(default=[0, 1], min_length=1, description=">= 2 seeds give the noise ceiling")
    n_selection: int = Field(default=5, ge=3, description="subsets used only to choose lambda")
    subset_seed: int = 0
    output_timesteps: int = Field(default=100, ge=1, description="even grid of t for the actual output")
    output_noises: int = Field(default=2, ge=1, description="noise draws per t for the actual output")
    output_seed: int = 0
    lambda_factors: list[float] = Field(default=[1e-3, 1e-2, 1e-1, 1.0, 10.0], min_length=1)
    bootstrap: int = Field(default=1000, ge=10)
    models_per_process: int = Field(default=1, ge=1, description="subset models of one seed trained together in "
                                    "one process (attribution.batched_training; ~1.5x models per CPU-hour at 8). "
                                    "Part of the spec: grouped convolutions round differently from single models")

    @model_validator(mode="after")
    def _split_leaves_test_subsets(self):
        if self.n_selection > self.n_subsets - 3:
            raise ValueError(f"n_selection={self.n_selection} leaves fewer than 3 of n_subsets={self.n_subsets} "
                             "for the reported LDS (a Spearman correlation needs at least 3 subsets)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a value")
        if self.models_per_process > self.n_subsets:
            raise ValueError(f"models_per_process={self.models_per_process} exceeds n_subsets={self.n_subsets}")
        return self


class CounterfactualSpec(_Strict):
    """Remove a generated query's top proponents, retrain, regenerate with the same seed (DESIGN 2)."""

    enabled: bool = True
    n_queries: int = Field(default=2, ge=1, description="the first n generated queries")
    remove: int = Field(default=100, ge=1, description="training images removed per query (D-TRAK: 1000 of 5000)")
    methods: list[str] = Field(default=["dtrak"], description="methods compared with removing random images")
    encoder_steps: int = Field(default=400, ge=1, description="training steps of the in-domain image encoder")


def _finetune_default() -> TrainingSpec:
    return TrainingSpec(steps=100, lr=1e-3, warmup_steps=10, checkpoints=1)


def _recovery_default() -> TrainingSpec:
    return TrainingSpec(steps=300, lr=1e-3, warmup_steps=20, checkpoints=1)


class ShapleySpec(_Strict):
    """Group attribution (DESIGN 1.5): Shapley values of data contributors for global properties F of the model.

    Coalition models are obtained per `methods` entry (retrain: the ground truth; finetune: the full model
    fine-tuned on the coalition; sparsified_finetune: the pruned, recovered model fine-tuned on it). The group LDS
    always uses retrained half-group coalitions."""

    enabled: bool = True
    groups: list[str] = Field(default_factory=list, description="the contributors, in order (the data's group ids)")
    properties: list[str] = Field(default=["inception_score", "diversity", "fid"], min_length=1,
                                  description="registered names or 'module.path:function'; the first is primary")
    encoder: str | None = Field(default=None, description="local TorchScript image model returning (features, "
                                "logits), e.g. Inception; default: the in-domain classifier asset")
    n_images: int = Field(default=256, ge=2, description="images generated per model to compute F")
    image_seed: int = 20_000
    sampling_steps: int = Field(default=25, ge=1)
    reference_clusters: int = Field(default=20, ge=2, description="Ward clusters of the reference set (diversity)")
    methods: list[Literal["retrain", "finetune", "sparsified_finetune"]] = Field(
        default=["sparsified_finetune", "finetune"], min_length=1)
    n_coalitions: int = Field(default=32, ge=2, description="Shapley-kernel coalitions (paired) per method")
    banzhaf_coalitions: int = Field(default=0, ge=0, description="uniform coalitions for Banzhaf values (0: off)")
    coalition_seed: int = 0
    finetune: TrainingSpec = Field(default_factory=_finetune_default, description="per-coalition fine-tuning")
    prune_ratio: float = Field(default=0.3, gt=0, lt=1, description="structured channel-pruning ratio (sFT)")
    pruned_finetune: TrainingSpec = Field(default_factory=_recovery_default,
                                          description="recovery of the pruned model on the full data (sFT)")
    lds_coalitions: int = Field(default=12, ge=0, description="retrained half-group coalitions for the group LDS "
                                "(0: off, else >= 3)")
    counterfactual_fraction: float = Field(default=0.4, gt=0, lt=1, description="share of groups removed")
    counterfactual_methods: list[str] = Field(default_factory=list, description="estimators whose top / bottom "
                                              "groups are removed and the model retrained, e.g. shapley_sparsified_finetune")
    aggregate: list[str] = Field(default=["dtrak"], description="per-sample methods aggregated per group (baseline)")
    aggregate_how: Literal["sum", "mean", "max"] = "sum"
    bootstrap: int = Field(default=200, ge=10)

    @model_validator(mode="after")
    def _consistent(self):
        if not self.enabled:
            return self
        if len(self.groups) < 2:
            raise ValueError("shapley.groups must list at least 2 contributor groups (e.g. the digit classes "
                             "['0', '1', ..., '9']), or set shapley.enabled: false")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"shapley.groups {self.groups} repeats a group")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"shapley.methods {self.methods} repeats a method")
        if self.n_coalitions % 2:
            raise ValueError(f"n_coalitions={self.n_coalitions} must be even (coalitions come with their complements)")
        if self.n_coalitions <= 2 * len(self.groups):
            raise ValueError(f"n_coalitions={self.n_coalitions} must exceed 2 x {len(self.groups)} groups: kernel samples "
                             "repeat (sizes 1 and G-1 dominate), and with too few distinct coalitions KernelSHAP is not "
                             "identified (20 coalitions for 10 digit groups were singular)")
        if 0 < self.lds_coalitions < 3:
            raise ValueError("lds_coalitions must be 0 (off) or >= 3 (a Spearman correlation needs 3 points)")
        unknown = sorted(set(self.counterfactual_methods) - set(self.estimators()))
        if unknown:
            raise ValueError(f"counterfactual_methods {unknown} are not estimators of this experiment; choose from "
                             f"{self.estimators()}")
        return self

    def estimators(self, per_sample: list[str] | None = None) -> list[str]:
        """Names of the group-value estimators this spec produces (the `estimator` column of group_values)."""
        names = [f"shapley_{m}" for m in self.methods] + [f"loo_{m}" for m in self.methods]
        if self.banzhaf_coalitions:
            names += [f"banzhaf_{m}" for m in self.methods]
        return names + [f"{self.aggregate_how}_{a}" for a in (self.aggregate if per_sample is None else per_sample)]


def _pretraining_default() -> TrainingSpec:
    return TrainingSpec(steps=600, lr=2e-3, checkpoints=1)


class LoRASpec(_Strict):
    """The LoRA setting (DESIGN 1.1 "parameters", 1.5, 4): a conditional base model, and the model every attribution
    method explains is a LoRA adapter fine-tuned on the training set (top-level `training` is its recipe; subset,
    counterfactual and coalition models retrain the adapter from the same base). Conditioning is the image's
    class label; contributors (shapley.groups) play the artists.

    The embedded base is a UNet2DConditionModel (`model` section widths) pretrained on the `pretrain_groups`
    images, which are then left out of the training and held-out sets; `base_pipeline` names a locally stored
    Stable Diffusion pipeline directory instead."""

    enabled: bool = True
    base_pipeline: str | None = Field(default=None, description="local diffusers Stable Diffusion directory "
                                      "(latent space; class prompts from `prompt`); default: the embedded base")
    pretrain_groups: list[str] = Field(default_factory=list, description="groups whose images pretrain the "
                                       "embedded base (never part of the training set)")
    pretraining: TrainingSpec = Field(default_factory=_pretraining_default, description="embedded base training")
    cross_attention_dim: int = Field(default=32, ge=1)
    tokens: int = Field(default=1, ge=1, description="conditioning tokens per label (embedded class encoder)")
    head_dim: int = Field(default=8, ge=1)
    cross_attention_levels: int = Field(default=1, ge=1, description="lowest resolutions with cross-attention")
    conditioning_seed: int = 0
    prompt: str = Field(default="a picture of {label}", description="Stable Diffusion base: prompt per class label")
    rank: int = Field(default=4, ge=1)
    alpha: float | None = Field(default=None, gt=0, description="LoRA scaling alpha/rank; default alpha = rank")
    target_modules: list[str] = Field(default=["to_q", "to_k", "to_v", "to_out.0"], min_length=1)

    @model_validator(mode="after")
    def _one_base(self):
        if not self.enabled:
            return self
        if self.base_pipeline and self.pretrain_groups:
            raise ValueError("lora.pretrain_groups pretrain the embedded base; a Stable Diffusion base_pipeline is "
                             "already trained: drop one of them")
        if not self.base_pipeline and not self.pretrain_groups:
            raise ValueError("lora needs a base: list lora.pretrain_groups (the embedded base is pretrained on "
                             "them) or name a local Stable Diffusion directory in lora.base_pipeline")
        if "{label}" not in self.prompt:
            raise ValueError(f"lora.prompt {self.prompt!r} must contain {{label}}")
        return self


class OperationsSpec(_Strict):
    """How the experiment lives in Dagster: the evaluation schedule (off until switched on in the UI), the inbox of
    new query images, and whether declarative automation re-materializes stale assets."""

    evaluation_cron: str = Field(default="0 3 * * 0", description="re-run the evaluation job (weekly by default)")
    evaluation_schedule_running: bool = False
    inbox: bool = Field(default=True, description="watch <root>/<experiment>/inbox for images to attribute")
    inbox_sensor_running: bool = True
    inbox_interval_seconds: int = Field(default=30, ge=5)
    inbox_max_files: int = Field(default=32, ge=1, description="files handled per sensor tick")
    automation: bool = Field(default=True, description="stale assets re-materialize once the automation sensor "
                             "is switched on (it starts stopped)")


class Experiment(_Strict):
    name: str
    description: str = ""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    torch_threads: int = Field(default=1, ge=1, description="CPU threads per process (torch ops, and the "
                               "countsketch projection of the features); 1 is fastest and stable on 2 vCPUs")
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    queries: QuerySpec = QuerySpec()
    attribution: AttributionSpec = AttributionSpec()
    lds: LDSSpec = LDSSpec()
    counterfactual: CounterfactualSpec = CounterfactualSpec()
    shapley: ShapleySpec = ShapleySpec(enabled=False)
    lora: LoRASpec = LoRASpec(enabled=False)
    operations: OperationsSpec = OperationsSpec()

    @field_validator("name")
    @classmethod
    def _name_is_key(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", v):
            raise ValueError("must be lower_snake_case (it becomes the Dagster asset-key prefix)")
        return v

    @model_validator(mode="after")
    def _references_exist(self):
        cf = self.counterfactual
        unknown = [m for m in cf.methods if m not in self.attribution.methods] if cf.enabled else []
        if unknown:
            raise ValueError(f"counterfactual.methods {unknown} are not in attribution.methods "
                             f"{sorted(self.attribution.methods)}")
        if cf.enabled and cf.n_queries > self.queries.n_generated:
            raise ValueError(f"counterfactual.n_queries={cf.n_queries} exceeds queries.n_generated="
                             f"{self.queries.n_generated}")
        if cf.enabled and cf.remove >= self.data.train_size:
            raise ValueError(f"counterfactual.remove={cf.remove} must be below data.train_size={self.data.train_size}")
        unknown = [m for m in self.shapley.aggregate if m not in self.attribution.methods] if self.shapley.enabled else []
        if unknown:
            raise ValueError(f"shapley.aggregate {unknown} are not in attribution.methods "
                             f"{sorted(self.attribution.methods)}")
        if self.lora.enabled and self.lds.models_per_process > 1:
            raise ValueError("lds.models_per_process > 1 trains plain UNets side by side; LoRA adapters train one "
                             "per process: set it to 1")
        if self.lora.enabled and self.operations.inbox:
            raise ValueError("operations.inbox: inbox images carry no class label to condition a LoRA model on; "
                             "set operations.inbox: false")
        overlap = sorted(set(self.lora.pretrain_groups) & set(self.shapley.groups)) if self.lora.enabled \
            and self.shapley.enabled else []
        if overlap:
            raise ValueError(f"shapley.groups {overlap} are lora.pretrain_groups: their images pretrain the base "
                             "and are not in the training set")
        return self

    def section_json(self, *sections: str) -> str:
        """Canonical JSON of some sections: the part of the spec an artefact depends on (its code-version input)."""
        import json

        dumped = self.model_dump(mode="json")
        return json.dumps({s: dumped[s] for s in sections}, sort_keys=True)


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"key '{loc}': unknown key (check the spelling; see attribution/experiment.py for valid keys)"
    return f"key '{loc}': {err['msg']} (got {err.get('input')!r})"


def parse_experiment(raw: dict, source: str = "<dict>") -> Experiment:
    try:
        return Experiment.model_validate(raw)
    except ValidationError as e:
        lines = "\n  ".join(_describe(err) for err in e.errors())
        raise ExperimentError(f"invalid experiment {source}:\n  {lines}") from None


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist: pass a YAML file such as experiments/digits.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExperimentError(f"experiment file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"experiment file {path} must hold a mapping of keys (name, data, model, ...)")
    return parse_experiment(raw, str(path))
