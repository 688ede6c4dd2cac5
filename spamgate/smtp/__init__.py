"""The inbound SMTP side: protocol handling on top of aiosmtpd."""
