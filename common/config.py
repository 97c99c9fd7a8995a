"""The one typed configuration schema of fedseg, loaded from YAML.

Every option lives here once, with its default and a one-line description.
The server's federation.yaml, a site's site.yaml and the simulation's YAML are
all read through this schema, so a misspelt key is caught in the same way
everywhere: the error names the key, the file and the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Augmentation = Literal["none", "standard", "scanner"]
"""Patch augmentation: none, nnU-Net-like spatial + intensity, or that plus scanner shift (common/loops.py)."""
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A simulated site's name: it also names a folder."""

RUN_ID = re.compile(r"[0-9a-f]{12}")
"""A run's identity: it names the run's folder at each site, so nothing else may appear in it."""

NormMode = Literal["local", "stats", "shared"]
"""Which normalization tensors stay at the site (docs/architecture.md, "Shared and site-local tensors")."""
NORM_TRAVEL: tuple[str, ...] = typing.get_args(NormMode)
"""The norm modes from the one that lets least travel to the one that lets most."""


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says how to fix it."""


def option(default: Any, doc: str) -> Any:
    """Declare a schema field with its default and its one-line description."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """The shared 3D segmentation network."""

    arch: Literal["unet", "dynunet"] = option("unet", "Network: MONAI UNet, or DynUNet (nnU-Net-like).")
    channels: list[int] = option([16, 32, 64, 128, 256], "Feature channels per resolution level.")
    strides: list[int] = option([2, 2, 2, 2], "Downsampling stride between levels (one fewer than channels).")
    num_res_units: int = option(2, "Residual units per UNet block.")
    norm: Literal["instance", "batch"] = option(
        "batch", "Normalization layer: batch (FedBN: statistics and weights stay at each site; a site that never "
        "trained re-estimates the statistics, AdaBN) or instance (built with affine=True: its weights stay local)."
    )
    in_channels: int = option(
        0, "Image channels (modalities) per case; 0: the sites' dataset.json decide, agreed at planning.")
    out_channels: int = option(
        0, "Classes including background; 0: the labels the sites' dataset.json agree on at planning.")
    dropout: float = option(0.0, "Dropout probability inside the network.")
    init_weights: str = option(
        "", "Centre: start the run from pretrained weights instead of the seeded random init: a fedseg export "
            "folder, a run folder (its best checkpoint), a .safetensors file or a MONAI bundle's models/model.pt "
            "(a state dict; a pickled object is refused). Tensors are taken by name and shape (docs/pretrained.md).")


def with_channels(model: ModelConfig, channels: int, classes: int, source: str, detail: str = "") -> ModelConfig:
    """``model`` with the data's channel and class counts; a count set by hand must equal the data's."""
    for key, found in (("in_channels", channels), ("out_channels", classes)):
        configured = getattr(model, key)
        if configured not in (0, found):
            raise ConfigError(f"model.{key} is {configured} but {source} declare {found}{detail}; remove "
                              f"model.{key} to take it from the data, or set it to {found}.")
    return dataclasses.replace(model, in_channels=channels, out_channels=classes)


@dataclass
class DataConfig:
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
        False, "Centre: a site whose dataset.json gives the federation's label names other values is remapped by "
               "name at the site (the model, and so its predictions, use the federation's values); false: it is refused."
    )
    clip_percentiles: list[float] = option(
        [0.5, 99.5], "CT: percentiles of the federation's foreground intensities clipped to before z-scoring."
    )


@dataclass
class TrainConfig:
    """Local training at a site and evaluation of the global model."""

    local_steps: int = option(10, "Optimizer steps per site per round.")
    batch_size: int = option(2, "Patches per optimizer step.")
    optimizer: Literal["adam", "sgd"] = option("adam", "Local optimizer.")
    lr: float = option(1e-3, "Local learning rate.")
    lr_schedule: Literal["constant", "poly"] = option(
        "constant", "constant, or nnU-Net's poly decay lr * (1 - t/T)^0.9 over the run's T = rounds x local_steps steps."
    )
    augmentation: Augmentation = option(
        "standard", "Patch augmentation: none, standard (spatial + brightness/contrast/noise) or scanner "
                    "(standard plus bias field, gamma, histogram shift, blur and low resolution)."
    )
    weight_decay: float = option(1e-5, "L2 weight decay of the local optimizer.")
    proximal_mu: float = option(0.01, "FedProx mu: weight of (mu/2)*||w - w_global||^2; 0 is FedAvg.")
    norm_mode: NormMode = option("local", "local (FedBN), stats (SiloBN) or shared (FedAvg of everything).")
    sw_overlap: float = option(0.25, "Sliding-window overlap during evaluation.")
    sw_batch_size: int = option(
        4, "Windows per forward pass in sliding-window evaluation and prediction (on 2 CPU cores, 4 windows "
           "at once run about 3x faster per window than one)."
    )
    hd95: bool = option(True, "Also report the 95th percentile Hausdorff distance (mm) in evaluation.")
    device: str = option(
        "auto", "Where models run: auto (the first CUDA GPU when torch sees one, else the CPU), cpu, cuda or "
                "cuda:N; a site's own site.yaml may set it for that site."
    )
    prefetch_batches: int = option(
        2, "On CUDA: batches sampled and augmented ahead in a background thread, so the GPU does not wait "
           "(0: none); on a CPU, which would do both on the same cores, none."
    )
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "Autocast of training and inference: bf16 (CUDA, or CPUs with native bf16, else fp32 with a "
                "warning) or fp16 (CUDA only, with loss scaling); a site's site.yaml may set it for that site."
    )
    adapt_norm_steps: int = option(
        20, "AdaBN at a site that never trained: batches of its unlabeled patches that re-estimate the BatchNorm "
            "statistics (0: none)."
    )
    personalize_steps: int = option(
        30, "After training, each trained site fine-tunes its own copy for up to this many steps (0: off), keeping "
           "the best on its own validation cases; scored as dice_personal in the cross-site evaluation."
    )
    personalize: Literal["norm", "norm+head", "all"] = option(
        "norm+head", "What the personalization step may change: the norm layers, those and the output layer, or "
                     "every weight (fine-tuning the whole copy)."
    )
    seed: int = option(0, "Seed of model initialisation and patch sampling.")


@dataclass
class FederationConfig:
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
    sites: list[str] = option([], "Site names expected in this federation (recorded in the log); empty: whoever connects.")
    held_out_sites: list[str] = option(
        [], "Sites that connect but never train: only evaluated (as-is and norm-adapted) in the cross-site evaluation."
    )
    cross_eval: bool = option(True, "After training, evaluate the best and last global model at every site.")
    evaluate_checkpoint: str = option(
        "", "Skip training; only cross-evaluate this checkpoint of the run (best, last, round-0003 or a file)."
    )
    runs_dir: str = option("runs", "Folder that holds one run directory per run.")
    tensorboard: bool = option(
        False, "Mirror metrics.jsonl to TensorBoard event files in <run>/tensorboard as the run writes it "
               "(tensorboard --logdir runs/); nothing but the log's own numbers is written there.")
    run_name: str = option("", "Run directory name; empty means a timestamped name.")
    run_id: str = option(
        "", "The run's identity (12 hex digits), drawn when the run is created and kept when it resumes; each site "
            "keeps the run's model under it. Set by fedseg-server start and fedseg-sim, not by hand."
    )
    aggregator: Literal["mean", "trimmed_mean", "median"] = option(
        "mean", "How shared tensors are combined: weighted mean, or a robust coordinate-wise trimmed mean or median."
    )
    clip_updates: bool = option(
        False, "Scale every update ||w_k - w_global|| longer than the sites' median down to it before "
               "aggregating, so no site pulls harder than a typical one (not with differential privacy)."
    )
    server_optimizer: Literal["none", "momentum", "adam", "yogi"] = option(
        "momentum", "Server-side step on the round's update: momentum (Flower's FedAvgM, Hsu et al. 2019, server "
                "learning rate 1), adam / yogi (Flower's FedAdam / FedYogi, Reddi et al. 2021); none: the "
                "aggregate is the new global model."
    )
    schedule: Literal["parallel", "cyclic"] = option(
        "parallel", "parallel: every training site trains each round and the updates are averaged; cyclic: cyclical "
                    "weight transfer (Chang et al. 2018), each round one training site in turn continues from the "
                    "previous one's weights (the same patches take as many times the rounds as there are sites; "
                    "needs server_optimizer none, aggregator mean, no DP; with model.norm batch a site's running "
                    "statistics go stale between its turns, so use instance norm; the best model is the last "
                    "round's, the only one every site scores)."
    )
    server_momentum: float = option(0.5, "momentum: beta of the server's momentum on the rounds' updates.")
    server_lr: float = option(0.01, "FedAdam/FedYogi: server learning rate eta.")
    server_tau: float = option(1e-3, "FedAdam/FedYogi: adaptivity tau (larger: closer to plain averaging).")
    trim_fraction: float = option(0.2, "trimmed_mean: share of sites dropped at each end of every coordinate.")
    norm_bound: float = option(
        10.0, "Reject an update whose ||w_k - w_global|| exceeds this multiple of the other sites' median; 0: off."
    )
    secure_aggregation: Literal["none", "secagg+"] = option(
        "none", "secagg+: the centre learns only the sum of the round's updates (SecAgg+ on Flower's primitives, "
                "docs/secure-aggregation.md); every site weighs the same; needs norm_bound 0, aggregator mean, "
                "clip_updates false and schedule parallel, which each need one site's update."
    )
    secagg_threshold: float = option(
        0.6, "secagg+: share of the round's sites whose shares rebuild a secret (always more than half); the round "
             "survives n - ceil(share x n) sites dropping, and fewer sites than that can unmask no one."
    )
    secagg_clip_norm: float = option(
        10.0, "secagg+: each site clips its update ||w_k - w_global|| to this L2 norm before masking, which is "
              "also the quantization range (privacy.clipping_norm instead when central DP is on)."
    )


@dataclass
class SiteConfig:
    """Who this site is and where its data and private state live (site.yaml)."""

    name: str = option("", "The site's name as it appears in the server's metrics log.")
    data_dir: str = option("", "nnU-Net raw dataset folder (holds dataset.json, imagesTr, labelsTr).")
    state_dir: str = option("", "Private state folder: local norm tensors, cache, egress log.")
    torch_threads: int = option(1, "CPU threads torch may use for this site's training.")
    # Deployment (fedseg-client start); see deploy/site.yaml.
    server_address: str = option("", "host:port of the centre's Fleet gateway, the only server port a site reaches.")
    root_certificate: str = option("", "The federation CA certificate (ca.crt) the server's TLS certificate must chain to.")
    private_key: str = option("", "This site's node-authentication key (fedseg-client keygen); it never leaves the site.")
    approved_bundles: list[str] = option(
        [], "SHA-256 of the app bundles this site agrees to run (fedseg-client approve); others are refused."
    )
    poll_interval_s: float = option(
        0.25, "How often the SuperNode asks the centre for work and forwards replies (Flower's own: 3 s)."
    )
    warm_start: bool = option(
        True, "Fork each ClientApp from a warm process with torch/MONAI/Flower loaded; false: a fresh interpreter."
    )
    min_cohort: int = option(
        5, "Fewest cases any value this site sends may be computed from (fingerprint, training, Dice); "
        "fewer and the site refuses, saying so. Set by the site, never by the centre."
    )
    min_local_steps: int = option(
        1, "Fewest local steps (train.local_steps) an update this site sends may be computed from; a centre asking "
           "for fewer is refused. Set by the site, never by the centre."
    )
    min_batch_size: int = option(
        1, "Fewest patches per step (train.batch_size) this site trains with; a centre asking for fewer is refused, "
           "so an update is never the gradient of one patch. Set by the site, never by the centre."
    )
    local_dp_noise_multiplier: float = option(
        0.0, "Local DP: this site clips its update (the tensors that leave it) to local_dp_clipping_norm and adds "
             "Gaussian noise of std local_dp_noise_multiplier x local_dp_clipping_norm before it leaves, with or "
             "without secure aggregation; 0: off. Set by the site, never by the centre (client/local_dp.py)."
    )
    local_dp_clipping_norm: float = option(
        1.0, "Local DP: L2 norm this site's update ||w_k - w_global|| is clipped to before the noise."
    )
    local_dp_delta: float = option(
        1e-5, "Local DP: delta of the (epsilon, delta) budget `fedseg-client status` shows for this site's releases."
    )
    max_norm_travel: NormMode = option(
        "stats", "Most of the normalization layers this site lets travel, whatever the centre's train.norm_mode: "
        "local (none), stats (affine weights, never running statistics) or shared (everything)."
    )
    norm_from_run: str = option(
        "", "A run whose last norm tensors at this site every new run here starts from: its folder under "
            "<state_dir>/runs (<run_name>-<run_id>, or legacy-norm); empty: the global initialisation."
    )
    runtime_port: int = option(0, "Loopback port of the SuperNode's local Runtime API; 0 picks a free port.")
    retry_initial_s: float = option(5.0, "Wait before restarting a SuperNode that stopped; doubles per failure.")
    retry_max_s: float = option(300.0, "Longest wait between SuperNode restarts while the server is unreachable.")


@dataclass
class SimulatedSite:
    """One of the user's own sites in a simulation (an entry of ``simulation.sites``)."""

    data_dir: str = option("", "nnU-Net raw or Medical Segmentation Decathlon dataset folder of this site.")
    held_out: bool = option(False, "The site never trains; it is only scored (as-is and norm-adapted) on all "
                                   "its labelled cases.")
    site_yaml: str = option(
        "", "This site's own site.yaml, whose site: settings (min_cohort, max_norm_travel, device...) apply as at "
            "a deployed site; empty: a deployed site's defaults."
    )


