"""The front-end-neutral session driver: events in, decisions out.

`driver.SessionDriver` is what a front end feeds (the SMTP proxy, `spamgate
explain`, a milter); its collaborators each own one job: `link` the lock-step
upstream session, `txnlog` the transaction log line and outcome counts, `headers`
(with `authresults`) the fields a message gains and loses, `sasl` AUTH
passthrough, `disposal` DISCARD and HOLD.
"""
