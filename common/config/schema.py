"""fedseg's configuration schema: every option once, with its type, default and one-line description.

The sections here are pydantic models: pydantic checks each value's type
(strictly: no "5" for 5, no true for 1.0) and refuses keys a section lacks;
``check_consistency`` refuses combinations that cannot work together. Which
sections a file may hold is ``common.config.files``'s business: the centre's
federation.yaml, a site's site.yaml and the view a site receives each have
their own schema, built from these sections.
"""

from __future__ import annotations

import hashlib
import typing
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from .checks import ConfigError, check_consistency

NormMode = Literal["local", "stats", "shared"]
"""Which normalization tensors stay at the site (docs/architecture.md, "Shared and site-local tensors")."""
NORM_TRAVEL: tuple[str, ...] = typing.get_args(NormMode)
"""The norm modes from the one that lets least travel to the one that lets most."""

Augmentation = Literal["none", "standard"]
"""Patch augmentation: none, or nnU-Net-like spatial + intensity (common/augmentation.py)."""


def _number_as_text(value: Any) -> Any:
    """YAML reads ``run_name: 2025`` or a hex digest of digits as a number; a text option takes it as written."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


Text = Annotated[str, BeforeValidator(_number_as_text)]
"""A text option: a string, or a number YAML parsed that is meant as text."""


def option(default: Any, doc: str) -> Any:
    """Declare a schema field with its default and its one-line description (the docs page's and --help's)."""
    return Field(default=default, description=doc)


class Section(BaseModel):
    """A group of options: strict types, unknown keys refused, and "set" tracked by pydantic.

    ``model_fields_set`` holds the options a file (or an override) named;
    an option left out keeps its default and is not in it, whatever its value.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    def replace(self, **changes: Any) -> Self:
        """A checked copy with ``changes``, like ``dataclasses.replace``; what was set stays set."""
        values = {name: getattr(self, name) for name in self.model_fields_set} | changes
        try:
            return self.model_validate(values)
        except ValidationError as err:
            raise ConfigError(f"{type(self).__name__}: {explain(err)}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every option's value (set or default), as plain YAML-ready data."""
        return self.model_dump()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


def explain(err: ValidationError) -> str:
    """The first error pydantic found, without pydantic's framing: a check's own message, or where and what."""
    first = err.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return str(cause)
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


class ModelConfig(Section):
    """The shared 3D segmentation network."""

    arch: Literal["unet", "dynunet"] = option("unet", "Network: MONAI UNet, or DynUNet (nnU-Net-like).")
    channels: list[int] = option([16, 32, 64, 128, 256], "Feature channels per resolution level.")
    strides: list[int] = option([2, 2, 2, 2], "Downsampling stride between levels (one fewer than channels).")
    num_res_units: int = option(2, "Residual units per UNet block.")
    norm: Literal["instance", "batch"] = option(
        "batch",
        "Normalization layer: batch (FedBN: statistics and weights stay at each site; a site that never "
        "trained re-estimates the statistics, AdaBN) or instance (built with affine=True: its weights stay local).",
    )
    in_channels: int = option(
        0, "Image channels (modalities) per case; 0: the sites' dataset.json decide, agreed at planning."
    )
    out_channels: int = option(
        0, "Classes including background; 0: the labels the sites' dataset.json agree on at planning."
    )
    dropout: float = option(0.0, "Dropout probability inside the network.")
    init_weights: Text = option(
        "",
        "Centre: start the run from pretrained weights instead of the seeded random init: a fedseg export "
        "folder, a run folder (its best checkpoint), a .safetensors file or a MONAI bundle's models/model.pt "
        "(a state dict; a pickled object is refused). Tensors are taken by name and shape (docs/pretrained.md).",
    )


def with_channels(model: ModelConfig, channels: int, classes: int, source: str, detail: str = "") -> ModelConfig:
    """``model`` with the data's channel and class counts; a count set by hand must equal the data's."""
    for key, found in (("in_channels", channels), ("out_channels", classes)):
        configured = getattr(model, key)
        if configured not in (0, found):
            raise ConfigError(
                f"model.{key} is {configured} but {source} declare {found}{detail}; remove "
                f"model.{key} to take it from the data, or set it to {found}."
            )
    return model.replace(in_channels=channels, out_channels=classes)


class DataConfig(Section):
    """How a site turns its NIfTI cases into training patches."""

    spacing: list[float] = option(
        [], "Target voxel spacing in mm (RAS); empty: the federation's plan decides (nnU-Net's median rule)."
    )
    patch_size: list[int] = option(
        [], "Training patch and sliding-window size in voxels; empty: the plan decides within max_patch_voxels."
    )
    max_patch_voxels: int = option(
        110592, "Plan: most voxels in a training patch (48^3), the time and memory budget of a 2-core CPU step."
    )
    normalization: Literal["auto", "ct", "zscore"] = option(
        "auto", "Plan: auto (CT channels by dataset.json -> federation clip + z-score, others per-case z-score)."
    )
    annotators: Literal["sample", "fuse"] = option(
        "sample", "Cases with several label files: train on a random annotator per patch, or on their majority vote."
    )
    foreground_fraction: float = option(0.33, "Share of patches centred on foreground (nnU-Net samples >= 1/3).")
    val_fraction: float = option(0.25, "Share of a site's cases held out for validation.")
    split_seed: int = option(0, "Seed of the deterministic train/validation split.")
    remap_labels: bool = option(
        False,
        "Centre: a site whose dataset.json gives the federation's label names other values is remapped by "
        "name at the site (the model, and so its predictions, use the federation's values); false: it is refused.",
    )
    clip_percentiles: list[float] = option(
        [0.5, 99.5], "CT: percentiles of the federation's foreground intensities clipped to before z-scoring."
    )


class TrainConfig(Section):
    """Local training at a site and evaluation of the global model."""

    local_steps: int = option(10, "Optimizer steps per site per round.")
    batch_size: int = option(2, "Patches per optimizer step.")
    lr: float = option(1e-3, "Learning rate of the local optimizer (Adam, at a constant rate).")
    augmentation: Augmentation = option(
        "standard", "Patch augmentation: none, or standard (spatial + brightness/contrast/noise)."
    )
    weight_decay: float = option(1e-5, "L2 weight decay of the local optimizer.")
    proximal_mu: float = option(0.01, "FedProx mu: weight of (mu/2)*||w - w_global||^2; 0 is FedAvg.")
    norm_mode: NormMode = option("local", "local (FedBN), stats (SiloBN) or shared (FedAvg of everything).")
    sw_overlap: float = option(0.25, "Sliding-window overlap during evaluation.")
    sw_batch_size: int = option(
        4,
        "Windows per forward pass in sliding-window evaluation and prediction (on 2 CPU cores, 4 windows "
        "at once run about 3x faster per window than one).",
    )
    hd95: bool = option(True, "Also report the 95th percentile Hausdorff distance (mm) in evaluation.")
    device: Text = option(
        "auto",
        "Where models run: auto (the first CUDA GPU when torch sees one, else the CPU), cpu, cuda or "
        "cuda:N; a site's own site.yaml may set it for that site.",
    )
    prefetch_batches: int = option(
        2,
        "On CUDA: batches sampled and augmented ahead in a background thread, so the GPU does not wait "
        "(0: none); on a CPU, which would do both on the same cores, none.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32",
        "Autocast of training and inference: bf16 (CUDA, or CPUs with native bf16, else fp32 with a "
        "warning) or fp16 (CUDA only, with loss scaling); a site's site.yaml may set it for that site.",
    )
    adapt_norm_steps: int = option(
        20,
        "AdaBN at a site that never trained: batches of its unlabeled patches that re-estimate the BatchNorm "
        "statistics (0: none).",
    )
    personalize_steps: int = option(
        30,
        "After training, each trained site fine-tunes its own copy for up to this many steps (0: off), keeping "
        "the best on its own validation cases; scored as dice_personal in the cross-site evaluation.",
    )
    personalize: Literal["norm", "norm+head"] = option(
        "norm+head", "What the personalization step may change: the norm layers, or those and the output layer."
    )
    seed: int = option(0, "Seed of model initialisation and patch sampling.")


class FederationConfig(Section):
    """The server's round loop, quorum and outputs."""

    rounds: int = option(3, "Federated rounds to run.")
    min_sites: int = option(2, "Quorum: sites that must reply successfully for a round to be aggregated.")
    on_quorum_failure: Literal["skip", "stop"] = option(
        "skip", "Below quorum: skip the round keeping the previous global model, or stop the run."
    )
    round_timeout_s: float = option(1800.0, "Seconds to wait for site replies each round.")
    poll_interval_s: float = option(0.2, "How often the ServerApp looks for site replies (Flower's own grid: 3 s).")
    wire_dtype: Literal["float32", "float16"] = option(
        "float32", "dtype of model arrays on the wire; aggregation is always float32."
    )
    sites: list[Text] = option(
        [], "Site names expected in this federation (recorded in the log); empty: whoever connects."
    )
    held_out_sites: list[Text] = option(
        [], "Sites that connect but never train: only evaluated (as-is and norm-adapted) in the cross-site evaluation."
    )
    cross_eval: bool = option(True, "After training, evaluate the best and last global model at every site.")
    evaluate_checkpoint: Text = option(
        "", "Skip training; only cross-evaluate this checkpoint of the run (best, last, round-0003 or a file)."
    )
    runs_dir: Text = option("runs", "Folder that holds one run directory per run.")
    tensorboard: bool = option(
        False,
        "Mirror metrics.jsonl to TensorBoard event files in <run>/tensorboard as the run writes it "
        "(tensorboard --logdir runs/); nothing but the log's own numbers is written there.",
    )
    run_name: Text = option("", "Run directory name; empty means a timestamped name.")
    run_id: Text = option(
        "",
        "The run's identity (12 hex digits), drawn when the run is created and kept when it resumes; each site "
        "keeps the run's model under it. Set by fedseg-server start and fedseg-sim, not by hand.",
    )
    aggregator: Literal["mean", "trimmed_mean", "median"] = option(
        "mean", "How shared tensors are combined: weighted mean, or a robust coordinate-wise trimmed mean or median."
    )
    clip_updates: bool = option(
        False,
        "Scale every update ||w_k - w_global|| longer than the sites' median down to it before "
        "aggregating, so no site pulls harder than a typical one (not with differential privacy).",
    )
    server_optimizer: Literal["none", "momentum"] = option(
        "momentum",
        "Server-side step on the round's update: momentum (FedAvgM, Hsu et al. 2019, server learning "
        "rate 1); none: the aggregate is the new global model.",
    )
    schedule: Literal["parallel", "cyclic"] = option(
        "parallel",
        "parallel: every training site trains each round and the updates are averaged; cyclic: cyclical "
        "weight transfer (Chang et al. 2018), each round one training site in turn continues from the "
        "previous one's weights (the same patches take as many times the rounds as there are sites; "
        "needs server_optimizer none, aggregator mean, no DP; with model.norm batch a site's running "
        "statistics go stale between its turns, so use instance norm; the best model is the last "
        "round's, the only one every site scores).",
    )
    server_momentum: float = option(0.5, "momentum: beta of the server's momentum on the rounds' updates.")
    trim_fraction: float = option(0.2, "trimmed_mean: share of sites dropped at each end of every coordinate.")
    norm_bound: float = option(
        10.0, "Reject an update whose ||w_k - w_global|| exceeds this multiple of the other sites' median; 0: off."
    )
    secure_aggregation: Literal["none", "secagg+"] = option(
        "none",
        "secagg+: the centre learns only the sum of the round's updates (SecAgg+ on Flower's primitives, "
        "docs/secure-aggregation.md); every site weighs the same; needs norm_bound 0, aggregator mean, "
        "clip_updates false and schedule parallel, which each need one site's update.",
    )
    secagg_threshold: float = option(
        0.6,
        "secagg+: share of the round's sites whose shares rebuild a secret (always more than half); the round "
        "survives n - ceil(share x n) sites dropping, and fewer sites than that can unmask no one.",
    )
    secagg_clip_norm: float = option(
        10.0,
        "secagg+: each site clips its update ||w_k - w_global|| to this L2 norm before masking, which is "
        "also the quantization range (privacy.clipping_norm instead when central DP is on).",
    )


class SiteConfig(Section):
    """Who this site is and where its data and private state live (site.yaml)."""

    name: Text = option("", "The site's name as it appears in the server's metrics log.")
    data_dir: Text = option("", "nnU-Net raw dataset folder (holds dataset.json, imagesTr, labelsTr).")
    state_dir: Text = option("", "Private state folder: local norm tensors, cache, egress log.")
    torch_threads: int = option(1, "CPU threads torch may use for this site's training.")
    # Deployment (fedseg-client start); see deploy/site.yaml.
    server_address: Text = option("", "host:port of the centre's Fleet gateway, the only server port a site reaches.")
    root_certificate: Text = option(
        "", "The federation CA certificate (ca.crt) the server's TLS certificate must chain to."
    )
    private_key: Text = option(
        "", "This site's node-authentication key (fedseg-client keygen); it never leaves the site."
    )
    approved_bundles: list[Text] = option(
        [], "SHA-256 of the app bundles this site agrees to run (fedseg-client approve); others are refused."
    )
    poll_interval_s: float = option(
        0.25, "How often the SuperNode asks the centre for work and forwards replies (Flower's own: 3 s)."
    )
    warm_start: bool = option(
        True, "Fork each ClientApp from a warm process with torch/MONAI/Flower loaded; false: a fresh interpreter."
    )
    min_cohort: int = option(
        5,
        "Fewest cases any value this site sends may be computed from (fingerprint, training, Dice); "
        "fewer and the site refuses, saying so. Set by the site, never by the centre.",
    )
    min_local_steps: int = option(
        1,
        "Fewest local steps (train.local_steps) an update this site sends may be computed from; a centre asking "
        "for fewer is refused. Set by the site, never by the centre.",
    )
    min_batch_size: int = option(
        1,
        "Fewest patches per step (train.batch_size) this site trains with; a centre asking for fewer is refused, "
        "so an update is never the gradient of one patch. Set by the site, never by the centre.",
    )
    require_secure_aggregation: bool = option(
        False,
        "true: this site trains only when its update leaves masked (the centre's "
        "federation.secure_aggregation: secagg+); a request for an update in the clear is refused before "
        "training. Set by the site, never by the centre.",
    )
    local_dp_noise_multiplier: float = option(
        0.0,
        "Local DP: this site clips its update (the tensors that leave it) to local_dp_clipping_norm and adds "
        "Gaussian noise of std local_dp_noise_multiplier x local_dp_clipping_norm before it leaves, with or "
        "without secure aggregation; 0: off. Set by the site, never by the centre (client/local_dp.py).",
    )
    local_dp_clipping_norm: float = option(
        1.0, "Local DP: L2 norm this site's update ||w_k - w_global|| is clipped to before the noise."
    )
    local_dp_delta: float = option(
        1e-5, "Local DP: delta of the (epsilon, delta) budget `fedseg-client status` shows for this site's releases."
    )
    max_norm_travel: NormMode = option(
        "stats",
        "Most of the normalization layers this site lets travel, whatever the centre's train.norm_mode: "
        "local (none), stats (affine weights, never running statistics) or shared (everything).",
    )
    norm_from_run: Text = option(
        "",
        "A run whose last norm tensors at this site every new run here starts from: its folder under "
        "<state_dir>/runs (<run_name>-<run_id>, or legacy-norm); empty: the global initialisation.",
    )
    runtime_port: int = option(0, "Loopback port of the SuperNode's local Runtime API; 0 picks a free port.")
    retry_initial_s: float = option(5.0, "Wait before restarting a SuperNode that stopped; doubles per failure.")
    retry_max_s: float = option(300.0, "Longest wait between SuperNode restarts while the server is unreachable.")


class SimulatedSite(Section):
    """One of the user's own sites in a simulation (an entry of ``simulation.sites``)."""

    data_dir: Text = option("", "nnU-Net raw or Medical Segmentation Decathlon dataset folder of this site.")
    held_out: bool = option(
        False, "The site never trains; it is only scored (as-is and norm-adapted) on all its labelled cases."
    )
    site_yaml: Text = option(
        "",
        "This site's own site.yaml, whose site: settings (min_cohort, max_norm_travel, device...) apply as at "
        "a deployed site; empty: a deployed site's defaults.",
    )


class SimulationConfig(Section):
    """The local multi-site simulation: the user's own sites, or built-in synthetic data."""

    num_sites: int = option(3, "Simulated hospitals.")
    cases_per_site: int = option(6, "Synthetic cases generated per site.")
    test_cases_per_site: int = option(
        0, "Synthetic labelled test cases per site (imagesTs/labelsTs): scored at the end, never chosen on."
    )
    volume_shape: list[int] = option([48, 48, 32], "Voxel shape of each synthetic volume.")
    shift_strength: float = option(1.0, "Scanner shift between sites: 0 identical scanners, 1 strong shift.")
    data_dir: Text = option("data/synthetic", "Where synthetic site datasets are generated (reused if present).")
    seed: int = option(0, "Seed of the synthetic data.")
    held_out_sites: int = option(0, "Extra simulated sites that never train, for the cross-site evaluation.")
    ray_num_cpus: int = option(2, "CPUs Ray may use for the whole simulation.")
    cpus_per_site: int = option(2, "CPUs reserved per simulated site; sites run in turns when CPUs are scarce.")
    gpus_per_site: float = option(
        0.0,
        "GPU share each simulated site asks Ray for (Flower's client-resources-num-gpus): 0.25 lets four "
        "sites train side by side on one GPU; 0: none reserved.",
    )
    ray_address: Text = option(
        "",
        "host:port of a running Ray cluster (`ray start --head`) the simulation joins instead of starting "
        "a local Ray; its CPUs and GPUs are the cluster's (ray_num_cpus is ignored); empty: local Ray.",
    )
    sites: dict[str, SimulatedSite] = option(
        {}, "Your own sites: name -> {data_dir, held_out}; empty: the synthetic generator (num_sites etc.)."
    )


class ServerConfig(Section):
    """The coordinating centre's deployment: ports, certificates and state (fedseg-server start)."""

    fleet_host: Text = option("0.0.0.0", "Address the Fleet gateway listens on; sites reach nothing else.")
    fleet_port: int = option(9092, "Port of the TLS Fleet gateway that sites connect to.")
    superlink_port: int = option(9093, "Loopback-only port of the SuperLink (Fleet, Control and Runtime APIs).")
    cert_dir: Text = option(
        "certs", "Folder with ca.crt, server.crt, server.key and sites/<name>.pub (fedseg-server certs)."
    )
    state_dir: Text = option("server-state", "Folder for the SuperLink database, Flower's home and the server logs.")
    app_dir: Text = option("", "Folder of the reviewed fedseg release shipped to sites; empty: this installation.")


class PrivacyConfig(Section):
    """Central differential privacy of the released global models (off unless noise_multiplier > 0)."""

    noise_multiplier: float = option(0.0, "Gaussian noise std as a multiple of clipping_norm / sites; 0: DP off.")
    clipping_norm: float = option(1.0, "Each site's update ||w_k - w_global|| is clipped to this L2 norm.")
    delta: float = option(1e-5, "delta of the (epsilon, delta) budget reported in the metrics log every round.")


class FedsegConfig(Section):
    """Everything fedseg can be configured with: each file's schema (common/config/files.py) sets a subset."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    site: SiteConfig = Field(default_factory=SiteConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check_consistency(self)
        return self


def section_model(field: FieldInfo) -> type[BaseModel]:
    """The model class of a section field: every section of a config file is a pydantic model."""
    model = field.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"a config section must be a pydantic model, not {model!r}")
    return model


def describe_options() -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) of every option, for docs and --help."""
    rows = []
    for section, info in FedsegConfig.model_fields.items():
        for name, field in section_model(info).model_fields.items():
            rows.append(
                (f"{section}.{name}", field.get_default(call_default_factory=True), field.description or "")
            )  # tests/test_config.py: every option has one
    return rows