@dataclass
class SimulationConfig:
    """The local multi-site simulation: the user's own sites, or built-in synthetic data."""

    num_sites: int = option(3, "Simulated hospitals.")
    cases_per_site: int = option(6, "Synthetic cases generated per site.")
    test_cases_per_site: int = option(
        0, "Synthetic labelled test cases per site (imagesTs/labelsTs): scored at the end, never chosen on."
    )
    volume_shape: list[int] = option([48, 48, 32], "Voxel shape of each synthetic volume.")
    shift_strength: float = option(1.0, "Scanner shift between sites: 0 identical scanners, 1 strong shift.")
    data_dir: str = option("data/synthetic", "Where synthetic site datasets are generated (reused if present).")
    ray_num_cpus: int = option(2, "CPUs Ray may use for the whole simulation.")
    cpus_per_site: int = option(2, "CPUs reserved per simulated site; sites run in turns when CPUs are scarce.")
    gpus_per_site: float = option(
        0.0, "GPU share each simulated site asks Ray for (Flower's client-resources-num-gpus): 0.25 lets four "
             "sites train side by side on one GPU; 0: none reserved."
    )
    ray_address: str = option(
        "", "host:port of a running Ray cluster (`ray start --head`) the simulation joins instead of starting "
            "a local Ray; its CPUs and GPUs are the cluster's (ray_num_cpus is ignored); empty: local Ray."
    )
    seed: int = option(0, "Seed of the synthetic data.")
    held_out_sites: int = option(0, "Extra simulated sites that never train, for the cross-site evaluation.")
    sites: dict[str, SimulatedSite] = option(
        {}, "Your own sites: name -> {data_dir, held_out}; empty: the synthetic generator (num_sites etc.)."
    )


