"""spamgate: an anti-spam, before-queue SMTP proxy for Postfix."""

__version__ = "0.1.0"
