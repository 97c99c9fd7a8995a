"""Import MONAI once, whole, before any thread can race for it.

MONAI's package import walks and imports its own submodules, and that walk is
not thread-safe. Flower's simulation engine loads the ServerApp and the
ClientApp in different threads of one process, so both app modules import this
module before anything that uses MONAI: the first thread runs the import under
this module's import lock, and the other waits for it to finish. The command
line tools do not import it, so ``--help`` does not pay for MONAI.
"""

import monai  # noqa: F401
