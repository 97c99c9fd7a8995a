"""The configuration: the schema's defaults, each file's own schema, overrides, removed options and the errors
users see."""

from __future__ import annotations

import pytest

from common.config import (
    CentreFile,
    ConfigError,
    FedsegConfig,
    SimulatedSite,
    SiteFile,
    describe_options,
    from_yaml_text,
    load_config,
)
from common.device import with_site_compute
from common.runs import site_view


def test_defaults_are_the_documented_model():
    cfg = load_config()
    assert cfg.model.channels == [16, 32, 64, 128, 256]
    assert cfg.model.strides == [2, 2, 2, 2]
    assert cfg.model.num_res_units == 2
    assert cfg.train.norm_mode == "local"


def test_every_option_has_a_default_and_a_description():
    rows = describe_options()
    assert len(rows) > 20
    for key, _default, doc in rows:
        assert doc.strip(), key


def test_misspelt_key_names_key_file_and_closest(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text("train:\n  proximal_mu: 0.1\n  lcoal_steps: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.lcoal_steps" in message
    assert str(path) in message
    assert "local_steps" in message


def test_unknown_section_suggests_the_closest(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("stie:\n  name: a\n")
    with pytest.raises(ConfigError, match="'site'"):
        load_config(path)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train:\n  local_steps: many\n", "expected int"),
        ("train:\n  norm_mode: fedbn\n", "'local', 'stats', 'shared'"),
        ("model:\n  channels: 16\n", "expected a list"),
        ("data:\n  patch_size: [30, 30, 30]\n", "divisible by 16"),
        ("train: [1, 2]\n", "must be a mapping"),
        ("train:\n  lr: [0.1\n", "not valid YAML"),
    ],
)
def test_invalid_values_are_explained(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(path)


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text("train:\n  lr: 0.1\n  local_steps: 3\n")
    cfg = load_config(path, ["train.lr=0.5", "federation.rounds=7"])
    assert cfg.train.lr == 0.5
    assert cfg.train.local_steps == 3
    assert cfg.federation.rounds == 7


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["rounds=3"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_round_trip_keeps_every_value():
    cfg = load_config(None, ["train.lr=0.002", "model.norm=batch"])
    again = from_yaml_text(cfg.to_yaml(), "round trip")
    assert again == cfg
    assert again.sha256() == cfg.sha256()
    assert isinstance(FedsegConfig().to_dict()["model"], dict)


def test_simulated_sites_are_a_typed_mapping_that_round_trips(tmp_path):
    path = tmp_path / "sim.yaml"
    path.write_text(
        "simulation:\n  sites:\n    hospital-a: {data_dir: /data/a}\n"
        "    hospital-b: {data_dir: /data/b, held_out: true}\n"
    )
    cfg = load_config(path, ["simulation.sites.hospital-a.held_out=false"])
    assert cfg.simulation.sites == {
        "hospital-a": SimulatedSite(data_dir="/data/a", held_out=False),
        "hospital-b": SimulatedSite(data_dir="/data/b", held_out=True),
    }
    assert from_yaml_text(cfg.to_yaml(), "round trip") == cfg
    assert load_config().simulation.sites == {}


@pytest.mark.parametrize(
    "text, fragment",
    [
        (
            "simulation:\n  sites:\n    a: {data_dir: /x, heldout: true}\n",
            "unknown key 'simulation.sites.a.heldout'. Did you mean 'held_out'?",
        ),
        (
            "simulation:\n  sites:\n    a: {data_dir: /x, held_out: maybe}\n",
            "simulation.sites.a.held_out: expected bool",
        ),
        ("simulation:\n  sites:\n    a: /x\n", "'simulation.sites.a' must be a mapping"),
        ("simulation:\n  sites: [a, b]\n", "simulation.sites: expected a mapping"),
        ("simulation:\n  sites:\n    a: {held_out: false}\n", "simulation.sites.a.data_dir is empty"),
        ("simulation:\n  sites:\n    a: {data_dir: /x, held_out: true}\n", "at least one must train"),
    ],
)
def test_simulated_site_errors_name_the_key(tmp_path, text, fragment):
    path = tmp_path / "sim.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "schema, text, fragments",
    [
        (
            SiteFile,
            "site:\n  name: a\ntrain:\n  lr: 0.1\n",
            ["'train.lr' cannot be set in a site.yaml", "federation.yaml", "train.device, train.precision"],
        ),
        (
            SiteFile,
            "site:\n  name: a\nmodel:\n  norm: instance\n",
            ["'model' cannot be set in a site.yaml", "federation.yaml"],
        ),
        (CentreFile, "site:\n  min_cohort: 3\n", ["'site' cannot be set in the centre's federation.yaml", "site.yaml"]),
        (SiteFile, "site:\n  min_cohrt: 3\n", ["unknown key 'site.min_cohrt'. Did you mean 'min_cohort'?"]),
        (SiteFile, "site:\n  name: a\ntrain:\n  devce: cpu\n", ["unknown key 'train.devce'. Did you mean 'device'?"]),
    ],
)
def test_each_file_refuses_what_belongs_in_another(tmp_path, schema, text, fragments):
    path = tmp_path / "file.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, schema=schema)
    assert str(path) in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_what_a_file_sets_is_set_even_at_the_default(tmp_path):
    """A site.yaml's ``device: auto`` wins over the centre's ``cuda``; a site.yaml that says nothing keeps it."""
    centre = load_config(None, ["train.device=cuda", "train.precision=bf16"]).train
    path = tmp_path / "site.yaml"
    path.write_text("site:\n  name: a\ntrain:\n  device: auto\n")
    own = load_config(path, schema=SiteFile).train
    assert own.model_fields_set == {"device"}
    assert with_site_compute(centre, own).device == "auto"
    assert with_site_compute(centre, own).precision == "bf16"
    path.write_text("site:\n  name: a\n")
    assert with_site_compute(centre, load_config(path, schema=SiteFile).train).device == "cuda"


def test_site_view_holds_only_what_sites_receive():
    cfg = load_config(
        None,
        [
            "federation.rounds=40",
            "federation.sites=[a, b]",
            "model.init_weights=/centre/w",
            "privacy.noise_multiplier=0.5",
            "federation.run_name=r",
        ],
    )
    view = site_view(cfg)
    assert view.federation.rounds == 40 and view.federation.run_name == "r"
    assert not hasattr(view.federation, "sites") and not hasattr(view, "privacy")
    assert "init_weights" not in view.to_yaml() and "/centre" not in view.to_yaml()
    resolved = view.resolved(cfg.site, view.train)
    assert resolved.federation.rounds == 40 and resolved.model.init_weights == ""


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ("federation.server_optimizer=adam", "0.072 and 0.292"),
        ("federation.server_optimizer=yogi", "break training"),
        ("federation.server_lr=0.1", "FedAdam/FedYogi"),
        ("train.lr_schedule=poly", "0.584/0.608"),
        ("train.optimizer=sgd", "never run"),
        ("train.personalize=all", "no gain"),
        ("train.augmentation=scanner", "0.727/0.755"),
    ],
)
def test_removed_options_are_refused_saying_why(setting, fragment):
    with pytest.raises(ConfigError, match="was removed") as err:
        load_config(None, [setting])
    assert fragment in str(err.value)
    assert setting.split("=")[0] in str(err.value)
    assert "\n" not in str(err.value)


def test_a_config_written_before_the_removals_still_loads():
    """A run's config.yaml names every option, removed ones at the value that behaves as fedseg now does."""
    old = load_config(
        None,
        [
            "train.lr_schedule=constant",
            "train.optimizer=adam",
            "federation.server_lr=0.01",
            "federation.server_tau=0.001",
        ],
    )
    assert old == load_config()


def test_copies_are_checked_and_keep_what_was_set():
    cfg = load_config(None, ["train.lr=0.5"])
    copy = cfg.replace(train=cfg.train.replace(local_steps=3))
    assert copy.train.lr == 0.5 and copy.train.local_steps == 3
    assert copy.train.model_fields_set == {"lr", "local_steps"}
    with pytest.raises(ConfigError, match="run_name"):
        cfg.replace(federation=cfg.federation.replace(run_name="a/b"))


def test_numbers_yaml_reads_are_text_where_the_option_is_text(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("site:\n  name: 2025\n  approved_bundles: [0123]\n")
    site = load_config(path, schema=SiteFile).site
    assert site.name == "2025" and all(isinstance(b, str) for b in site.approved_bundles)
