"""Building a Message from metadata, as Flower does for replies (``flwr.app`` offers no public way to)."""

from flwr.app.message.message import make_message

__all__ = ["make_message"]
