"""Where accepted mail goes: an SMTP MTA (Postfix) or, to try spamgate alone, a Maildir.

`base` is the interface the session driver drives in lock-step; `smtp` the SMTP
client (XCLIENT, pooled connections in `pool`, XCLIENT's attributes in `xclient`),
`maildir` the Maildir delivery, `dry` an upstream that accepts everything.
"""
