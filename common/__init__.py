"""fedseg's shared core: configuration, model, parameter split, data, loops and logs.

Nothing here imports from server/, client/ or simulations/.
"""

# MONAI's package import is not thread-safe (it walks and imports its own
# submodules), and Flower's simulation engine loads the ServerApp and the
# ClientApp in different threads of one process. Importing it here, under the
# import lock of this package, makes every later import of it a no-op.
import monai  # noqa: F401
