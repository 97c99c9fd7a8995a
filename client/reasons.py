"""The only wording a site's error replies may carry: fixed texts, one per kind of failure.

Exception texts may hold paths, file names or case ids, so the server never
sees them; it gets the fixed reason for the failure's kind, and the site keeps
the details in its own ``site.log``. The egress guard (client/egress.py)
lets out no other reason.
"""

from __future__ import annotations

import errno
import re

from common.config import ConfigError
from common.dataset import DatasetError
from common.labels import ChannelMismatch, LabelMismatch
from common.params import ParameterSplitError
from common.wire import WireError, error_reason

from .inbound import MalformedMessage


class SignatureMismatch(ValueError):
    """Server and site disagree on the model (different config or version)."""


class UnderSiteFloor(ValueError):
    """The centre asks for training under a floor this site set (site.min_local_steps, site.min_batch_size)."""


class PlainUpdateRefused(ValueError):
    """The centre asks for an update in the clear and this site requires secure aggregation."""


class TooFewCases(ValueError):
    """A value would be computed from fewer cases than the site's ``site.min_cohort``."""


SANITIZED_REASONS: dict[type[BaseException], str] = {
    SignatureMismatch: "model signature mismatch: the site and the server run different model configurations",
    DatasetError: "the site's dataset could not be read; run `fedseg-client check` at the site",
    ConfigError: "the site's configuration is invalid; see the site log",
    ParameterSplitError: "the norm mode does not fit the model; see the site log",
    FloatingPointError: "local training diverged (non-finite loss)",
    MemoryError: "the site ran out of memory",
    WireError: "the server's message does not unpack: the site and the server run different fedseg versions",
    MalformedMessage: "the server's message is malformed (unexpected records, values or text); the site refused it",
    ChannelMismatch: "the site's image channels differ from the federation's; run `fedseg-client check` at the site",
    LabelMismatch: "the site's label map differs from the federation's; run `fedseg-client check` at the site",
    UnderSiteFloor: "the centre's train.local_steps or train.batch_size is under this site's floor "
    "(site.min_local_steps, site.min_batch_size): the site does not train",
    PlainUpdateRefused: "the centre asks for an update in the clear; this site requires secure aggregation "
    "(site.require_secure_aggregation): the site does not train",
    TooFewCases: "fewer cases than the site's minimum cohort (site.min_cohort): nothing computed from them is sent",
}
DISK_FULL_ERRNOS = frozenset((errno.ENOSPC, errno.EFBIG, errno.EDQUOT))
DISK_FULL_REASON = "the site's disk is full: its state folder cannot be written; free space at the site"
BLOCKED_REASON = "a reply was blocked by the site's egress guard; see the site's egress audit"
INTERNAL = re.compile(r"internal error \([A-Za-z]{1,60}\); see the site log")
"""Any other exception: its class name only (a name from the code, never from the data)."""
FIXED_REASONS = frozenset([*SANITIZED_REASONS.values(), BLOCKED_REASON, DISK_FULL_REASON])


def sanitized_reason(site: str, err: BaseException) -> str:
    """Short, fixed wording per failure kind: exception texts may hold paths or case names."""
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return error_reason(site, DISK_FULL_REASON)
    for kind, reason in SANITIZED_REASONS.items():
        if isinstance(err, kind):
            return error_reason(site, reason)
    return error_reason(site, f"internal error ({type(err).__name__}); see the site log")


def is_fixed(text: str) -> bool:
    """Whether ``text`` (a reason without its ``site <name>:`` prefix) is one of the fixed wordings."""
    return text in FIXED_REASONS or INTERNAL.fullmatch(text) is not None