@dataclass
class ServerConfig:
    """The coordinating centre's deployment: ports, certificates and state (fedseg-server start)."""

    fleet_host: str = option("0.0.0.0", "Address the Fleet gateway listens on; sites reach nothing else.")
    fleet_port: int = option(9092, "Port of the TLS Fleet gateway that sites connect to.")
    superlink_port: int = option(9093, "Loopback-only port of the SuperLink (Fleet, Control and Runtime APIs).")
    cert_dir: str = option("certs", "Folder with ca.crt, server.crt, server.key and sites/<name>.pub (fedseg-server certs).")
    state_dir: str = option("server-state", "Folder for the SuperLink database, Flower's home and the server logs.")
    app_dir: str = option("", "Folder of the reviewed fedseg release shipped to sites; empty: this installation.")


@dataclass
class PrivacyConfig:
    """Central differential privacy of the released global models (off unless noise_multiplier > 0)."""

    noise_multiplier: float = option(0.0, "Gaussian noise std as a multiple of clipping_norm / sites; 0: DP off.")
    clipping_norm: float = option(1.0, "Each site's update ||w_k - w_global|| is clipped to this L2 norm.")
    delta: float = option(1e-5, "delta of the (epsilon, delta) budget reported in the metrics log every round.")


@dataclass
class FedsegConfig:
    """Everything fedseg can be configured with; each YAML file sets a subset."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        check_consistency(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


def check_consistency(cfg: FedsegConfig) -> None:
    """Reject combinations that each look valid alone but cannot work together."""
    m, d, t, f = cfg.model, cfg.data, cfg.train, cfg.federation
    if m.arch == "unet" and len(m.strides) != len(m.channels) - 1:
        raise ConfigError(
            f"model.strides has {len(m.strides)} entries but model.channels has {len(m.channels)}; "
            "UNet needs exactly one stride fewer than channels."
        )
    if len(d.patch_size) not in (0, 3) or len(d.spacing) not in (0, 3):
        raise ConfigError("data.patch_size and data.spacing need three values (x, y, z), or none to use the plan's.")
    if any(v <= 0 for v in d.spacing) or d.max_patch_voxels < 1:
        raise ConfigError("data.spacing values and data.max_patch_voxels must be positive.")
    factor = 1
    for s in m.strides:
        factor *= s
    if any(p % factor for p in d.patch_size):
        raise ConfigError(
            f"data.patch_size {d.patch_size} must be divisible by {factor} (the product of model.strides)."
        )
    if not 0.0 <= d.foreground_fraction <= 1.0:
        raise ConfigError(f"data.foreground_fraction must be in [0, 1], got {d.foreground_fraction}.")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}.")
    if t.personalize_steps < 0 or t.adapt_norm_steps < 0:
        raise ConfigError("train.personalize_steps and train.adapt_norm_steps must be >= 0.")
    if t.prefetch_batches < 0:
        raise ConfigError(f"train.prefetch_batches must be >= 0, got {t.prefetch_batches}.")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device: {t.device!r} is not one of auto, cpu, cuda, cuda:N (e.g. cuda:1).")
    if cfg.simulation.gpus_per_site < 0:
        raise ConfigError(f"simulation.gpus_per_site must be >= 0, got {cfg.simulation.gpus_per_site}.")
    if t.proximal_mu < 0:
        raise ConfigError(f"train.proximal_mu must be >= 0, got {t.proximal_mu}.")
    check_robustness(cfg)
    check_secure_aggregation(cfg)
    check_simulated_sites(cfg.simulation)
    if not 0.01 <= f.poll_interval_s <= 60 or not 0.01 <= cfg.site.poll_interval_s <= 60:
        raise ConfigError("federation.poll_interval_s and site.poll_interval_s must be between 0.01 and 60 seconds.")
    if t.local_steps < 1 or t.batch_size < 1 or f.rounds < 1 or f.min_sites < 1:
        raise ConfigError("train.local_steps, train.batch_size, federation.rounds and federation.min_sites must be >= 1.")
    if f.run_name and not SITE_NAME.fullmatch(f.run_name):
        raise ConfigError(f"federation.run_name {f.run_name!r} must be letters, digits, '.', '_' or '-' (it names "
                          "the run's folder at the centre and at every site).")
    if f.run_id and not RUN_ID.fullmatch(f.run_id):
        raise ConfigError(f"federation.run_id {f.run_id!r} must be 12 hex digits; leave it unset, fedseg draws it.")
    if min(cfg.site.min_cohort, cfg.site.min_local_steps, cfg.site.min_batch_size) < 1:
        raise ConfigError("site.min_cohort, site.min_local_steps and site.min_batch_size must be >= 1.")
    check_local_dp(cfg.site)
    if cfg.site.norm_from_run and not SITE_NAME.fullmatch(cfg.site.norm_from_run):
        raise ConfigError(f"site.norm_from_run {cfg.site.norm_from_run!r} must be one folder name under "
                          "<state_dir>/runs (<run_name>-<run_id>), letters, digits, '.', '_' or '-'.")


def check_robustness(cfg: FedsegConfig) -> None:
    """Robust aggregation and DP settings; DP's noise is calibrated for a plain mean only."""
    f, p = cfg.federation, cfg.privacy
    if not 0.0 <= f.trim_fraction < 0.5:
        raise ConfigError(f"federation.trim_fraction must be in [0, 0.5), got {f.trim_fraction}.")
    if f.norm_bound != 0 and f.norm_bound < 1:
        raise ConfigError(f"federation.norm_bound must be 0 (off) or >= 1, got {f.norm_bound}.")
    if p.noise_multiplier < 0 or p.clipping_norm <= 0 or not 0 < p.delta < 1:
        raise ConfigError("privacy.noise_multiplier must be >= 0, privacy.clipping_norm > 0 and privacy.delta in (0, 1).")
    if not 0 <= f.server_momentum < 1:
        raise ConfigError(f"federation.server_momentum must be in [0, 1), got {f.server_momentum}.")
    if f.server_lr <= 0 or f.server_tau <= 0:
        raise ConfigError(f"federation.server_lr and federation.server_tau must be > 0, got {f.server_lr} and "
                          f"{f.server_tau}.")
    if p.noise_multiplier > 0 and f.clip_updates:
        raise ConfigError("privacy.noise_multiplier > 0 clips every update at privacy.clipping_norm already; set "
                          "federation.clip_updates: false (a median-relative clip would break the DP accounting).")
    if f.schedule == "cyclic" and (f.server_optimizer != "none" or f.aggregator != "mean" or p.noise_multiplier > 0
                                   or f.clip_updates):
        raise ConfigError("federation.schedule: cyclic trains one site per round, whose weights become the model: "
                          "set federation.server_optimizer: none, federation.aggregator: mean, "
                          "federation.clip_updates: false and privacy.noise_multiplier: 0.")
    if p.noise_multiplier > 0 and f.aggregator != "mean":
        raise ConfigError(
            f"privacy.noise_multiplier > 0 needs federation.aggregator: mean (got '{f.aggregator}'): the noise is "
            "calibrated to the sensitivity of a mean of clipped updates."
        )


