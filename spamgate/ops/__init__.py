"""Running spamgate as a service: listeners, reload and shutdown (`server`),
several worker processes (`workers`), privileges and systemd (`daemon`), file
descriptors (`descriptors`), and the HTTP endpoint for metrics and health
(`exporter`, `health`)."""
