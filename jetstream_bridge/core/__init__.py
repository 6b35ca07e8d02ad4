"""Django-free and nats-free building blocks: subjects, durations, envelope, config, topology."""
