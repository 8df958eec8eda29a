"""The rollout orchestrator: an MQTT client of the host daemons (never imports ``daemon``), durable in SQLite
or PostgreSQL, driving one patch across a fleet in waves on an injectable clock."""
