"""A compromised centre cannot lower what an update is computed from below the site's own floors (M6)."""

from __future__ import annotations

import yaml
from flwr.app import MessageType

from tests.helpers.site_harness import handle, site_setup


def _with_floors(tmp_path, data_dir, *train: str):
    """A run config with ``train`` settings, and a site.yaml whose floors are 2 steps of 2 patches."""
    cfg, site_yaml = site_setup(tmp_path, data_dir, "site-1", *train)
    body = yaml.safe_load(site_yaml.read_text())
    body["site"] |= {"min_local_steps": 2, "min_batch_size": 2}
    site_yaml.write_text(yaml.safe_dump(body))
    return cfg, site_yaml


def test_a_centre_asking_for_one_step_of_one_patch_is_refused_by_the_sites_floors(tmp_path, tiny_federation):
    reply = handle(
        *_with_floors(tmp_path, tiny_federation["site-1"], "train.local_steps=1", "train.batch_size=1"),
        MessageType.TRAIN,
    )
    assert reply.has_error()
    assert reply.error.reason == (
        "site site-1: the centre's train.local_steps or train.batch_size is under this "
        "site's floor (site.min_local_steps, site.min_batch_size): the site does not train"
    )
    at_floor = handle(
        *_with_floors(tmp_path, tiny_federation["site-1"], "train.local_steps=2", "train.batch_size=2"),
        MessageType.TRAIN,
    )
    assert not at_floor.has_error(), at_floor.error.reason


def test_a_site_that_requires_secure_aggregation_refuses_an_update_in_the_clear(tmp_path, tiny_federation):
    """site.require_secure_aggregation: a centre that asks for a plain update gets a refusal, not the update."""
    from client.client_app import refuse_under_floors
    from common.config import SiteFile, load_config

    cfg, site_yaml = site_setup(tmp_path, tiny_federation["site-1"], "site-1")
    body = yaml.safe_load(site_yaml.read_text())
    body["site"]["require_secure_aggregation"] = True
    site_yaml.write_text(yaml.safe_dump(body))
    reply = handle(cfg, site_yaml, MessageType.TRAIN)
    assert reply.has_error()
    assert reply.error.reason == (
        "site site-1: the centre asks for an update in the clear; this site requires "
        "secure aggregation (site.require_secure_aggregation): the site does not train"
    )
    site_cfg = cfg.replace(site=load_config(site_yaml, schema=SiteFile).site)
    refuse_under_floors(site_cfg, masked=True)  # a request for a masked update passes the floor
