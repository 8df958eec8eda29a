"""The wire contract of livepatchd's MQTT API (pydantic models and topic names)."""