def check_local_dp(site: SiteConfig) -> None:
    """A site's own local DP: valid numbers, and only over tensors whose noised values stay usable."""
    if site.local_dp_noise_multiplier < 0 or site.local_dp_clipping_norm <= 0 or not 0 < site.local_dp_delta < 1:
        raise ConfigError("site.local_dp_noise_multiplier must be >= 0 (0: off), site.local_dp_clipping_norm > 0 "
                          "and site.local_dp_delta in (0, 1).")
    if site.local_dp_noise_multiplier > 0 and site.max_norm_travel == "shared":
        raise ConfigError("site.local_dp_noise_multiplier > 0 with site.max_norm_travel: shared would add noise to "
                          "the running statistics that leave (a running variance can turn negative); set "
                          "site.max_norm_travel: stats or local.")


def check_secure_aggregation(cfg: FedsegConfig) -> None:
    """What cannot run when the centre sees only the sum of the updates, and the protocol's own numbers."""
    f = cfg.federation
    if f.secure_aggregation == "none":
        return
    needs_one_update = [
        *(["federation.norm_bound: 0 (it compares each site's update with the others')"] if f.norm_bound else []),
        *(["federation.aggregator: mean (a trimmed mean or median needs each site's value of every coordinate)"]
          if f.aggregator != "mean" else []),
        *(["federation.clip_updates: false (it scales each update by the sites' median norm; each site clips its "
           "own to federation.secagg_clip_norm instead)"] if f.clip_updates else []),
        *(["federation.schedule: parallel (cyclic makes one site's update the model: there is no sum to hide it "
           "in)"] if f.schedule != "parallel" else []),
    ]
    if needs_one_update:
        raise ConfigError("federation.secure_aggregation: secagg+ shows the centre only the sum of the round's "
                          "updates, so nothing that needs one site's update can run; set " + "; ".join(needs_one_update)
                          + ".")
    if not 0.5 < f.secagg_threshold <= 1 or f.secagg_clip_norm <= 0:
        raise ConfigError(f"federation.secagg_threshold must be in (0.5, 1] (a majority: fewer shares could unmask a "
                          f"site) and federation.secagg_clip_norm > 0; got {f.secagg_threshold} and "
                          f"{f.secagg_clip_norm}.")


def check_simulated_sites(sim: SimulationConfig) -> None:
    """The user's own simulated sites: each names a folder, and at least one of them trains."""
    for name, site in sim.sites.items():
        if not SITE_NAME.fullmatch(name):
            raise ConfigError(f"simulation.sites: site name {name!r} must be letters, digits, '.', '_' or '-' "
                              "(it names the site's state folder and appears in the metrics log).")
        if not site.data_dir:
            raise ConfigError(f"simulation.sites.{name}.data_dir is empty: set it to the site's nnU-Net raw or "
                              "Decathlon dataset folder.")
    if sim.sites and all(site.held_out for site in sim.sites.values()):
        raise ConfigError(f"simulation.sites: every site ({', '.join(sim.sites)}) is held_out; at least one must train.")


_SECTION_TYPES = typing.get_type_hints(FedsegConfig)


def describe_options() -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) of every option, for docs and --help."""
    rows = []
    for section, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f"{section}.{f.name}", default, f.metadata["doc"]))
    return rows


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(valid)}."


def _coerce_fields(values: Any, cls: type, source: str, dotted: str) -> dict[str, Any]:
    """A YAML mapping checked key by key against a schema dataclass (a section or a nested entry)."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{dotted}' must be a mapping, got {values!r}.")
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{dotted}.{key}'.{_closest(str(key), list(hints))}")
    return {k: _coerce(v, hints[k], source, f"{dotted}.{k}") for k, v in values.items()}


def _coerce(value: Any, hint: Any, source: str, dotted: str) -> Any:
    """Check one YAML value against its declared type, allowing int where float is expected."""
    where = f"{source}: {dotted}"
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return hint(**_coerce_fields(value, hint, source, dotted))
    if origin is dict:
        key_type, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {key_type.__name__} to {item.__name__}, got {value!r}.")
        for k in value:
            if not isinstance(k, key_type):
                raise ConfigError(f"{where}: key {k!r} must be a {key_type.__name__}.")
        return {k: _coerce(v, item, source, f"{dotted}.{k}") for k, v in value.items()}
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(c) for c in typing.get_args(hint))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}.")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {item.__name__}, got {value!r}.")
        return [_coerce(v, item, source, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: union types are not supported in the schema.")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__}).")
    return value


def from_dict(raw: dict[str, Any], source: str = "<config>") -> FedsegConfig:
    """Build a validated config from nested dictionaries; ``source`` names the file in errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}.")
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"{source}: unknown section '{section}'.{_closest(str(section), list(_SECTION_TYPES))}")
        cls = _SECTION_TYPES[section]
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}.")
        sections[section] = cls(**_coerce_fields(values, cls, source, section))
    return FedsegConfig(**sections)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) on top of a raw config.

    A longer dotted key reaches into a mapping option, e.g.
    ``simulation.sites.hospital-a.held_out=true``.
    """
    if not overrides:
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping of sections, got {type(raw).__name__}.")
    merged = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.lr=0.001.")
        dotted, text = item.split("=", 1)
        *parents, key = dotted.strip().split(".")
        target = merged
        for depth, name in enumerate(parents):
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"override '{item}': '{where}' is not a mapping in the config file.")
        target[key] = yaml.safe_load(text)
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML file, turning parse errors into a message that names the file and line."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}.") from err
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}).") from err


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> FedsegConfig:
    """Load a YAML file (or the defaults when ``path`` is None), then apply flag overrides."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " + overrides"
    return from_dict(apply_overrides(raw, overrides or []), source)


def from_yaml_text(text: str, source: str) -> FedsegConfig:
    """Parse a config that travelled as YAML text (the run config)."""
    return from_dict(yaml.safe_load(text) or {}, source)
